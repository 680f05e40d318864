package ollamaflow

import (
	"math/rand/v2"
	"sort"
	"sync/atomic"
)

// Large pools. Routing one request walked the frontend's servers several
// times (the candidate filter, the busy filter, the room filter, the
// policy's comparison): at 1,000 servers each walk costs microseconds, and
// the routing cost grew with the pool. Above largePool candidates:
//   - the candidate filter's answer is kept per kind and labels, and
//     computed again only when a server's health or drain changes
//     (servingGeneration) or the pool does;
//   - the busy filter is free while no server has backed off lately;
//   - a pick does not test every candidate for room: first walks in config
//     order to the first server with room; round_robin and random choose by
//     weight over all candidates (prefix sums kept per list) and walk on to
//     the next one with room; least_conn and least_delay compare a sample
//     of the servers with room: the last winners (leaders), servers with
//     the request's model loaded (from the model index) and random others.
//     Comparing a few random servers and keeping the best is "the power of
//     d choices": the busiest server stays within a small constant of the
//     average, and remembering the last winners keeps a few fast servers
//     among many slow ones in every comparison once one sample found them.
//
// When the sample holds no server with room (the pool is nearly full), the
// request falls back to the full walk, which decides whether it queues.

const (
	largePool    = 64 // candidates above which routing samples
	sampleLeader = 4  // last winners compared again
	sampleWarm   = 8  // servers with the model loaded, at random
	sampleRandom = 8  // other candidates, at random

	sampleSize = sampleLeader + sampleWarm + sampleRandom
)

// servingGeneration changes whenever a server's health state or drain
// flag does, which is all the candidate filter reads that can change
// without a new pool or config.
var servingGeneration atomic.Uint64

// backOffUntil is the latest end, in Unix nanoseconds, of any server's
// back-off after a 503 "server busy": before it, notBusy has to look.
var backOffUntil atomic.Int64

func noteBackOff(until int64) {
	for {
		cur := backOffUntil.Load()
		if until <= cur || backOffUntil.CompareAndSwap(cur, until) {
			return
		}
	}
}

// candidateCache is the candidate filter's answer for one kind and label
// set over one pool, valid while servingGeneration is gen.
type candidateCache struct {
	gen    uint64
	pool   []*backend
	labels []string
	list   []*backend
}

// cachedCandidates returns the kept answer for kind and labels over pool,
// or nil.
func (h *Handler) cachedCandidates(pool []*backend, kind routeKind, labels []string, gen uint64) []*backend {
	if int(kind) >= len(h.candCache) {
		return nil
	}
	c := h.candCache[kind].Load()
	if c == nil || c.gen != gen || !sameList(c.pool, pool) || !sameStrings(c.labels, labels) {
		return nil
	}
	return c.list
}

func (h *Handler) keepCandidates(pool []*backend, kind routeKind, labels []string, gen uint64, list []*backend) {
	if int(kind) < len(h.candCache) {
		h.candCache[kind].Store(&candidateCache{gen: gen, pool: pool, labels: append([]string(nil), labels...), list: list})
	}
}

func sameStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// listInfo is what a pick over a large list needs to know of the list
// itself, computed once per list: which pool positions it holds (for
// testing a leader or a warm server for membership) and its weights'
// prefix sums (for round_robin and random).
type listInfo struct {
	list    []*backend
	pool    []*backend
	members []uint64 // bit i: pool[i] is in list
	prefix  []uint64 // prefix[i]: the weights of list[:i+1]
	uniform bool     // every weight is the same
}

// infoOf returns list's listInfo, computing it when list is not the one
// seen last (the lists of the common path are kept: see candidateCache
// and the model index).
func (h *Handler) infoOf(list []*backend) *listInfo {
	pool := h.pool()
	if li := h.listInfo.Load(); li != nil && sameList(li.list, list) && sameList(li.pool, pool) {
		return li
	}
	li := &listInfo{list: list, pool: pool, members: make([]uint64, (len(pool)+63)/64), prefix: make([]uint64, len(list)), uniform: true}
	var total uint64
	for i, b := range list {
		if p := int(b.pos.Load()); p < len(pool) && pool[p] == b {
			li.members[p/64] |= 1 << (p % 64)
		}
		w := b.weight()
		total += w
		li.prefix[i] = total
		li.uniform = li.uniform && w == list[0].weight()
	}
	h.listInfo.Store(li)
	return li
}

// has reports whether b is in the list.
func (li *listInfo) has(b *backend) bool {
	p := int(b.pos.Load())
	return p < len(li.pool) && li.pool[p] == b && li.members[p/64]&(1<<(p%64)) != 0
}

// byWeight returns the index of the backend whose cumulative weight range
// holds x, x below the total.
func (li *listInfo) byWeight(x uint64) int {
	if li.uniform {
		return int(x / li.list[0].weight())
	}
	return sort.Search(len(li.prefix), func(i int) bool { return li.prefix[i] > x })
}

func (li *listInfo) total() uint64 { return li.prefix[len(li.prefix)-1] }

// acquireLarge is acquire for more than largePool candidates. ok false:
// no server with room was found this way, and the full walk decides.
func (h *Handler) acquireLarge(cands []*backend, j *job) (b *backend, ok bool) {
	switch h.LBPolicy {
	case "first":
		for _, b := range cands {
			if b.free() && b.tryAcquire() {
				return b, true
			}
		}
		return nil, false
	case "round_robin", "random":
		li := h.infoOf(cands)
		var x uint64
		if h.LBPolicy == "random" {
			x = rand.Uint64N(li.total())
		} else {
			x = (atomic.AddUint64(&h.rrCounter, 1) - 1) % li.total()
		}
		start := li.byWeight(x)
		for i := range cands {
			if b := cands[(start+i)%len(cands)]; b.free() && b.tryAcquire() {
				return b, true
			}
		}
		return nil, false
	}
	var buf [sampleSize]*backend
	sample := h.sample(buf[:0], cands, j)
	if len(sample) == 0 {
		return nil, false
	}
	if b = h.takeSampled(sample, j); b == nil {
		return nil, false
	}
	h.leaders[atomic.AddUint64(&h.leaderNext, 1)%sampleLeader].Store(b)
	return b, true
}

// takeSampled is take over a sample. It calls the comparing policy by
// name rather than through h.policy, so the sample stays on the caller's
// stack: a call through a function value lets it escape, and a heap
// sample was a third of a pick's cost at 1,000 servers.
func (h *Handler) takeSampled(sample []*backend, j *job) *backend {
	if j == nil {
		j = &job{}
	}
	for len(sample) > 0 {
		var b *backend
		if h.LBPolicy == "least_delay" {
			b = pickLeastDelay(h, sample, j)
		} else { // least_conn: acquireLarge handles the others
			b = pickLeastConn(h, sample, j)
		}
		if b == nil {
			return nil // the policy holds the request back: it waits in the queue
		}
		if b.tryAcquire() {
			return b
		}
		sample = without(sample, b)
	}
	return nil
}

// sample collects into out the candidates a comparing policy looks at:
// the last winners, up to sampleWarm servers with the model loaded and
// sampleRandom others, each once and each with room.
func (h *Handler) sample(out, cands []*backend, j *job) []*backend {
	li := h.infoOf(cands)
	intN := rand.IntN
	if h.sampleRand != nil {
		intN = h.sampleRand.IntN
	}
	for i := range h.leaders {
		if b := h.leaders[i].Load(); b != nil && li.has(b) {
			out = addSampled(out, b)
		}
	}
	if j != nil && j.model != "" {
		if e, _ := h.holders(j.model); e != nil && len(e.warm) > 0 {
			for range min(sampleWarm, len(e.warm)) {
				if b := e.warm[intN(len(e.warm))]; li.has(b) {
					out = addSampled(out, b)
				}
			}
		}
	}
	for range sampleRandom {
		out = addSampled(out, cands[intN(len(cands))])
	}
	return out
}

// addSampled appends b to out unless it has no room or is there already.
// out never outgrows sampleSize, so a caller's array holds it.
func addSampled(out []*backend, b *backend) []*backend {
	if b == nil || len(out) == cap(out) || !b.free() {
		return out
	}
	for _, s := range out {
		if s == b {
			return out
		}
	}
	return append(out, b)
}
