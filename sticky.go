package ollamaflow

import (
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Sticky sessions: a session key (a header, or the client IP) hashed onto
// the same server by every instance with the same config (rendezvous
// hashing), and the first attempt's choice between the session's server,
// the conversation's (convroute.go) and the policy's.

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
//
// The server's half of the hash is computed once per backend view, so a
// pick costs one mix per candidate, not a hash of the server's URL, and a
// logarithm only when weights differ: with equal weights the score grows
// with u, so the highest u wins (the same server).
func rendezvous(list []*backend, key string) *backend {
	if len(list) == 0 {
		return nil
	}
	hk := fnv64(key)
	w0 := list[0].weight()
	var best *backend
	bestU := -1.0
	for _, b := range list {
		if b.weight() != w0 {
			return rendezvousWeighted(list, hk)
		}
		if u := (float64(mix64(hk^b.idHash)) + 0.5) / (1 << 64); u > bestU {
			best, bestU = b, u
		}
	}
	return best
}

// rendezvousWeighted is rendezvous over servers of different weights.
// A server of weight w beats the best score S only if its u exceeds
// exp(-w/S); that bound, kept for a few weights until S changes, spares
// the logarithm for nearly every server. A u near the bound gets its exact
// score, so the pick is the one the scores alone make.
func rendezvousWeighted(list []*backend, hk uint64) *backend {
	var best *backend
	bestScore := math.Inf(-1)
	var bounds [4]struct {
		w     uint64
		bound float64
	}
	kept := 0
	for _, b := range list {
		// Weighted rendezvous: -weight / ln(u), u uniform in (0,1).
		u := (float64(mix64(hk^b.idHash)) + 0.5) / (1 << 64)
		w := b.weight()
		if best != nil {
			bound := -1.0
			for i := range min(kept, len(bounds)) {
				if bounds[i].w == w {
					bound = bounds[i].bound
					break
				}
			}
			if bound < 0 {
				bound = math.Exp(-float64(w) / bestScore)
				bounds[kept%len(bounds)].w, bounds[kept%len(bounds)].bound = w, bound
				kept++
			}
			if u < bound*(1-1e-9) {
				continue
			}
		}
		score := -float64(w) / math.Log(u)
		if score > bestScore {
			best, bestScore, kept = b, score, 0
		}
	}
	return best
}

// fnv64 hashes s with FNV-1a.
func fnv64(s string) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for i := 0; i < len(s); i++ {
		h = (h ^ uint64(s[i])) * prime
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

// acquireFirst takes a slot for a request's first attempt: on the
// session's server when sticky sessions are on and the request carries a
// key (sticky wins over affinity: the operator asked for it), else on the
// conversation's server (affinity.go), else where the policy says. It
// returns X-OllamaFlow-Sticky's value ("" without sticky sessions),
// X-OllamaFlow-Route's and the conversation's id (0: new, or not looked
// up). A nil backend means the request queues.
func (h *Handler) acquireFirst(r *http.Request, avail []*backend, conv conversation, j *job) (b *backend, sticky, route string, id uint64) {
	if j != nil {
		j.cands = avail
	}
	if h.Sticky != nil {
		if key := h.stickyKey(r); key != "" {
			b, sticky = h.acquireSticky(avail, key, j)
			route = routeStickyHit
			if sticky == stickyOverflow {
				route = routeStickyOverflow
			}
			return b, sticky, route, 0
		}
		sticky = stickyNone
	}
	if h.LBPolicy == "least_delay" && j != nil {
		// A model short of copies for its share of the requests takes
		// one before affinity or spreading narrow the choice to servers
		// that hold it (placementMove).
		if b := h.placementMove(filterBackends(avail, (*backend).free), j, time.Now()); b != nil && !h.claimLoadCopy(b, j) && b.tryAcquire() {
			h.planLoad(b, j)
			return b, sticky, routePolicy, 0
		}
	}
	b, route, id = h.acquireConversation(avail, conv, j)
	return b, sticky, route, id
}

// acquireSticky takes a slot on the session's server if it has room; else
// it falls back to the policy.
func (h *Handler) acquireSticky(avail []*backend, key string, j *job) (*backend, string) {
	if key == "" {
		return h.acquire(avail, j), stickyNone
	}
	avail = h.exactCandidates(avail, j) // hashing walks every candidate anyway
	if b := rendezvous(avail, key); b.hasRoom() && b.srv.queued.Load() == 0 && b.tryAcquire() {
		return b, stickyHit
	}
	return h.acquire(avail, j), stickyOverflow
}
