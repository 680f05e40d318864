package ollamaflow

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// backend is a frontend's view of one server: its config, pre-parsed, and a
// pointer to the shared live state.
type backend struct {
	cfg        *Backend
	base       *url.URL
	srv        *server
	labels     map[string]struct{}
	allowEmbed bool
	allowCompl bool
	header     http.Header // bearer token and configured headers, set on every call
	query      string      // encoded, appended to every backend URL
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
// max_parallel cap, and still healthy and not draining (a queued request
// chose its candidates a while ago).
func (b *backend) hasRoom() bool {
	if b.srv.draining.Load() || !b.srv.healthy() {
		return false
	}
	return b.cfg.MaxParallel <= 0 || b.srv.inFlight.Load() < int64(b.cfg.MaxParallel)
}

// noCandidate explains why a request found no backend; the handler turns it
// into a 503 naming what is missing.
type noCandidate struct{ msg string }

// candidates filters the frontend's backends down to those that may serve
// a request of kind requiring labels. Filters run from the static to the
// live, so the explanation names the first requirement nobody meets.
func (h *Handler) candidates(kind routeKind, labels []string) ([]*backend, *noCandidate) {
	var out []*backend
	var enabled, typed, labelled int
	for _, b := range h.backends {
		if b.cfg.Disabled || b.srv.draining.Load() {
			continue
		}
		enabled++
		if !b.allows(kind) {
			continue
		}
		typed++
		if !b.carries(labels) {
			continue
		}
		labelled++
		if !b.srv.healthy() {
			continue
		}
		out = append(out, b)
	}
	if len(out) > 0 {
		return out, nil
	}
	switch {
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

// selectionPolicy picks one backend among avail, which is never empty and
// holds only backends with room, for a request about model (normalised,
// or "" when the request names none).
type selectionPolicy func(h *Handler, avail []*backend, model string) *backend

var policies = map[string]selectionPolicy{
	"least_delay": pickLeastDelay,
	"least_conn":  pickLeastConn,
	"round_robin": pickRoundRobin,
	"random":      pickRandom,
	"first":       pickFirst,
}

func policyNames() string {
	names := make([]string, 0, len(policies))
	for n := range policies {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// acquire picks a backend with the frontend's policy and takes a slot on
// it. It returns nil if every candidate is at its cap. A slot lost to a
// concurrent request drops that backend and picks again.
func (h *Handler) acquire(cands []*backend, model string) *backend {
	var avail []*backend
	for _, b := range cands {
		if b.hasRoom() {
			avail = append(avail, b)
		}
	}
	for len(avail) > 0 {
		b := h.policy(h, avail, model)
		if b == nil {
			return nil // the policy holds the request back: it waits in the queue
		}
		if b.srv.tryAcquire(b.cfg.MaxParallel) {
			return b
		}
		avail = without(avail, b)
	}
	return nil
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

// pickLeastConn avoids backends that have been failing (a server that
// answers errors fast looks idle, and would otherwise attract the most
// traffic until its breaker opens), prefers backends where the model is
// loaded (a cold load costs seconds), then takes the lowest in-flight /
// capacity (capacity is max_parallel, or the weight when uncapped), then
// the higher weight, and breaks remaining ties round-robin so equal servers
// share the load.
func pickLeastConn(h *Handler, avail []*backend, model string) *backend {
	avail = leastFailing(avail)
	if model != "" {
		if warm := loadedOn(avail, model); len(warm) > 0 {
			avail = warm
		}
	}
	var ties []*backend
	var bestLoad, bestCap int64
	var bestWeight int
	for _, b := range avail {
		load := b.srv.inFlight.Load()
		capacity := int64(b.cfg.MaxParallel)
		if capacity <= 0 {
			capacity = int64(b.cfg.Weight)
		}
		if len(ties) == 0 {
			ties, bestLoad, bestCap, bestWeight = append(ties, b), load, capacity, b.cfg.Weight
			continue
		}
		// load/capacity compared without division.
		lhs, rhs := load*bestCap, bestLoad*capacity
		switch {
		case lhs < rhs, lhs == rhs && b.cfg.Weight > bestWeight:
			ties, bestLoad, bestCap, bestWeight = append(ties[:0], b), load, capacity, b.cfg.Weight
		case lhs == rhs && b.cfg.Weight == bestWeight:
			ties = append(ties, b)
		}
	}
	if len(ties) == 1 {
		return ties[0]
	}
	n := atomic.AddUint64(&h.rrCounter, 1)
	return ties[n%uint64(len(ties))]
}

// leastFailing keeps the backends with the shortest run of consecutive
// failures; when none is failing (the common case) it returns list as is.
func leastFailing(list []*backend) []*backend {
	fewest, count := int32(math.MaxInt32), 0
	for _, b := range list {
		switch f := b.srv.failStreak.Load(); {
		case f < fewest:
			fewest, count = f, 1
		case f == fewest:
			count++
		}
	}
	if count == len(list) {
		return list
	}
	out := make([]*backend, 0, count)
	for _, b := range list {
		if b.srv.failStreak.Load() == fewest {
			out = append(out, b)
		}
	}
	if len(out) == 0 { // the streaks moved under us
		return list
	}
	return out
}

func loadedOn(list []*backend, model string) []*backend {
	var out []*backend
	for _, b := range list {
		if b.srv.models.Load().isLoaded(model) {
			out = append(out, b)
		}
	}
	return out
}

// pickRoundRobin walks the candidates in turn, each weight times per cycle.
func pickRoundRobin(h *Handler, avail []*backend, _ string) *backend {
	n := atomic.AddUint64(&h.rrCounter, 1) - 1
	return byWeight(avail, int(n%uint64(totalWeight(avail))))
}

// pickRandom picks at random, in proportion to weight.
func pickRandom(_ *Handler, avail []*backend, _ string) *backend {
	return byWeight(avail, rand.IntN(totalWeight(avail)))
}

// pickFirst takes the first candidate in config order.
func pickFirst(_ *Handler, avail []*backend, _ string) *backend {
	return avail[0]
}

func totalWeight(list []*backend) int {
	total := 0
	for _, b := range list {
		total += b.cfg.Weight
	}
	return total
}

// byWeight returns the backend whose cumulative weight range holds x.
func byWeight(list []*backend, x int) *backend {
	for _, b := range list {
		if x < b.cfg.Weight {
			return b
		}
		x -= b.cfg.Weight
	}
	return list[len(list)-1]
}

// stickyKey is the session key of a request: the first non-empty
// configured header, else the client IP when client_ip is on (Caddy's
// client_ip, which honours trusted_proxies). "" means no stickiness.
func (h *Handler) stickyKey(r *http.Request) string {
	if h.Sticky == nil {
		return ""
	}
	for _, name := range h.Sticky.Headers {
		if v := strings.TrimSpace(r.Header.Get(name)); v != "" {
			return "h:" + v
		}
	}
	if h.Sticky.ClientIP {
		if ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ip != "" {
			return "ip:" + ip
		}
	}
	return ""
}

// rendezvous picks the backend with the highest weighted rendezvous score
// for key. Every Caddy instance with the same config computes the same
// answer without sharing state, and removing a backend moves only the keys
// it held: every other key's top score is unchanged.
func rendezvous(list []*backend, key string) *backend {
	var best *backend
	bestScore := math.Inf(-1)
	for _, b := range list {
		// Weighted rendezvous: -weight / ln(u), u uniform in (0,1).
		u := (float64(mix64(fnv64(key, b.base.String()))) + 0.5) / (1 << 64)
		score := -float64(b.cfg.Weight) / math.Log(u)
		if score > bestScore {
			best, bestScore = b, score
		}
	}
	return best
}

// fnv64 hashes key and id with FNV-1a, a separator between them.
func fnv64(key, id string) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * prime
	}
	h = (h ^ 0xff) * prime
	for i := 0; i < len(id); i++ {
		h = (h ^ uint64(id[i])) * prime
	}
	return h
}

// mix64 is SplitMix64's finaliser: FNV alone spreads similar strings
// poorly in its high bits.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Values of the X-OllamaFlow-Sticky response header.
const (
	stickyHit      = "hit"      // the session's server took it
	stickyOverflow = "overflow" // the session's server was at its cap: normal selection
	stickyNone     = "none"     // no session key
)

// acquireSticky takes a slot on the session's server if it has room; else
// it falls back to the policy.
func (h *Handler) acquireSticky(avail []*backend, key, model string) (*backend, string) {
	if key == "" {
		return h.acquire(avail, model), stickyNone
	}
	if b := rendezvous(avail, key); b.hasRoom() && b.srv.tryAcquire(b.cfg.MaxParallel) {
		return b, stickyHit
	}
	return h.acquire(avail, model), stickyOverflow
}

// queue holds a frontend's requests that found every candidate at its
// max_parallel cap, first come first served. A slot freed on any server
// the frontend uses is handed to the oldest waiter that can use it, at once:
// there is no polling.
type queue struct {
	h       *Handler
	mu      sync.Mutex
	waiters []*waiter
	waiting atomic.Int64 // len(waiters), readable without the lock
	closed  bool         // the handler is cleaned up: leave servers once empty
	wakeSet atomic.Bool  // a wakeAt timer is pending

	// For the admin API: requests that waited, their total and longest wait.
	waited, waitedNanos, longestNanos atomic.Int64
}

// wakeAt makes the queue try its waiters again at t even if no slot frees:
// for a policy that holds requests back until then. One timer at a time; it
// never takes q.mu, so a policy may call it from dispatch.
func (q *queue) wakeAt(t time.Time) {
	if q.wakeSet.CompareAndSwap(false, true) {
		time.AfterFunc(time.Until(t), func() {
			q.wakeSet.Store(false)
			q.dispatch()
		})
	}
}

type waiter struct {
	cands []*backend
	model string
	got   chan *backend // receives the backend whose slot it was given
}

// errQueueFull and errQueueTimeout are the two ways a wait ends without a
// slot (besides the client leaving).
var (
	errQueueFull    = errors.New("queue full")
	errQueueTimeout = errors.New("queue wait expired")
)

// wait takes a slot on one of cands, queueing if every one is at its cap,
// until queue_timeout or the client goes away.
func (q *queue) wait(ctx context.Context, cands []*backend, model string) (*backend, time.Duration, error) {
	start := time.Now()
	q.mu.Lock()
	// Try again under the lock: a slot freed since the caller's attempt
	// is either seen here or dispatched to us once we are queued.
	if len(q.waiters) == 0 {
		if b := q.h.acquire(cands, model); b != nil {
			q.mu.Unlock()
			return b, 0, nil
		}
	}
	if len(q.waiters) >= q.h.maxQueue {
		q.mu.Unlock()
		return nil, 0, errQueueFull
	}
	w := &waiter{cands: cands, model: model, got: make(chan *backend, 1)}
	q.waiters = append(q.waiters, w)
	q.waiting.Add(1)
	q.mu.Unlock()
	q.dispatch() // a slot may have freed between the try and the append

	timer := time.NewTimer(time.Duration(q.h.QueueTimeout))
	defer timer.Stop()
	select {
	case b := <-w.got:
		q.noteWait(time.Since(start))
		return b, time.Since(start), nil
	case <-ctx.Done():
		return q.leave(w, start, ctx.Err())
	case <-timer.C:
		return q.leave(w, start, errQueueTimeout)
	}
}

func (q *queue) noteWait(d time.Duration) {
	q.waited.Add(1)
	q.waitedNanos.Add(int64(d))
	for {
		cur := q.longestNanos.Load()
		if int64(d) <= cur || q.longestNanos.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

// leave takes w out of the queue. If a slot was handed to it in the
// meantime, the slot is given back.
func (q *queue) leave(w *waiter, start time.Time, why error) (*backend, time.Duration, error) {
	q.mu.Lock()
	for i, o := range q.waiters {
		if o == w {
			q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
			q.waiting.Add(-1)
			break
		}
	}
	q.mu.Unlock()
	select {
	case b := <-w.got:
		b.srv.release()
	default:
	}
	q.leaveServersIfDone()
	q.noteWait(time.Since(start))
	return nil, time.Since(start), why
}

// dispatch hands free slots to waiters in arrival order.
func (q *queue) dispatch() {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	for i := 0; i < len(q.waiters); {
		w := q.waiters[i]
		b := q.h.acquire(w.cands, w.model)
		if b == nil {
			i++
			continue
		}
		q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
		q.waiting.Add(-1)
		w.got <- b
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// waitingFor counts the waiting requests that could use s.
func (q *queue) waitingFor(s *server) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, w := range q.waiters {
		for _, b := range w.cands {
			if b.srv == s {
				n++
				break
			}
		}
	}
	return n
}

// length is the number of waiting requests.
func (q *queue) length() int { return int(q.waiting.Load()) }

// close is called at Cleanup: a reload must not strand the requests still
// queued in the old config, so the queue keeps listening until it is empty.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.leaveServersIfDone()
}

func (q *queue) leaveServersIfDone() {
	q.mu.Lock()
	done := q.closed && len(q.waiters) == 0
	q.mu.Unlock()
	if done {
		for _, b := range q.h.backends {
			b.srv.removeQueue(q)
		}
	}
}

// speed is what a server has been observed to deliver, for least_delay:
// its service time with a free slot, how many requests it serves at once
// before they start to wait inside it, and what a cold model load costs.
// It lives on the shared server, so it survives reloads.
type speed struct {
	mu          sync.Mutex
	samples     int
	service     float64 // seconds, EWMA, for requests that had a slot
	slots       int     // learned parallel capacity, at least 1
	coldLoad    float64 // seconds, EWMA of load_duration when a model was loaded
	coldSamples int
	probing     time.Time // when least_delay first sent it a request, before any sample
}

// startProbe notes that a request is going to a server not observed yet.
func (sp *speed) startProbe(now time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 && sp.probing.IsZero() {
		sp.probing = now
	}
}

// probingSince is when the server's first request went out, zero if none
// did or it has been observed.
func (sp *speed) probingSince() time.Time {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples > 0 {
		return time.Time{}
	}
	return sp.probing
}

const (
	speedAlpha       = 0.2 // EWMA weight of a new sample
	coldLoadPrior    = 2.0 // seconds assumed for a model load before one is seen
	slotGrowSlack    = 1.5 // served k at once within this × service: it has k slots
	slotShrinkFactor = 2.0 // took this × service with a slot "free": fewer slots
)

// observe records a request that took d, which had k requests in flight on
// the server (itself included) when it started.
func (sp *speed) observe(d time.Duration, k int) {
	sec := d.Seconds()
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 {
		sp.samples, sp.service, sp.slots = 1, sec, 1
		if k > 1 && sec > 0 {
			// Its first answer came with others in flight: a lower
			// bound on its slots, corrected by later samples.
			sp.slots = k
		}
		return
	}
	sp.samples++
	switch {
	case k > sp.slots && sec <= slotGrowSlack*sp.service:
		sp.slots = k // it served k at once without slowing down
	case k > 1 && k <= sp.slots && sec > slotShrinkFactor*sp.service:
		sp.slots = k - 1 // it made this one wait: it has fewer slots
	case k <= sp.slots:
		sp.service += speedAlpha * (sec - sp.service)
	}
}

// coldCost is what a model load is expected to cost on the server, in
// seconds: learned, or the prior.
func (sp *speed) coldCost() float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.coldSamples > 0 {
		return sp.coldLoad
	}
	return coldLoadPrior
}

// observeLoad records a model load that took d.
func (sp *speed) observeLoad(d time.Duration) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.coldSamples == 0 {
		sp.coldLoad = d.Seconds()
	} else {
		sp.coldLoad += speedAlpha * (d.Seconds() - sp.coldLoad)
	}
	sp.coldSamples++
}

// expectedDelay is the time a new request would take on the server with
// inFlight requests already there and slots parallel slots (0: learned),
// adding a cold load when cold. ok is false without observations.
func (sp *speed) expectedDelay(inFlight int64, slots int, cold bool) (float64, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 {
		return 0, false
	}
	if slots <= 0 {
		slots = sp.slots
	}
	rounds := (inFlight + int64(slots)) / int64(slots) // ceil((inFlight+1)/slots)
	delay := sp.service * float64(rounds)
	if cold {
		if sp.coldSamples > 0 {
			delay += sp.coldLoad
		} else {
			delay += coldLoadPrior
		}
	}
	return delay, true
}

// bootstrapHold bounds how long least_delay holds requests back while it
// knows the speed of no candidate.
const bootstrapHold = time.Second

// pickLeastDelay takes the backend with the shortest expected completion
// time: the work already on it over its slots, times the service time it
// has been seen to deliver, plus a cold-load penalty where the model is not
// loaded. A slow server that merely looks idle does not win against a fast
// one with free slots.
//
// A server it has not observed yet is measured with one request at a time
// (or up to its max_parallel, slots it is known to have): it gets a request
// whenever it has room for one, and none beyond. When every candidate is
// being measured (a fresh pool, a burst), the
// request waits in the queue for the first answer, which comes from the
// fastest server, instead of piling onto servers of unknown speed; after
// bootstrapHold without an answer it falls back to least_conn.
func pickLeastDelay(h *Handler, avail []*backend, model string) *backend {
	avail = leastFailing(avail)
	var ties, unobserved []*backend
	best := math.Inf(1)
	for _, b := range avail {
		d, ok := b.srv.speed.expectedDelay(b.srv.inFlight.Load(), b.cfg.MaxParallel, coldFor(b, model))
		if !ok {
			unobserved = append(unobserved, b)
			continue
		}
		d /= float64(b.cfg.Weight)
		switch {
		case d < best*(1-1e-9):
			best, ties = d, append(ties[:0], b)
		case d <= best*(1+1e-9):
			ties = append(ties, b)
		}
	}
	// An unobserved server is measured with one request at a time (or up
	// to its max_parallel, slots it is known to have), unless it is cold
	// for the model and a model load alone would take longer than the best
	// observed choice.
	var explore []*backend
	var oldestProbe time.Time
	for _, b := range unobserved {
		if b.srv.inFlight.Load() >= int64(max(b.cfg.MaxParallel, 1)) {
			if p := b.srv.speed.probingSince(); !p.IsZero() && (oldestProbe.IsZero() || p.Before(oldestProbe)) {
				oldestProbe = p
			}
			continue
		}
		if coldFor(b, model) && b.srv.speed.coldCost() >= best {
			continue
		}
		explore = append(explore, b)
	}
	switch {
	case len(explore) > 0:
		b := pickLeastConn(h, explore, model)
		b.srv.speed.startProbe(time.Now())
		return b
	case len(ties) == 1:
		return ties[0]
	case len(ties) > 1:
		n := atomic.AddUint64(&h.rrCounter, 1)
		return ties[n%uint64(len(ties))]
	case len(avail) == 1:
		return avail[0] // nothing to choose between: no point waiting
	}
	// Every candidate is unobserved and busy being measured.
	if !oldestProbe.IsZero() && time.Since(oldestProbe) < bootstrapHold && h.queue != nil {
		h.queue.wakeAt(oldestProbe.Add(bootstrapHold))
		return nil
	}
	return pickLeastConn(h, avail, model)
}

// coldFor reports whether model is known not to be loaded on b.
func coldFor(b *backend, model string) bool {
	return model != "" && !b.srv.models.Load().isLoaded(model)
}
