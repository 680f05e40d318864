package ollamaflow

import (
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"
)

// backend is a frontend's view of one server: its config, pre-parsed, and a
// pointer to the shared live state.
type backend struct {
	cfg  *Backend
	base *url.URL
	// pos is the index in the frontend's pool, for the model index; a
	// membership change (discovery.go) moves discovered backends, so it
	// is atomic, and the index checks it against its own list.
	pos        atomic.Int64
	idHash     uint64 // the server's half of its rendezvous hash
	srv        *server
	labels     map[string]struct{}
	allowEmbed bool
	allowCompl bool
	header     http.Header // bearer token and configured headers, set on every call
	query      string      // encoded, appended to every backend URL
	// staged is what the server gets from this frontend once the config
	// has started (adoptSettings); requests always use header and query.
	staged *serverSettings

	// Discovered servers (discovery.go) enter rotation only once a probe
	// has passed, and leave once the requests they serve have finished:
	// held counts this view's slots, leaving says its records are gone.
	discovered bool
	source     string     // the backends_from source that found it
	owner      *discovery // nil for a static backend
	held       atomic.Int64
	leaving    atomic.Bool
	// A server an SRV record found keeps the record's priority and weight
	// (priority -1 for type a; unused for static backends); a record that changes them replaces the
	// view. tier is the rank of its priority among its source's, set when
	// the member set is published (discovery.go): requests go to the
	// lowest tier that has a server able to serve them.
	srvPriority int
	srvWeight   int
	tier        atomic.Int64
}

func newBackendView(cfg *Backend, base *url.URL) *backend {
	b := &backend{
		cfg:        cfg,
		base:       base,
		labels:     make(map[string]struct{}),
		allowEmbed: cfg.AllowEmbeddings == nil || *cfg.AllowEmbeddings,
		allowCompl: cfg.AllowCompletions == nil || *cfg.AllowCompletions,
		header:     make(http.Header),
		query:      strings.TrimPrefix(cfg.Query, "?"),
		idHash:     mix64(fnv64(base.String())),
	}
	for _, l := range normalizeLabels(cfg.Labels) {
		b.labels[l] = struct{}{}
	}
	for k, vs := range cfg.Headers {
		for _, v := range vs {
			b.header.Add(k, v)
		}
	}
	if cfg.BearerToken != "" {
		b.header.Set("Authorization", "Bearer "+cfg.BearerToken)
	}
	return b
}

// settings builds what the pooled server needs from this backend's config.
func (b *backend) settings(ctx caddy.Context, logger *zap.Logger, events *caddyevents.App, dialTimeout time.Duration) *serverSettings {
	return &serverSettings{
		name:          b.cfg.Name,
		probePath:     b.cfg.HealthURI,
		probeMethod:   b.cfg.HealthMethod,
		expectStatus:  b.cfg.HealthStatus,
		interval:      time.Duration(b.cfg.HealthInterval),
		timeout:       time.Duration(b.cfg.HealthTimeout),
		passes:        b.cfg.HealthPasses,
		fails:         b.cfg.HealthFails,
		failThreshold: b.cfg.FailThreshold,
		header:        b.header,
		query:         b.query,
		dialTimeout:   dialTimeout,
		modelRefresh:  time.Duration(b.cfg.ModelRefresh),
		pullConc:      b.cfg.PullConcurrency,
		logger:        logger,
		events:        events,
		ctx:           ctx,
	}
}

// allows reports whether the backend accepts requests of kind.
func (b *backend) allows(kind routeKind) bool {
	switch kind {
	case kindCompletion:
		return b.allowCompl
	case kindEmbedding:
		return b.allowEmbed
	}
	return true
}

// carries reports whether the backend has every label in want.
func (b *backend) carries(want []string) bool {
	for _, l := range want {
		if _, ok := b.labels[l]; !ok {
			return false
		}
	}
	return true
}

// hasRoom reports whether the backend may take a request now: below its
// max_parallel cap and its requests_per_minute, and still healthy, not
// draining and in the frontend's pool (a queued request chose its
// candidates a while ago).
func (b *backend) hasRoom() bool {
	if b.srv.draining.Load() || !b.healthy() || b.leaving.Load() {
		return false
	}
	if b.cfg.MaxParallel > 0 && b.srv.inFlight.Load() >= int64(b.cfg.MaxParallel) {
		return false
	}
	return b.srv.rateAdmits(b.cfg.RequestsPerMinute)
}

// free reports whether a request that is not queued may take a slot on
// the backend now: it has room, and no queued request waits for it.
func (b *backend) free() bool {
	return b.hasRoom() && b.srv.queued.Load() == 0
}

// healthy reports whether the server may receive this frontend's requests
// as far as health goes. A static backend not yet probed counts as
// healthy, so a fresh config routes at once; a discovered one waits for
// its first probe, so a server that DNS lists before it is ready (a pod
// starting) gets no request until it answers.
func (b *backend) healthy() bool {
	if b.discovered {
		return healthState(b.srv.state.Load()) == stateHealthy
	}
	return b.srv.healthy()
}

// tryAcquire takes a slot on the backend's server within this frontend's
// max_parallel and requests_per_minute. The view counts its own slots, so
// a server that left the pool is let go once its last request ends; the
// count goes up before the leaving flag is read (see
// discovery.takeIdleLocked).
func (b *backend) tryAcquire() bool {
	b.held.Add(1)
	if b.leaving.Load() || !b.srv.tryAcquire(b.cfg.MaxParallel, b.cfg.RequestsPerMinute) {
		b.unhold()
		return false
	}
	return true
}

// release gives back a slot tryAcquire took.
func (b *backend) release() {
	b.srv.release()
	b.unhold()
}

func (b *backend) unhold() {
	if b.held.Add(-1) == 0 && b.leaving.Load() && b.owner != nil {
		b.owner.idle()
	}
}

// noCandidate explains why a request found no backend; the handler turns it
// into a 503 naming what is missing.
type noCandidate struct{ msg string }

// candidates filters the frontend's backends down to those that may serve
// a request of kind requiring labels. Filters run from the static to the
// live, so the explanation names the first requirement nobody meets.
func (h *Handler) candidates(kind routeKind, labels []string) ([]*backend, *noCandidate) {
	var enabled, typed, labelled int
	pool := h.pool()
	gen := servingGeneration.Load() // before the walk: a change during it invalidates
	if len(pool) > largePool {
		if list := h.cachedCandidates(pool, kind, labels, gen); list != nil {
			return list, nil
		}
	}
	out := filterBackends(pool, func(b *backend) bool {
		if b.cfg.Disabled || b.srv.draining.Load() {
			return false
		}
		enabled++
		if !b.allows(kind) {
			return false
		}
		typed++
		if !b.carries(labels) {
			return false
		}
		labelled++
		return b.healthy()
	})
	if len(out) > 0 {
		if len(pool) > largePool {
			h.keepCandidates(pool, kind, labels, gen, out)
		}
		return out, nil
	}
	switch {
	case len(pool) == 0:
		return nil, &noCandidate{"no backend found yet by backends_from (" + h.sourceNames() + "); retry shortly"}
	case enabled == 0:
		return nil, &noCandidate{"every backend of this frontend is disabled or draining"}
	case typed == 0:
		return nil, &noCandidate{"no backend of this frontend allows " + kind.String() + " requests"}
	case labelled == 0:
		return nil, &noCandidate{"no backend carries the labels " + strings.Join(labels, ", ")}
	default:
		return nil, &noCandidate{"no healthy backend is available; retry shortly"}
	}
}

// acquire picks a backend with the frontend's policy and takes a slot on
// it, for a request that is not queued. It returns nil if every candidate
// is at its cap. A server with queued requests is left to them (the queue
// hands its next free slot to the oldest), so a newcomer never overtakes.
// A server of a higher SRV priority takes nothing while one of a lower
// priority among cands could serve, even when that one is full.
//
// Above largePool the lowest tier is kept per list and the request's
// avoidance (largepool.go) is applied server by server; only when that
// finds no server with room does the request pay for the exact lists and
// the walk over every candidate, which decides whether it queues.
func (h *Handler) acquire(cands []*backend, j *job) *backend {
	if len(cands) > largePool {
		if b, ok := h.acquireLarge(h.firstTierKept(cands), j); ok {
			return b
		}
		cands = h.exactCandidates(cands, j)
	}
	cands = h.firstTier(cands)
	noteWalk(cands)
	if j != nil {
		j.cands = cands
	}
	return h.take(filterBackends(cands, (*backend).free), j)
}

// take runs the policy over avail (backends with room) and takes a slot on
// the backend it picks. A slot lost to a concurrent request drops that
// backend and picks again; nil means none was had, or the policy holds the
// request back.
func (h *Handler) take(avail []*backend, j *job) *backend {
	b, _ := h.takeOrHold(avail, j)
	return b
}

// takeOrHold is take, and when the policy held the request back, the
// backends it declined (those of avail not lost to concurrent requests
// first); none when every slot it picked was lost to one: the request
// still wants those.
func (h *Handler) takeOrHold(avail []*backend, j *job) (*backend, []*backend) {
	if j == nil {
		j = &job{} // a request the caller did not size: a typical one
	}
	for len(avail) > 0 {
		b := h.policy(h, avail, j)
		if b == nil {
			return nil, avail // the policy holds the request back: it waits in the queue
		}
		if b.tryAcquire() {
			if j.measureOn == b.srv || j.spareOn == b.srv {
				// Its claim is in the slot counter now: counted twice
				// until the attempt began, the server looked to have
				// its measuring request and a spare, and the requests of
				// a burst chosen meanwhile found no slot to race beside
				// it (equal-exact: half the burst waited for the first
				// answer, p99 0.17 s against 0.09 s, in some runs).
				b.srv.speed.dropClaim()
				j.claimHeld = true
			}
			h.planLoad(b, j)
			return b, nil
		}
		avail = without(avail, b)
	}
	return nil, nil
}

// queueCandidates are the backends a queued request may be served by: the
// frontend's enabled backends that allow kind, carry labels and may have
// model, except the servers it already tried. Unlike candidates, it keeps
// unhealthy and draining ones: one that recovers or is undrained serves
// the queue at once (hasRoom checks health and drain at that time).
func (h *Handler) queueCandidates(kind routeKind, labels []string, model string, tried []*server) []*backend {
	var out []*backend
next:
	for _, b := range h.pool() {
		if b.cfg.Disabled || !b.allows(kind) || !b.carries(labels) {
			continue
		}
		for _, s := range tried {
			if b.srv == s {
				continue next
			}
		}
		if model != "" {
			if has, known := b.srv.models.Load().has(model); !has && known {
				continue
			}
		}
		out = append(out, b)
	}
	return out
}

func without(list []*backend, drop *backend) []*backend {
	out := make([]*backend, 0, len(list))
	for _, b := range list {
		if b != drop {
			out = append(out, b)
		}
	}
	return out
}
