package ollamaflow

import (
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"time"

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
func (b *backend) settings(logger *zap.Logger) *serverSettings {
	u := *b.base
	u.Path = b.base.Path + b.cfg.HealthURI
	u.RawQuery = b.query
	return &serverSettings{
		name:          b.cfg.Name,
		probeURL:      u.String(),
		probeMethod:   b.cfg.HealthMethod,
		expectStatus:  b.cfg.HealthStatus,
		interval:      time.Duration(b.cfg.HealthInterval),
		timeout:       time.Duration(b.cfg.HealthTimeout),
		passes:        b.cfg.HealthPasses,
		fails:         b.cfg.HealthFails,
		failThreshold: b.cfg.FailThreshold,
		header:        b.header,
		query:         b.query,
		modelRefresh:  time.Duration(b.cfg.ModelRefresh),
		pullConc:      b.cfg.PullConcurrency,
		logger:        logger,
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

// hasRoom reports whether the backend is below its max_parallel cap.
func (b *backend) hasRoom() bool {
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
		if b.cfg.Disabled {
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
		return nil, &noCandidate{"every backend of this frontend is disabled"}
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

// pickLeastConn prefers backends where the model is loaded (a cold load
// costs seconds), then takes the lowest in-flight / capacity (capacity is
// max_parallel, or the weight when uncapped), then the higher weight, and
// breaks remaining ties round-robin so equal servers share the load.
func pickLeastConn(h *Handler, avail []*backend, model string) *backend {
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
