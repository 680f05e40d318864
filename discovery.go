package ollamaflow

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// memberSet is a frontend's backends at one moment: the handler swaps the
// whole set when DNS changes, and a request works on the set it read.
type memberSet struct {
	// backends are in rotation: the static ones in config order, then the
	// discovered ones by name.
	backends []*backend
	// leaving are discovered servers whose records disappeared, kept (for
	// the admin API) until the requests they serve have finished.
	leaving []*backend
	// tiered says some backend's tier is above 0 (SRV records of more than
	// one priority): selection then looks for the lowest usable tier.
	tiered bool
}

// pool returns the frontend's backends in rotation now.
func (h *Handler) pool() []*backend {
	if m := h.members.Load(); m != nil {
		return m.backends
	}
	return h.backends // a view built by hand (tests)
}

// views returns every backend of the frontend, leaving ones included.
func (h *Handler) views() []*backend {
	m := h.members.Load()
	if m == nil {
		return h.backends
	}
	if len(m.leaving) == 0 {
		return m.backends
	}
	return append(slices.Clip(m.backends), m.leaving...)
}

// discovery runs a frontend's backends_from sources: a goroutine per source
// looks it up every refresh, and membership changes are applied one at a
// time under mu.
type discovery struct {
	h        *Handler
	ctx      caddy.Context // the config's, for the servers' settings
	logger   *zap.Logger
	sources  []*source
	required []requiredModel

	mu      sync.Mutex
	found   map[*source][]endpoint // the last good answer of each source
	byKey   map[string]*backend    // discovered servers in rotation
	leaving []*backend             // out of rotation, in-flight requests finishing
	started bool                   // the config runs: a server found adopts its settings at once
	stopped bool

	reap   chan struct{} // a leaving server may have finished its last request
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newDiscovery(h *Handler, ctx caddy.Context, sources []*source, required []requiredModel) *discovery {
	d := &discovery{
		h: h, ctx: ctx, logger: h.logger.Named("discovery"), sources: sources, required: required,
		found: make(map[*source][]endpoint), byKey: make(map[string]*backend),
		reap: make(chan struct{}, 1),
	}
	for _, src := range sources {
		v, _ := sourceMemos.LoadOrStore(src.memoKey, &sourceMemo{})
		src.memory = v.(*sourceMemo)
	}
	return d
}

// start looks every source up once, within firstLookupTimeout, so the
// config starts with its servers, then keeps them current in goroutines.
// A source that fails here starts with the last good answer another
// config had, if any.
func (d *discovery) start() {
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	first, cancelFirst := context.WithTimeout(ctx, firstLookupTimeout)
	results := make([][]endpoint, len(d.sources))
	errs := make([]error, len(d.sources))
	var wg sync.WaitGroup
	for i, src := range d.sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if rec := recover(); rec != nil {
					errs[i] = fmt.Errorf("panic: %v", rec)
				}
			}()
			results[i], errs[i] = src.lookup(first)
		}()
	}
	wg.Wait()
	cancelFirst()
	for i, src := range d.sources {
		found, err := results[i], errs[i]
		if err != nil {
			d.logger.Warn("backends_from lookup failed; starting with the last known servers, if any",
				zap.String("source", src.label), zap.Error(err))
			found = src.remembered()
		}
		d.update(src, found, err)
	}
	for _, src := range d.sources {
		d.goSafe("backends_from "+src.label, func() { d.refreshLoop(ctx, src) })
	}
	d.goSafe("backends_from reaper", func() { d.reapLoop(ctx) })
}

// goSafe runs fn in a goroutine that stop waits for, logging a panic
// instead of taking Caddy down.
func (d *discovery) goSafe(what string, fn func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() {
			if rec := recover(); rec != nil {
				d.logger.Error("panic in "+what, zap.Any("panic", rec), zap.Stack("stack"))
			}
		}()
		fn()
	}()
}

func (src *source) remembered() []endpoint {
	src.memory.mu.Lock()
	defer src.memory.mu.Unlock()
	if src.memory.found == nil {
		return nil
	}
	out := make([]endpoint, len(src.memory.found))
	for i, ep := range src.memory.found {
		ep.src = src
		out[i] = ep
	}
	return out
}

func (src *source) remember(found []endpoint) {
	kept := make([]endpoint, len(found))
	for i, ep := range found {
		ep.src = nil
		kept[i] = ep
	}
	src.memory.mu.Lock()
	src.memory.found = kept
	src.memory.mu.Unlock()
}

// refreshLoop looks src up every refresh until ctx ends. A failure keeps
// the servers of the last good answer, and is logged once until a lookup
// succeeds again.
func (d *discovery) refreshLoop(ctx context.Context, src *source) {
	failing := false
	timer := time.NewTimer(src.refresh)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
		found, err := src.lookup(lctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			found = nil // keep the servers of the last good answer
		}
		d.update(src, found, err)
		switch {
		case err != nil:
			if !failing {
				d.logger.Warn("backends_from lookup failed; keeping the last known servers",
					zap.String("source", src.label), zap.Error(err))
			}
			failing = true
		default:
			if failing {
				d.logger.Info("backends_from lookup succeeds again", zap.String("source", src.label))
			}
			failing = false
		}
		timer.Reset(src.refresh)
	}
}

// update records a lookup of src and applies its answer: servers new to
// the frontend join, servers no source names any more leave. A failed
// lookup (lookupErr) applies found only when it is not nil (the last good
// answer another config had, at start). The record and the change are
// made under one lock, so the admin API never shows a lookup's outcome
// without its servers, or the reverse.
func (d *discovery) update(src *source, found []endpoint, lookupErr error) {
	if lookupErr == nil {
		src.remember(found)
	}
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return
	}
	d.noteLookupLocked(src, lookupErr)
	if lookupErr != nil && found == nil {
		d.mu.Unlock()
		return
	}
	d.found[src] = found
	want := d.wanted()
	var joined, left []*backend
	for key, b := range d.byKey {
		// A record whose priority or weight changed replaces the view:
		// requests in flight finish on the old one, as when a server
		// leaves, and the live state, shared, carries on.
		if ep, ok := want[key]; !ok || ep.priority != b.srvPriority || ep.weight != b.srvWeight {
			delete(d.byKey, key)
			left = append(left, b)
		}
	}
	for key, ep := range want {
		if _, ok := d.byKey[key]; !ok {
			b := d.join(ep)
			d.byKey[key] = b
			joined = append(joined, b)
		}
	}
	if len(joined) == 0 && len(left) == 0 {
		d.mu.Unlock()
		return
	}
	for _, b := range left {
		// Before the new set is published: a request holding the old set
		// sees the flag and takes no slot there (backend.tryAcquire).
		b.leaving.Store(true)
		d.leaving = append(d.leaving, b)
	}
	gone := d.takeIdleLocked()
	d.publishLocked()
	if q := d.h.queue; q != nil {
		q.membersChanged(joined, left)
	}
	for _, b := range left {
		if _, back := d.byKey[b.srv.key]; back {
			d.logger.Info("backend's SRV priority or weight changed", zap.String("backend", b.cfg.Name),
				zap.String("source", b.source), zap.Int("priority", d.byKey[b.srv.key].srvPriority),
				zap.Int("weight", d.byKey[b.srv.key].srvWeight))
			continue // its new view required the models already
		}
		b.srv.dropRequired(d.h)
		d.logger.Info("backend left: draining", zap.String("backend", b.cfg.Name), zap.String("source", b.source),
			zap.Int64("in_flight", b.held.Load()))
	}
	for _, b := range joined {
		if slices.ContainsFunc(left, func(o *backend) bool { return o.srv == b.srv }) {
			continue // logged above
		}
		d.logger.Info("backend found", zap.String("backend", b.cfg.Name), zap.String("url", b.srv.key), zap.String("source", b.source))
	}
	d.mu.Unlock()
	d.release(gone)
}

// noteLookupLocked records the outcome of a lookup of src. d.mu must be
// held.
func (d *discovery) noteLookupLocked(src *source, err error) {
	src.lookups++
	src.lastLookup = time.Now()
	src.lastErr = ""
	if err != nil {
		src.failures++
		src.lastErr = err.Error()
	}
}

// status reports each source for the admin API.
func (d *discovery) status() []sourceStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]sourceStatus, 0, len(d.sources))
	for _, src := range d.sources {
		out = append(out, sourceStatus{Source: src.label, Servers: len(d.found[src]), Lookups: src.lookups,
			Failures: src.failures, LastLookup: src.lastLookup, LastError: src.lastErr})
	}
	return out
}

// wanted is the union of the sources' last answers by server key, less the
// static backends' servers (the static view wins); the first source to
// name a server gives its options.
func (d *discovery) wanted() map[string]endpoint {
	static := make(map[string]bool, len(d.h.backends))
	for _, b := range d.h.backends {
		static[b.srv.key] = true
	}
	want := make(map[string]endpoint)
	for _, src := range d.sources {
		for _, ep := range d.found[src] {
			key := ep.base.String()
			if _, dup := want[key]; !dup && !static[key] {
				want[key] = ep
			}
		}
	}
	return want
}

// join builds the frontend's view of a server found and takes a reference
// to its live state; a server new to the process starts probing at once.
// d.mu must be held.
func (d *discovery) join(ep endpoint) *backend {
	h := d.h
	cfg := ep.src.tmpl
	cfg.Name, cfg.URL = ep.name, ep.base.String()
	if ep.weight > 0 {
		cfg.Weight = ep.weight
	}
	b := newBackendView(&cfg, ep.base)
	b.discovered, b.source, b.owner = true, ep.src.label, d
	b.srvPriority, b.srvWeight = ep.priority, ep.weight
	b.staged = b.settings(d.ctx, h.logger, h.events, time.Duration(h.DialTimeout))
	srv, _ := acquireServer(ep.base, b.staged) // cannot fail: the constructor does not
	b.srv = srv
	if d.started {
		srv.adopt(b.staged, h.events, h.Name+"\x00"+b.cfg.Name)
	}
	if !cfg.Disabled && len(d.required) > 0 {
		srv.setRequired(h, d.required)
	}
	return b
}

// publishLocked stores the frontend's new member set. d.mu must be held.
func (d *discovery) publishLocked() {
	found := make([]*backend, 0, len(d.byKey))
	for _, b := range d.byKey {
		found = append(found, b)
	}
	slices.SortFunc(found, func(a, b *backend) int { return strings.Compare(a.cfg.Name, b.cfg.Name) })
	set := &memberSet{
		backends: append(slices.Clip(d.h.backends), found...),
		leaving:  slices.Clone(d.leaving),
		tiered:   rankTiers(found),
	}
	for i, b := range found {
		// A model index built over the previous set sees the new
		// positions disagree with its list and takes the slow path.
		b.pos.Store(int64(len(d.h.backends) + i))
	}
	d.h.members.Store(set)
}

// rankTiers sets the tier of each server an SRV source found: the rank of
// its record's priority among the priorities its source has now, so each
// source's lowest priority joins the static backends in tier 0. It reports
// whether any tier is above 0.
func rankTiers(found []*backend) bool {
	prios := make(map[string][]int) // source -> its distinct priorities
	for _, b := range found {
		if b.srvPriority >= 0 && !slices.Contains(prios[b.source], b.srvPriority) {
			prios[b.source] = append(prios[b.source], b.srvPriority)
		}
	}
	tiered := false
	for _, b := range found {
		rank := 0
		if b.srvPriority >= 0 {
			for _, p := range prios[b.source] {
				if p < b.srvPriority {
					rank++
				}
			}
		}
		b.tier.Store(int64(rank))
		tiered = tiered || rank > 0
	}
	return tiered
}

// firstTier keeps, of list, the backends of the lowest tier that has a
// usable one (RFC 2782: a higher SRV priority serves only when no server
// of a lower one can). A list with no usable backend is kept whole, for
// the caller's own checks to explain.
func (h *Handler) firstTier(list []*backend) []*backend {
	tier, ok := h.lowestTier(list)
	if !ok {
		return list
	}
	for i, b := range list {
		if b.tier.Load() != tier {
			// Copy only when a backend is dropped: the common case, every
			// backend in one tier, costs one pass.
			out := slices.Clone(list[:i])
			for _, b := range list[i+1:] {
				if b.tier.Load() == tier {
					out = append(out, b)
				}
			}
			return out
		}
	}
	return list
}

// lowestTier is the lowest tier of a usable backend of list; ok is false
// when every backend is in tier 0 or none is usable.
func (h *Handler) lowestTier(list []*backend) (tier int64, ok bool) {
	if m := h.members.Load(); m == nil || !m.tiered {
		return 0, false
	}
	noteWalk(list)
	tier = math.MaxInt64
	for _, b := range list {
		if t := b.tier.Load(); t < tier && b.usable() {
			tier = t
		}
	}
	return tier, tier != math.MaxInt64
}

// usable reports whether the backend could take a request of this
// frontend were it not at its caps: enabled, in the pool, not draining,
// healthy.
func (b *backend) usable() bool {
	return !b.cfg.Disabled && !b.leaving.Load() && !b.srv.draining.Load() && b.healthy()
}

// adopt gives every discovered server the settings of this frontend's
// config, now that it runs, and lets later ones adopt theirs at once.
func (d *discovery) adopt(config any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.started = true
	for _, b := range d.byKey {
		b.srv.adopt(b.staged, config, d.h.Name+"\x00"+b.cfg.Name)
	}
}

// idle tells the reaper that a leaving server finished a request.
func (d *discovery) idle() {
	select {
	case d.reap <- struct{}{}:
	default:
	}
}

func (d *discovery) reapLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.reap:
		}
		d.mu.Lock()
		gone := d.takeIdleLocked()
		if len(gone) > 0 {
			d.publishLocked()
		}
		d.mu.Unlock()
		d.release(gone)
	}
}

// takeIdleLocked removes the leaving servers that serve no request of this
// frontend any more. d.mu must be held. Each backend.tryAcquire counts its
// slot before it reads the leaving flag, and the flag is set before this
// reads the count: a request either sees the flag or is seen here.
func (d *discovery) takeIdleLocked() []*backend {
	var gone []*backend
	kept := d.leaving[:0]
	for _, b := range d.leaving {
		if b.held.Load() == 0 {
			gone = append(gone, b)
		} else {
			kept = append(kept, b)
		}
	}
	clear(d.leaving[len(kept):])
	d.leaving = kept
	return gone
}

// release gives back the references of servers that left, and the
// metric series of their names (a pool whose addresses change would
// otherwise grow them without bound).
func (d *discovery) release(gone []*backend) {
	for _, b := range gone {
		_, _ = servers.Delete(b.srv.key)
		d.logger.Info("backend gone", zap.String("backend", b.cfg.Name), zap.String("source", b.source))
		if !d.h.namesLive(b.cfg.Name) {
			forgetMetrics(d.h.Name, b.cfg.Name)
		}
	}
}

// stop ends the goroutines and gives back every reference the discovery
// holds (Cleanup).
func (d *discovery) stop() {
	if d.cancel != nil {
		d.cancel()
	}
	d.wg.Wait()
	d.mu.Lock()
	d.stopped = true
	all := slices.Clone(d.leaving)
	for _, b := range d.byKey {
		all = append(all, b)
	}
	d.byKey, d.leaving = map[string]*backend{}, nil
	d.mu.Unlock()
	for _, b := range all {
		b.srv.dropRequired(d.h)
		_, _ = servers.Delete(b.srv.key)
	}
	for _, src := range d.sources {
		_, _ = sourceMemos.Delete(src.memoKey)
	}
}

// namesLive reports whether a live frontend named like h has a backend
// named name in rotation.
func (h *Handler) namesLive(name string) bool {
	for _, o := range liveFrontends() {
		if o.Name != h.Name {
			continue
		}
		for _, b := range o.pool() {
			if b.cfg.Name == name {
				return true
			}
		}
	}
	return false
}

// forgetMetrics drops the series of a backend that left.
func forgetMetrics(frontend, backend string) {
	labels := prometheus.Labels{"frontend": frontend, "backend": backend}
	metrics.requests.DeletePartialMatch(labels)
	metrics.retries.DeletePartialMatch(labels)
	metrics.firstByte.DeletePartialMatch(labels)
	metrics.tokens.DeletePartialMatch(labels)
	metrics.coldLoads.DeletePartialMatch(labels)
	metrics.responsesCut.DeletePartialMatch(labels)
}
