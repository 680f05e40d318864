package ollamaflow

import (
	"math/rand/v2"
	"sort"
	"sync/atomic"
	"time"
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
	tier    atomic.Pointer[tierList]
	keys    atomic.Pointer[map[string]*backend] // by server key, built when asked
}

// listInfoKept is how many lists' listInfo a frontend keeps: one per
// model in recent requests (each model's holders are a list of their own).
const listInfoKept = 8

// infoOf returns list's listInfo, computing it when list is not one of
// those seen lately (the lists of the common path are kept: see
// candidateCache and the model index).
func (h *Handler) infoOf(list []*backend) *listInfo {
	pool := h.pool()
	for i := range h.listInfo {
		if li := h.listInfo[i].Load(); li != nil && sameList(li.list, list) && sameList(li.pool, pool) {
			return li
		}
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
	h.listInfo[atomic.AddUint64(&h.listInfoNext, 1)%listInfoKept].Store(li)
	return li
}

// firstTier is firstTier(list) kept with list's listInfo until a server's
// health or drain changes or the members do: O(1) per request instead of
// a walk when SRV priorities tier the pool.
func (h *Handler) firstTierKept(list []*backend) []*backend {
	if m := h.members.Load(); m == nil || !m.tiered {
		return list
	}
	li := h.infoOf(list)
	gen, m := servingGeneration.Load(), h.members.Load()
	if t := li.tier.Load(); t != nil && t.gen == gen && t.members == m {
		return t.list
	}
	t := &tierList{gen: gen, members: m, list: h.firstTier(list)}
	li.tier.Store(t)
	return t.list
}

// tierList is firstTier's answer for a list while servingGeneration is gen
// and the frontend's members are members.
type tierList struct {
	gen     uint64
	members *memberSet
	list    []*backend
}

// byKey returns the backend of list whose server is key, or nil.
func (li *listInfo) byKey(key string) *backend {
	m := li.keys.Load()
	if m == nil {
		built := make(map[string]*backend, len(li.list))
		for _, b := range li.list {
			built[b.srv.key] = b
		}
		m = &built
		li.keys.Store(m)
	}
	return (*m)[key]
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
	if j == nil {
		j = &job{}
	}
	switch h.LBPolicy {
	case "first":
		for _, b := range cands {
			if b.free() && !j.avoid.skips(b) && b.tryAcquire() {
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
			if b := cands[(start+i)%len(cands)]; b.free() && !j.avoid.skips(b) && b.tryAcquire() {
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
		h.planLoad(b, j)
		return b
	}
	return h.take(without(sample, b), j) // a slot lost to a concurrent request
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
	var avoid *avoidance
	if j != nil {
		avoid = &j.avoid
	}
	for i := range h.leaders {
		if b := h.leaders[i].Load(); b != nil && li.has(b) {
			out = addSampled(out, b, avoid)
		}
	}
	if j != nil && j.model != "" {
		if e, _ := h.holders(j.model); e != nil && len(e.warm) > 0 {
			for range min(sampleWarm, len(e.warm)) {
				if b := e.warm[intN(len(e.warm))]; li.has(b) {
					out = addSampled(out, b, avoid)
				}
			}
		}
	}
	for range sampleRandom {
		out = addSampled(out, cands[intN(len(cands))], avoid)
	}
	return out
}

// addSampled appends b to out unless it has no room, the request passes
// it over, or it is there already. out never outgrows its capacity, so a
// caller's array holds it.
func addSampled(out []*backend, b *backend, avoid *avoidance) []*backend {
	if b == nil || len(out) == cap(out) || !b.free() || avoid.skips(b) {
		return out
	}
	for _, s := range out {
		if s == b {
			return out
		}
	}
	return append(out, b)
}

// avoidance is what an attempt above largePool passes over without copying
// its candidates: the servers the request already tried (a retry) and,
// while some server backs off after a 503, those backing off. The sampled
// and walking picks skip them one by one; a request they leave without a
// server falls back to the exact lists (exclude, notBusy, firstTier), as a
// small pool computes them.
type avoidance struct {
	tried    []*backend
	now      int64 // Unix nanoseconds: the job stays small
	on, busy bool  // busy: now is before backOffUntil, look at each server
}

// skips reports whether the attempt passes b over. A nil or unset
// avoidance passes nothing over.
func (a *avoidance) skips(b *backend) bool {
	if a == nil || !a.on {
		return false
	}
	for _, t := range a.tried {
		if t == b {
			return true
		}
	}
	return a.busy && b.srv.backingOff(time.Unix(0, a.now))
}

// attemptCandidates returns the candidates an attempt chooses among and
// how many servers remain untried. Up to largePool it builds them as
// before: cands less the servers tried, less those backing off (unless
// none would be left), of the lowest SRV tier that can serve. Above it,
// that would be three walks of the pool per attempt, so it returns cands
// whole and j carries what to pass over (O(tried) per attempt); the
// lowest tier is kept per list (firstTierKept).
func (h *Handler) attemptCandidates(cands, tried []*backend, j *job) ([]*backend, int) {
	now := time.Now()
	if len(cands) <= largePool {
		j.avoid = avoidance{}
		remaining := cands
		if len(tried) > 0 {
			remaining = exclude(cands, tried)
		}
		return h.firstTier(notBusy(remaining, now)), len(remaining)
	}
	li := h.infoOf(cands)
	n := len(cands)
	for _, b := range tried {
		if li.has(b) {
			n--
		}
	}
	j.avoid = avoidance{on: true, tried: tried, now: now.UnixNano(), busy: now.UnixNano() < backOffUntil.Load()}
	return cands, n
}

// exactCandidates turns an attempt's lazy candidates into the list a small
// pool would have built (see attemptCandidates) and clears j's avoidance:
// for the paths that walk every candidate anyway (sticky hashing, the
// fallback when no sample had room, the queue).
func (h *Handler) exactCandidates(avail []*backend, j *job) []*backend {
	if j == nil || !j.avoid.on {
		return avail
	}
	a := j.avoid
	j.avoid = avoidance{}
	if len(a.tried) > 0 {
		avail = exclude(avail, a.tried)
	}
	return h.firstTier(notBusy(avail, time.Unix(0, a.now)))
}

// largeWalks counts walks over more than largePool servers on a request's
// path (exclude, notBusy, firstTier, the full pick, affinity's
// comparisons): the sampled paths make none, and tests count them.
var largeWalks atomic.Uint64

func noteWalk(list []*backend) {
	if len(list) > largePool {
		largeWalks.Add(1)
	}
}

// sampled returns list up to largePool; above it, a sample of the
// servers of its lowest SRV tier that the request does not pass over,
// with must's server (a conversation's) among them when list holds it and
// it has room. For comparisons outside the policy (affinity.go) that would
// otherwise estimate every server.
func (h *Handler) sampled(buf, list []*backend, j *job, must string) []*backend {
	if len(list) <= largePool {
		return list
	}
	if j == nil {
		j = &job{}
	}
	list = h.firstTierKept(list)
	if must != "" {
		if b := h.infoOf(list).byKey(must); b != nil {
			buf = addSampled(buf, b, &j.avoid)
		}
	}
	return h.sample(buf, list, j)
}
