package ollamaflow

import (
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"
)

// The selection policies: each picks one backend among those with room.
// least_delay prices every candidate with the cost model (cost.go) and
// adds the measuring of unknown servers (spare.go), the relief of lasting
// queues (relief.go) and the re-measuring of changed ones (shift.go);
// least_conn, round_robin, random and first need only the list.

// selectionPolicy picks one backend among avail, which is never empty and
// holds only backends with room, for a request asking for j (its model is
// normalised, or "" when the request names none).
type selectionPolicy func(h *Handler, avail []*backend, j *job) *backend

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

// pickLeastConn avoids backends that have been failing (a server that
// answers errors fast looks idle, and would otherwise attract the most
// traffic until its breaker opens), prefers backends where the model is
// loaded (a cold load costs seconds), then takes the lowest in-flight /
// capacity (capacity is max_parallel, or the weight when uncapped), then
// the higher weight, and breaks remaining ties round-robin so equal servers
// share the load.
func pickLeastConn(h *Handler, avail []*backend, j *job) *backend {
	avail = leastFailing(avail)
	var warmBuf, tieBuf [largePool]*backend // a sample or a small pool fits: no allocation
	if j.model != "" {
		if warm := h.loadedOnInto(warmBuf[:0], avail, j.model); len(warm) > 0 {
			avail = warm
		}
	}
	ties := tieBuf[:0]
	var bestLoad, bestCap int64
	var bestWeight uint64
	for _, b := range avail {
		load := b.srv.inFlight.Load()
		capacity, weight := int64(b.cfg.MaxParallel), b.weight()
		if capacity <= 0 {
			capacity = int64(weight)
		}
		if len(ties) == 0 {
			ties, bestLoad, bestCap, bestWeight = append(ties, b), load, capacity, weight
			continue
		}
		// load/capacity compared without division.
		lhs, rhs := load*bestCap, bestLoad*capacity
		switch {
		case lhs < rhs, lhs == rhs && weight > bestWeight:
			ties, bestLoad, bestCap, bestWeight = append(ties[:0], b), load, capacity, weight
		case lhs == rhs && weight == bestWeight:
			ties = append(ties, b)
		}
	}
	if len(ties) == 1 {
		return ties[0]
	}
	n := atomic.AddUint64(&h.rrCounter, 1)
	return ties[n%uint64(len(ties))]
}

// bootstrapHold bounds how long least_delay holds requests back while it
// knows the speed of no candidate.
const bootstrapHold = time.Second

// nearTie is the relative difference in expected delay below which
// least_delay counts two servers as equal.
const nearTie = 0.02

// scored is a candidate as pickLeastDelay priced it: its expected delay
// (weighted), the request's own work there, the wait for a slot, and
// whether its model must load.
type scored struct {
	b             *backend
	cost, service float64
	wait          float64
	cold          bool
	// free: it would start at once, or take a slot planned for but never
	// seen in use (priced with half the wait, as cost.go prices it).
	free bool
	// evict is what its load would cost the rest of the pool
	// (evictionCost, in cost).
	evict float64
}

// pickLeastDelay takes the backend where the request is expected to end
// soonest (cost.go): the wait for a slot behind the work already sent
// there, a model load where the model is not resident plus what evicting
// another model costs the pool, the request's own prompt and output at the
// speed the server has shown, and the attempts lost to the server's recent
// errors. A slow server that merely looks idle does not win against a fast
// one with free slots, a long request weighs the difference more than a
// short one, and a server answering errors at once does not look free.
//
// While the best choice means waiting for a slot, a slower server with a
// slot free takes the request when its delay there is no longer than the
// longest the pool already expects of a request in flight: a request kept
// in a lasting queue holds back every one after it (queueRelief;
// relievesQueue in relief.go).
//
// A server it has not observed yet is measured with one request at a time
// (or up to its max_parallel, slots it is known to have): it gets a request
// whenever it has room for one, and none beyond. When every candidate is
// being measured (a fresh pool, a burst), the request waits in the queue
// for the first answer, which comes from the fastest server, instead of
// piling onto servers of unknown speed; after bootstrapHold without an
// answer it falls back to least_conn.
func pickLeastDelay(h *Handler, avail []*backend, j *job) *backend {
	j.spareOn, j.spareAmong, j.measureOn = nil, nil, nil // a pick whose slot was not had is no spare
	offered := avail
	avail = leastFailing(avail)
	now := time.Now()
	if j.model != "" && h.queue != nil {
		if due := firstListsDue(avail, now); !due.IsZero() {
			h.queue.wakeAt(due)
			return nil
		}
	}
	var unobserved []*backend
	var buf [largePool]scored // a sample or a small pool fits: no allocation
	observed := buf[:0]
	best, bestWait := math.Inf(1), 0.0
	var joinable []*backend // unobserved, loading j's model
	warmUnobserved := false // an unobserved server that needs no load for j, as far as is known
	for _, b := range avail {
		cold := h.coldFor(b, j.model)
		d, ok := b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), cold, now)
		if !ok {
			unobserved = append(unobserved, b)
			if _, loading := b.srv.speed.pendingLoad(j.model, now); loading {
				joinable = append(joinable, b)
			} else if !cold || !b.srv.models.Load().known {
				// Holds it, or may: its lists were not read yet (a
				// fresh pool's first requests), and not knowing is
				// not knowing it must load.
				warmUnobserved = true
			}
			continue
		}
		cost, evict := d.total(), 0.0
		if d.load > 0 {
			evict = evictionCost(b, j.model, avail, h.demand, now)
			cost += evict
		}
		cost /= float64(b.weight())
		observed = append(observed, scored{b, cost, d.prompt + d.output, d.wait, d.load > 0,
			d.slotFree(), evict})
		if cost < best {
			best, bestWait = cost, d.wait
		}
	}
	if len(joinable) > 0 && len(observed) == 0 && warmUnobserved {
		// Nothing observed: a load's rest is all a joinable server's
		// cost would be, against nothing, so every request would join
		// it, each behind the others at a speed nobody has seen (and the
		// load may be a belief only: before a server's lists are read,
		// its first request is taken to load the model). Another server
		// that needs no load is being measured; its first answer prices
		// both, so the request waits for it like the others held back.
		joinable = nil
	}
	// A server not observed yet that is loading j's model already (its
	// first request asked for it) is a candidate all the same: the load
	// under way is the cheapest there is, and another one elsewhere would
	// evict a model in use there (placement.go, joinLoadCost).
	if len(joinable) > 0 {
		service := math.Inf(1)
		for _, c := range observed {
			service = min(service, c.service)
		}
		if math.IsInf(service, 1) {
			service = 0 // nothing observed: the load's rest is all there is to compare
		}
		for _, b := range joinable {
			cost := joinLoadCost(b, j.model, service, now) / float64(b.weight())
			observed = append(observed, scored{b, cost, service, 0, true, true, 0})
			if cost < best {
				best, bestWait = cost, 0
			}
		}
	}
	// Among servers within nearTie of the best, the one that does the
	// work itself fastest: its estimate rests on its own speed, the
	// other's on a wait, and it keeps the slow ones free. Equal ones take
	// turns.
	var tieBuf [largePool]*backend
	ties := tieBuf[:0]
	fastest := math.Inf(1)
	for _, c := range observed {
		switch {
		case c.cost > best*(1+nearTie):
		case c.service < fastest*(1-1e-9):
			fastest, ties = c.service, append(ties[:0], c.b)
		case c.service <= fastest*(1+1e-9):
			ties = append(ties, c.b)
		}
	}
	// An unobserved server is measured with one request at a time (or up
	// to its max_parallel), unless it is cold for the model and a model
	// load alone would take longer than the best observed choice.
	var explore []*backend
	var oldestProbe time.Time
	heldElsewhere := false // an offered server passed over as another candidate holds the model
	for _, b := range unobserved {
		if b.srv.inFlight.Load() >= int64(max(b.cfg.MaxParallel, 1)) {
			oldestProbe = earlierProbe(oldestProbe, b)
			continue
		}
		if h.coldFor(b, j.model) && len(observed) == 0 && h.residentElsewhere(j, b) {
			// Nothing of the pool measured yet, and another candidate
			// holds the model: its first answer is due long before a
			// load here would end. Sent to measure this server, a fresh
			// pool's first request for a model loaded it on the slowest
			// server (5.2 s, one slot, three times as slow) while the
			// server holding it was busy with its own measuring request,
			// and the next requests for it joined that load (models-78:
			// p99 5.6 s, 1.3 s without).
			heldElsewhere = true
			continue
		}
		if h.coldFor(b, j.model) && (b.srv.speed.coldCost(j.model) >= best || loadingElsewhere(j, now)) {
			// A load alone takes longer than the best choice, or a load
			// of the model is under way already (a fresh pool's burst:
			// a second one would evict what another model needs).
			continue
		}
		if b.srv.speed.mostlyErrors(now) && (bestWait <= 0 || !b.srv.speed.claimErrorProbe(now)) {
			// Nothing is learned from errors. It is measured again once
			// the share has decayed (within a second or two), or while
			// the others queue, one request a second (claimErrorProbe).
			continue
		}
		explore = append(explore, b)
	}
	// The measuring request is claimed before it is sent (claimProbe):
	// requests that arrive together all see the server idle until the
	// first of them takes its slot, and would otherwise all be sent to
	// measure it, several onto one server of unknown speed and slots.
	for len(explore) > 0 {
		b := pickLeastConn(h, explore, j)
		if b.srv.speed.claimProbe(max(b.cfg.MaxParallel, 1), &b.srv.inFlight, now) {
			if !j.moved {
				j.measureOn, j.spareAmong = b.srv, rivals(avail, j)
			}
			return b
		}
		explore = without(explore, b)
		oldestProbe = earlierProbe(oldestProbe, b)
	}
	// The best choice here loads the model while a candidate this pick
	// was not offered is loading it already: waiting for that load is
	// cheaper.
	if len(ties) > 0 && h.queue != nil && scoredOf(observed, ties[0]).cold {
		if until, ok := h.loadUnderWayElsewhere(avail, j, fastest, best, now); ok {
			h.queue.wakeAt(until)
			return nil
		}
		// The best choice here loads the model evicting one in use, and
		// a candidate not offered would serve the request sooner.
		if until, ok := h.soonerNotOffered(avail, j, best, scoredOf(observed, ties[0]).evict, now); ok {
			h.queue.wakeAt(until)
			return nil
		}
	}
	// The model has fewer copies than its share of the requests: an idle
	// server holding a model with more than its share loads it
	// (placementMove).
	if len(ties) > 0 && !scoredOf(observed, ties[0]).cold {
		if b := h.placementMove(avail, j, now); b != nil && !h.claimLoadCopy(b, j) {
			return b
		}
	}
	// The model's requests queue where it is: a server that would serve
	// it far sooner, its room only what its lists showed, is tested with
	// a load copy (room.go).
	if bestWait > 0 && len(ties) > 0 && !scoredOf(observed, ties[0]).cold {
		if b := h.roomTest(j, ties[0], now); b != nil {
			h.claimLoadCopy(b, j)
		}
	}
	// While the best choice means waiting in a queue, an idle server that
	// has had no sample for a while (it looked slower than queueing
	// elsewhere) is re-measured, to learn whether it still is: it may have
	// recovered. A copy of this request measures it (measurecopy.go), or,
	// where none may be sent, the request itself, once per
	// remeasureAfter. With free fast slots nothing is re-measured: a slow
	// server could not beat them anyway, unless it turned faster than
	// them, which the next queue finds out.
	if bestWait > 0 {
		for _, c := range observed {
			if c.cold || c.b.srv.inFlight.Load() != 0 {
				continue
			}
			switch c.b.srv.speed.claimRemeasure(now, j, j.copyable && j.copyTo == nil) {
			case remeasureRequest:
				return c.b
			case remeasureCopy:
				j.copyTo = c.b
			}
		}
	}
	// Waiting for a slot on the first server to answer while another,
	// measured with its first request, may be as fast (measuring.go).
	if bestWait > 0 && len(ties) > 0 && h.queue != nil {
		if until, ok := h.awaitProbe(unobserved, j, ties[0], fastest, bestWait, now); ok {
			h.queue.wakeAt(until)
			return nil
		}
	}
	// The best choice means a wait while servers are still being
	// measured: one of them, where staying is expected to end sooner,
	// takes the request as a spare, moved if a measured server would
	// serve it sooner after all (spare.go).
	if bestWait > 0 && len(ties) > 0 && h.queue != nil {
		if b := h.claimSpareWithin(unobserved, j, queuedSpareLimit, ties[0], best, bestWait, now); b != nil {
			j.spareOn, j.spareAmong = b.srv, rivals(avail, j)
			return b
		}
	}
	if b := queueRelief(observed, bestWait, h.served.p99(now), now); b != nil {
		return b
	}
	// Spares beside a measuring request that has run longer than the best
	// server's time for it are about to move there: this request, sent
	// after them, waits until they have (measuring.go).
	if len(ties) > 0 && h.queue != nil {
		if until, ok := h.awaitOutrun(unobserved, j, ties[0], now); ok {
			h.queue.wakeAt(until)
			return nil
		}
	}
	// A fresh pool's servers may differ by the kind of work (one fast at
	// prompts, another at generating): the best measured server may be
	// the worst for this request while one still being measured is the
	// best. A request the best measured server is slow for waits for
	// that first answer, up to a quarter of its expected time there
	// (measuring.go).
	if len(ties) > 0 && h.queue != nil {
		if until, ok := h.awaitMeasuring(unobserved, j, ties[0], fastest, best, now); ok {
			h.queue.wakeAt(until)
			return nil
		}
	}
	switch {
	case len(ties) == 1:
		return ties[0]
	case len(ties) > 1:
		n := atomic.AddUint64(&h.rrCounter, 1)
		return ties[n%uint64(len(ties))]
	case len(avail) == 1 && !roomElsewhere(offered, j):
		return avail[0] // nothing to choose between: no point waiting
	}
	// Every candidate is unobserved and busy being measured: a slot
	// beside a measuring request is raced rather than left idle (spare.go).
	if len(observed) == 0 && h.queue != nil {
		if b := h.claimSpare(unobserved, j, now); b != nil {
			j.spareOn, j.spareAmong = b.srv, rivals(avail, j)
			return b
		}
	}
	// A request that passed over an offered server as another candidate
	// holds its model (heldElsewhere) waits up to bootstrapHold for the
	// first answer of a candidate being measured, offered or not (one
	// busy with its measuring request is not offered).
	if heldElsewhere {
		for _, b := range j.cands {
			oldestProbe = earlierProbe(oldestProbe, b)
		}
	}
	if !oldestProbe.IsZero() && time.Since(oldestProbe) < bootstrapHold && h.queue != nil {
		h.queue.wakeAt(oldestProbe.Add(bootstrapHold))
		return nil
	}
	// Nothing measured among those offered, and a candidate not offered
	// is loading the model: waiting for that load beats a second one.
	if len(observed) == 0 && h.queue != nil {
		if until, ok := h.loadUnderWayElsewhere(avail, j, 0, math.Inf(1), now); ok {
			h.queue.wakeAt(until)
			return nil
		}
	}
	return pickLeastConn(h, avail, j)
}

// earlierProbe is the earlier of oldest and when b's measuring began
// (none: oldest as it is).
func earlierProbe(oldest time.Time, b *backend) time.Time {
	if p := b.srv.speed.probingSince(); !p.IsZero() && (oldest.IsZero() || p.Before(oldest)) {
		return p
	}
	return oldest
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

// rivals are the servers that may outrun a spare or measuring request
// picked from avail (spare.go): every candidate of j, offered or not. A
// newcomer is not offered a server a queued request waits for (see
// roomElsewhere), and a spare that listed only those offered could never
// be outrun by the others: in a fresh burst of four on a fast server and
// a slow one, the spare placed on the slow one while the fast one had a
// waiter stayed there after the fast one had answered, until the slow one
// answered it (TestAMovedStreamIsWhole, once in CI).
func rivals(avail []*backend, j *job) []*backend {
	if len(j.cands) > 0 && len(j.cands) <= largePool {
		return slices.Clone(j.cands)
	}
	return slices.Clone(avail)
}

// roomElsewhere reports whether a candidate of j that was not offered has
// room: offered is then not all there is to choose from. A newcomer is
// offered the servers no queued request waits for, and reads each
// server's count of waiters on its own while a waiter joins or leaves
// every list it is in, one after the other; a waiter in a dispatch pass is
// offered a server only when every older waiter for it declined it. Such
// a lone offer is no sign the others are full (about one fresh burst of
// four in thirty under the race detector sent its fourth request to the
// only server offered, behind a measuring request and a spare, while the
// other had room for its spare).
// A candidate of a higher SRV priority tier does not count: it serves
// only when the offered one's tier cannot.
func roomElsewhere(offered []*backend, j *job) bool {
	tier := offered[0].tier.Load()
	for _, b := range j.cands {
		if b.tier.Load() == tier && !slices.Contains(offered, b) && b.hasRoom() {
			return true
		}
	}
	return false
}

// pickRoundRobin walks the candidates in turn, each weight times per cycle.
func pickRoundRobin(h *Handler, avail []*backend, _ *job) *backend {
	n := atomic.AddUint64(&h.rrCounter, 1) - 1
	return byWeight(avail, n%totalWeight(avail))
}

// pickRandom picks at random, in proportion to weight.
func pickRandom(_ *Handler, avail []*backend, _ *job) *backend {
	return byWeight(avail, rand.Uint64N(totalWeight(avail)))
}

// pickFirst takes the first candidate in config order.
func pickFirst(_ *Handler, avail []*backend, _ *job) *backend {
	return avail[0]
}

// weight is the backend's weight within [1, maxWeight]: Provision refuses
// more, and the clamp keeps sums of weights far from overflowing even for
// a view built without it.
func (b *backend) weight() uint64 {
	return uint64(min(max(b.cfg.Weight, 1), maxWeight))
}

// totalWeight sums the weights; at most maxWeight per backend, it cannot
// overflow for any number of backends a process can hold.
func totalWeight(list []*backend) uint64 {
	var total uint64
	for _, b := range list {
		total += b.weight()
	}
	return total
}

// byWeight returns the backend whose cumulative weight range holds x.
func byWeight(list []*backend, x uint64) *backend {
	for _, b := range list {
		w := b.weight()
		if x < w {
			return b
		}
		x -= w
	}
	return list[len(list)-1]
}
