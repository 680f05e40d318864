package ollamaflow

// Routing with conversations in mind: a follow-up kept on the server that
// holds its cache while that is worth its wait there (keepsConversation),
// new conversations spread where they evict no cache or the one idle
// longest, among the servers about as fast as the best (spreadNew,
// nearBest, roomyWithin), or to a slower one with a slot free rather than
// share a busy one (unshared), and where the pool has more conversations
// than cache slots, with the overflow (crowding.go). The table they read
// is in affinity.go.

import (
	"math"
	"sync"
	"time"
)

// acquireConversation takes a slot for a completion with affinity in
// mind, and reports the route taken and the conversation's id (0: new).
//
// A follow-up turn goes to the server that served the conversation's
// previous turn (keepsConversation) when it has room and what it saves is
// worth it; otherwise the policy chooses (an overflow). A new conversation
// goes, among the servers about as fast as the best, to one where it
// evicts least (keepLeastHosting): Ollama's cache keeps one conversation
// per parallel slot (OLLAMA_NUM_PARALLEL, 1 by default), so conversations
// piled on one server evict each other. So does a follow-up whose cache
// its server has evicted since (evictedFrom): nothing of it is cached
// anywhere, and its old server is no better than any other.
func (h *Handler) acquireConversation(avail []*backend, conv conversation, j *job) (*backend, string, uint64) {
	if conv.none() || h.affinity == nil {
		return h.acquire(avail, j), routePolicy, 0
	}
	t := h.affinity
	t.noteTurn(conv.followUp)
	now := time.Now()
	key, id, depth := t.lookup(conv, now)
	if key == "" || !conv.followUp && h.LBPolicy == "least_delay" && t.singleTurn() {
		t.counter(h.Name, "miss").Inc()
		return h.spreadNew(avail, j, now), routePolicy, 0
	}
	home := h.backendByKey(avail, key)
	if home == nil && !conv.followUp {
		// A first message seen before, on a server that cannot take it
		// now (gone from the pool, down, without the model): nothing of
		// it is cached where it may go, and nothing of an earlier turn
		// either. New to every server it may go to.
		t.counter(h.Name, "miss").Inc()
		return h.spreadNew(avail, j, now), routePolicy, 0
	}
	countedOut := home != nil && t.evictedFrom(home, id, now)
	if countedOut && !conv.followUp {
		// A first message seen before (unrelated clients, a retried
		// request): no saving to weigh the count's word against.
		t.counter(h.Name, "evicted").Inc()
		return h.spreadNew(avail, j, now), routeAffinityEvicted, id
	}
	class := classOf(countedOut, t.missedLast(id))
	prev, saving := h.keepsConversation(avail, key, conv, depth, j, class)
	if prev != nil && countedOut {
		// Its server holds more conversations than it has slots: kept
		// there, it evicts another's cache and is evicted in turn, both
		// queueing behind each other for good (two conversations on a
		// server of one slot). A server where it evicts no conversation,
		// or one idle long enough to have ended, becomes its home when
		// it serves it no later than staying would, counting what
		// staying costs the conversation it evicts there, and, where it
		// evicts nothing, what its next turn finds cached there and
		// would not find if it stayed; the coin toss of its own cache
		// this turn is left out (roomierThan).
		if b := h.roomierThan(avail, j, prev, saving, now); b != nil && b.tryAcquire() {
			t.counter(h.Name, "evicted").Inc()
			return b, routeAffinityEvicted, id
		}
	}
	if prev != nil && prev.tryAcquire() {
		t.counter(h.Name, "hit").Inc()
		if j != nil {
			j.cachedOn = &prev.srv.speed // its timing there is not its prompt rate
			j.cacheSaving, j.cacheClass = saving, class
		}
		return prev, routeAffinityHit, id
	}
	if countedOut {
		// As many other conversations as it has slots went there since,
		// and the odds that its cache is still there did not keep it:
		// placed as a new one, where it evicts no other's, its next
		// turns find it.
		t.counter(h.Name, "evicted").Inc()
		return h.spreadNew(avail, j, now), routeAffinityEvicted, id
	}
	t.counter(h.Name, "overflow").Inc()
	return h.acquire(avail, j), routeAffinityOverflow, id
}

// spreadNew takes a slot for a conversation nothing of which is cached
// anywhere: among the servers near the best (spreadFactor), one where it
// evicts no other conversation's cache, holding the fewest conversations.
//
// When every server near the best would evict a conversation's cache, a
// server further off that holds a free cache slot takes it instead if it
// costs no more than the eviction would: the evicted conversation's next
// turn evaluates its whole prompt again. So a server whose speed was
// learned a little slow (one sample under load) still takes a
// conversation rather than two evicting each other on one server.
//
// Among those near the best, the ones with a slot surely free come first
// (withSureSlot); when none has one, a server further off with a slot
// surely free may take it instead (unshared).
//
// Where follow-ups are known to be rare (singleTurn) the policy places it,
// under least_delay a first message seen before too: gathered where a
// cache was missed, one-message chats waited on servers of one slot while
// one of eight had slots free (slots-unequal), and a prompt every client
// sends filled a fast server's slots while slower ones idled (mixed).
// least_conn, blind to speed, keeps the pull (fresh-burst: 25 req/s, not
// 40, without it).
func (h *Handler) spreadNew(avail []*backend, j *job, now time.Time) *backend {
	if j != nil {
		j.newConversation = true
	}
	if h.affinity.singleTurn() {
		return h.acquire(avail, j)
	}
	sc := scratchPool.Get().(*scratch)
	defer sc.put()
	near := h.nearBest(sc, avail, j, spreadFactor, spreadMargin)
	sure, found := withSureSlot(near)
	if !found && len(near) > 0 {
		if b := h.unshared(avail, near, j, sc.best, now); b != nil && b.tryAcquire() {
			return b
		}
	}
	spread := h.affinity.keepLeastHosting(sure, now)
	if cost, full := h.affinity.evictionSeconds(spread, j, now); full && cost > 0 {
		if b := h.roomyWithin(avail, j, cost, sc.best, now); b != nil && b.tryAcquire() {
			return b
		}
		if !found {
			if b := h.gatherNew(avail, spread, j, cost, sc.best, now); b != nil && b.tryAcquire() {
				return b
			}
		}
	}
	if b := h.take(spread, j); b != nil {
		return b
	}
	return h.acquire(avail, j)
}

// unshared is the free backend of avail (a sample above largePool) with a
// slot free (or one not ruled out, priced with half the wait), nothing to
// load and j's model resident, the cheapest of those, when every server
// near the best (near, best its delay) has its sure slots busy and that
// backend's expected delay is within what the best costs the pool:
// best × (1 + r) plus r × the cache it evicts there, r being the share of
// turns that are follow-ups (followShare); nil if none. Each later turn of
// a conversation placed where every slot is busy waits behind the turn of
// the one it shares a slot with, and re-evaluates the history the other
// evicted, and the other's turns pay the same: sharing costs the other
// conversation about what it costs this one, as often as there are later
// turns.
//
// Priced for its own first turn only, a server a few times slower with its
// slots free looks dearer than that queue, and the pool runs more
// conversations than slots on its fast servers while a slower one idles
// (conversations-slowdown: a server 4x slower lost its two conversations
// as they ended and got none again; six conversations on the other four
// slots ran at 14.3-17.6 req/s, their caches thrashing, against 22.6 with
// two of them on the slow server, in 4 of 10 runs). Single-turn traffic
// (r below followMin) keeps the policy's choice: for it the queue's
// relief is the policy's (relievesQueue).
//
// A slot not ruled out counts: a slower server left with few
// conversations is never seen with more in use, so its slots stay
// unknown, and with sure slots only it got none again (random-118: 20
// conversations on 15 slots, two servers 3x and 4x slower getting 76 of
// 500 requests, 18.3 req/s against 20.2 this way).
//
// The backend taken may hold conversations between turns in its free
// slots; what it evicts there is not charged: the slot is free now, and a
// conversation whose answer has just ended is as likely over (its client
// starting the next one) as waiting for its user.
func (h *Handler) unshared(avail, near []*backend, j *job, best float64, now time.Time) *backend {
	r := h.affinity.followShare()
	if r < followMin || math.IsInf(best, 1) {
		return nil
	}
	pick, d := h.cheapestFree(avail, j, func(b *backend, est delay) bool {
		return est.slotFree() && est.load == 0 && !h.coldFor(b, j.model)
	})
	if pick == nil || d <= best*(1+r) {
		return pick
	}
	// Dearer than the queue alone: the cache it spares near's is read
	// only now, under the table's lock.
	if evict, full := h.affinity.evictionSeconds(near, j, now); !full || d > best*(1+r)+r*evict {
		return nil
	}
	return pick
}

// followMin is the least share of follow-up turns (followShare) for which
// a new conversation is priced as one that will have later turns
// (unshared).
const followMin = 0.1

// cheapestFree is the free backend of avail (a sample above largePool)
// with an estimate for j that keep accepts, the cheapest of those, and its
// expected delay; nil if none.
func (h *Handler) cheapestFree(avail []*backend, j *job, keep func(*backend, delay) bool) (*backend, float64) {
	var buf [sampleSize]*backend
	var pick *backend
	least := math.Inf(1)
	for _, b := range h.sampled(buf[:0], avail, j, "") {
		if !b.free() {
			continue
		}
		est, ok := h.estimateOf(b, j)
		if ok && est.total() < least && keep(b, est) {
			pick, least = b, est.total()
		}
	}
	return pick, least
}

// evictionSeconds is what a new conversation on the cheapest of list
// costs the conversation it evicts there: its prompt evaluated again, at
// that server's learned prompt rate. full is false when one of list has a
// free cache slot (or list is empty).
func (t *affinityTable) evictionSeconds(list []*backend, j *job, now time.Time) (cost float64, full bool) {
	if len(list) == 0 {
		return 0, false
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	cost = math.Inf(1)
	for _, b := range list {
		v := t.victim(b, now)
		if v == nil {
			return 0, false
		}
		secPerTok, charsPerTok, ok := b.srv.speed.promptCost(j.model)
		if !ok {
			return 0, true
		}
		cost = min(cost, (float64(v.size.tokens)+float64(v.size.chars)/max(charsPerTok, 0.5))*secPerTok)
	}
	return cost, true
}

// roomyWithin is the free backend of avail (a sample above largePool) with
// a free cache slot and the least expected delay for j, if that delay is
// within the spreading band of best (the least delay nearBest found) plus
// extra seconds; nil if none.
func (h *Handler) roomyWithin(avail []*backend, j *job, extra, best float64, now time.Time) *backend {
	pick, d := h.cheapestFree(avail, j, func(b *backend, _ delay) bool { return h.affinity.hasFreeSlot(b, now) })
	if pick == nil || d > best*spreadFactor+spreadMargin+extra {
		return nil
	}
	return pick
}

// roomierThan is the free backend of avail (a sample above largePool),
// other than prev, where a conversation evicts none or one idle for
// abandonedAfter, or where the pool's overflow gathers (evicts: prev
// holds one conversation over its slots, b thrashes with more), whose
// expected delay for j is the least of those and no
// more than prev's plus what the conversation it evicts on prev pays for
// it; nil if none.
//
// On a server where it evicts nothing, the move is credited saving too:
// what j's cache on prev would save (its prompt so far at prev's rate).
// Its next turn finds its cache there, where staying it would be evicted
// again, as this turn was, and evaluate its whole prompt once more.
// Without the credit, two conversations on the single slot of a fast
// server stayed there five turns each, every turn behind the other's and
// evaluating its whole history, while a server twice as slow had room for
// one (random-28: p99 1.0 s against least_conn's 0.6 s). Where the move
// evicts an idle conversation it gets no credit: on a pool holding more
// conversations than slots, such moves only pass the eviction on, and
// with the credit they went to the slowest server (random-10: p99 2.9 s
// against 2.4 s).
//
// Where none is that cheap and staying means a wait for a slot, a server
// where it evicts nothing and starts at once relieves prev's queue
// within the pool's tail (relievesQueue, as queueRelief does for the
// policy), its later turns cached there. A slot planned for there but
// never seen in use is priced as if there: the move tests it, and where
// it is missing, the one request that waited rules it out for
// slotRetest. Priced turn by turn, and that slot at half a wait, the
// follow-ups of six conversations on a fast server of three slots stayed
// there, each turn behind another's and evaluating its whole history
// again, while a server three times as slow had three slots idle, its
// second never seen in use (random-365: 11 req/s against least_conn's
// 16.5; 14.1 with the relief).
func (h *Handler) roomierThan(avail []*backend, j *job, prev *backend, saving float64, now time.Time) *backend {
	stay, ok := h.estimateOf(prev, j)
	if !ok {
		return nil
	}
	limit := stay.total()
	// Staying evicts another conversation's cache there, which its next
	// turn pays for.
	one := [1]*backend{prev}
	if cost, full := h.affinity.evictionSeconds(one[:], j, now); full {
		limit += cost
	}
	var buf [sampleSize]*backend
	list := h.sampled(buf[:0], avail, j, "")
	var pick, gatherer, reliever *backend
	gatherLimit, reliefCost := limit, math.Inf(1)
	for _, b := range list {
		if b == prev || !b.free() {
			continue
		}
		est, ok := h.estimateOf(b, j)
		if !ok {
			continue
		}
		d := est.total()
		switch free, idleOnly, gather := h.affinity.evicts(b, prev, now); {
		case free:
			if c := d - untriedWait(est); stay.wait > 0 && est.slotFree() && est.load == 0 && c < reliefCost {
				reliefCost, reliever = c, b
			}
			d -= saving
		case gather:
			if d <= gatherLimit {
				gatherLimit, gatherer = d, b
			}
			continue
		case !idleOnly:
			continue
		}
		if d <= limit {
			limit, pick = d, b
		}
	}
	if pick == nil && reliever != nil && relievesQueue(reliefCost, stay.wait, h.tailOf(list, prev, now)) {
		return reliever
	}
	if pick == nil {
		// Only where no server has room: a slot free, even on a slower
		// server, relieves prev without lengthening a crowded queue
		// (random-51: 11 conversations on 11 slots, three of them on a
		// server 4x slower, and gathered on the fast ones instead, 27
		// req/s against 30).
		return gatherer
	}
	return pick
}

// untriedWait is the wait d prices a slot planned for but never seen in
// use with (half the wait without it); 0 for any other slot.
func untriedWait(d delay) float64 {
	if d.untried {
		return d.wait
	}
	return 0
}

// tailOf is the pool's tail for a queue's relief (queueRelief): the
// longest delay expected in flight on list or prev, or the p99 served
// lately, if longer.
func (h *Handler) tailOf(list []*backend, prev *backend, now time.Time) float64 {
	tail := h.served.p99(now)
	for _, b := range list {
		tail = max(tail, b.longestDelay(now))
	}
	return max(tail, prev.longestDelay(now))
}

// abandonedAfter is how long a conversation idle is taken to have ended
// when one that shares a server with more conversations than slots looks
// for another: the cache it would evict there is most likely no one's
// next turn (clients that keep a conversation going come back within
// seconds; a finished one stays in its slot until something evicts it).
//
// A conversation whose client sends each turn soon after the answer (an
// application, an agent) has ended sooner: once its last answer is
// abandonedPauses times the longest pause its client took between an
// answer and the next turn old, and at least abandonedMin. Clients that
// start the next conversation as soon as one ends left a server of four
// slots holding six to nine conversations, each idle for less than 2 s,
// and a conversation evicted on a server of one slot found none that
// evicted only an ended one: two of them queued behind each other there
// for good (conversations-unequal, in about a third of the runs).
const (
	abandonedAfter  = 2 * time.Second
	abandonedPauses = 4
	abandonedMin    = 250 * time.Millisecond
)

// abandoned reports whether a, idle since its last turn, has most likely
// ended. t.mu is held.
func (a *convActivity) abandoned(now time.Time) bool {
	if now.Sub(a.at) >= abandonedAfter {
		return true
	}
	ans := a.answered.Load()
	if !a.pauseSeen || ans < a.at.UnixNano() {
		return false // its pace is not known, or its answer has not ended
	}
	return now.Sub(time.Unix(0, ans)) >= max(abandonedMin, abandonedPauses*a.pause)
}

// hasFreeSlot reports whether b holds fewer recent conversations than it
// has slots.
func (t *affinityTable) hasFreeSlot(b *backend, now time.Time) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.victim(b, now) == nil
}

// keepsConversation returns the backend of server key when the
// conversation's next turn should go there: it has room, and its expected
// delay less what its cache saves is no worse than the best free
// candidate's (within a tie), each other candidate's counting the cache it
// would evict (class 0 only). The saving is the prompt of the prefix it
// served (conv.sizes[depth]) at its learned prompt seconds per token for
// the model, at most its whole prompt time; a request with no earlier turn
// is credited nothing (identical first messages from unrelated clients are
// no conversation; that server keeps them on a tie only). Servers not
// observed yet: it stays when it is no busier than the least busy. nil:
// the policy chooses.
func (h *Handler) keepsConversation(all []*backend, key string, conv conversation, depth int, j *job, class cacheClass) (*backend, float64) {
	var buf [sampleSize + 1]*backend
	avail := h.sampled(buf[:0], all, j, key) // above largePool: key's server and a sample (largepool.go)
	noteWalk(avail)
	now := time.Now()
	var prev *backend
	var prevDelay delay
	prevKnown := false
	best, crowd, minLoad := math.Inf(1), math.Inf(1), int64(math.MaxInt64)
	for _, b := range avail {
		if !b.free() {
			continue
		}
		d, ok := h.estimateOf(b, j)
		if ok {
			alt := d.total()
			// Moving a follow-up whose cache is believed intact to a
			// server whose cache slots all hold other recent
			// conversations evicts one of them, whose next turn
			// evaluates its prompt again: that counts against the
			// move. One whose own cache is doubtful (counted out, its
			// last turn missed) has less to keep, and a pool that
			// placed its first conversations unevenly evens out
			// through such moves.
			if b.srv.key != key && class == 0 && conv.followUp && h.affinity != nil {
				one := [1]*backend{b}
				if cost, full := h.affinity.evictionSeconds(one[:], j, now); full {
					alt += cost
					if h.affinity.evictsLive(b, now) {
						crowd, alt = min(crowd, alt), math.Inf(1) // weighed apart (crowdedBest)
					}
				}
			}
			best = min(best, alt)
		} else if b.srv.key != key && b.srv.inFlight.Load() == 0 {
			// An idle server not observed yet may be the fastest:
			// least_delay measures it with the next request it gets,
			// so only a saving larger than any delay keeps the
			// conversation from it (else a conversation, or one
			// repeated prompt, held on a slow server keeps the pool
			// from ever learning of a faster one).
			best = 0
		}
		minLoad = min(minLoad, b.srv.inFlight.Load())
		if b.srv.key == key {
			prev, prevDelay, prevKnown = b, d, ok
		}
	}
	if prev == nil {
		return nil, 0
	}
	if prevKnown {
		best = crowdedBest(best, crowd, prevDelay)
	}
	if !prevKnown && prev.srv.inFlight.Load() >= int64(max(prev.cfg.MaxParallel, 1)) {
		// Its previous turn (or the same first message from another
		// client) is still running there, and nothing is known of its
		// speed: least_delay measures such a server one request at a
		// time, since a second one may wait behind a long first on a
		// single slot. Nothing is cached there yet either.
		return nil, 0
	}
	if !prevKnown || math.IsInf(best, 1) {
		if class&1 != 0 {
			return nil, 0 // counted out, no saving to weigh: placed as a new one
		}
		// A server not observed yet keeps it as the request that
		// measures it (claimProbe), as least_delay would send it: a
		// burst of one prompt arriving together would otherwise all
		// be kept there before the first of them took its slot.
		if prev.srv.inFlight.Load() <= minLoad && (prevKnown || prev.srv.speed.claimProbe(max(prev.cfg.MaxParallel, 1), &prev.srv.inFlight, now)) {
			return prev, 0
		}
		return nil, 0
	}
	saving, expected := 0.0, 0.0
	if conv.followUp && depth >= 0 && depth < len(conv.sizes) {
		if secPerTok, charsPerTok, ok := prev.srv.speed.promptCost(j.model); ok {
			size := conv.sizes[depth]
			tokens := float64(size.tokens) + float64(size.chars)/max(charsPerTok, 0.5)
			saving = min(tokens*secPerTok, prevDelay.prompt)
			expected = saving * prev.srv.speed.cacheOdds(class)
		}
	}
	if prevDelay.total()-expected <= best*(1+affinityTie)+affinityTieMargin {
		return prev, saving
	}
	return nil, 0
}

// scratch is a request's working lists, pooled so that spreading a new
// conversation allocates nothing.
type scratch struct {
	list   []*backend
	delays []float64
	waits  []bool // the request would wait there for a slot
	atOnce []bool // it would start there at once, its model resident
	// freeCost is the delay there where it would start at once or take
	// a slot planned for but never seen in use (its model resident), else
	// NaN: what relievesQueue may weigh.
	freeCost []float64
	best     float64 // the least delay nearBest found (+Inf: none)
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

// put clears the list (no backend kept alive by the pool) and returns it.
func (sc *scratch) put() {
	clear(sc.list[:cap(sc.list)])
	sc.list, sc.delays, sc.waits, sc.atOnce, sc.freeCost = sc.list[:0], sc.delays[:0], sc.waits[:0], sc.atOnce[:0], sc.freeCost[:0]
	scratchPool.Put(sc)
}

// nearBest keeps, in sc.list, the free backends of list where spreading a
// new conversation costs the request nothing it would not pay under the
// policy alone:
//
//   - an observed server where it would start at once (a free slot, its
//     model resident) and whose expected delay is within factor × the
//     best plus margin seconds: servers of one class whose learned speeds
//     differ by noise;
//   - an observed server whose expected delay, wait and load included, is
//     a tie with the best (affinityTie): where the policy might send it;
//     one where the request would wait for a slot only while no server
//     with a slot free is expected to end no later.
//
// A band wide enough for the noise of speeds (a quarter) also admits a
// whole request's wait: with every slot busy it sent requests to the
// server holding the fewest conversations, behind its queue, while
// another was about to free a slot (equal servers at capacity: p99 173
// against 96 ms without affinity). The conversation it gains is worth no
// wait either: it is a first turn, cached nowhere yet, and the next turn
// goes back wherever it went.
//
// A backend not observed yet (no delay to compare) is kept when the
// policy would measure it now: no busier than the least busy, with a slot
// for its measuring request not taken or claimed (least_delay sends one at
// a time; a second one offered alone would be taken, where the policy
// waits for the first answer), and its answers not mostly errors (it holds no conversation,
// each failed turn being recorded again where it is retried, so it would
// draw every new one; an observed one is priced by its error share).
// Where j's model is not resident, it is kept only as least_delay would
// measure it: while its expected load costs less than the best observed
// choice (on a pool where nothing is measured yet, always), and no load
// of the model is under way on another candidate (that load is the one to
// share: pickLeastDelay joins it, and a list without the loading server,
// busier than the idle ones, would have the policy start a second one). A
// cold server not measured yet holds no conversation, so without that
// rule it drew every new one and loaded the model there, evicting the one
// it held (3 models over servers of room 1, 2 and 3: 13-17 loads per
// 1,000 against 3). One whose /api/ps lists no model at all stays a peer
// (unless that load elsewhere is under way): a load there evicts nothing,
// happens once, and is what spreads the conversations of a pool started
// cold, where every server but the first to answer is such a one.
func (h *Handler) nearBest(sc *scratch, all []*backend, j *job, factor, margin float64) []*backend {
	var buf [sampleSize]*backend
	list := h.sampled(buf[:0], all, j, "") // above largePool: a sample (largepool.go)
	noteWalk(list)
	best, minLoad := math.Inf(1), int64(math.MaxInt64)
	sc.list, sc.delays, sc.waits, sc.atOnce, sc.freeCost = sc.list[:0], sc.delays[:0], sc.waits[:0], sc.atOnce[:0], sc.freeCost[:0]
	freeBest := math.Inf(1) // the least delay among servers with a slot free
	now := time.Now()
	bestWait, tail := 0.0, h.served.p99(now) // the best choice's wait for a slot; the longest delay expected in flight, or served lately
	loadingSomewhere := false
	for _, b := range list {
		if !b.free() {
			continue
		}
		est, ok := h.estimateOf(b, j)
		d := est.total()
		if !ok {
			d = math.NaN()
		} else {
			if d < best {
				best, bestWait = d, est.wait
			}
			tail = max(tail, b.longestDelay(now))
			if est.wait == 0 {
				freeBest = min(freeBest, d)
			}
		}
		sc.list = append(sc.list, b)
		sc.delays = append(sc.delays, d)
		sc.waits = append(sc.waits, ok && est.wait > 0)
		sc.atOnce = append(sc.atOnce, ok && est.wait == 0 && est.load == 0)
		free := math.NaN()
		if ok && est.slotFree() && est.load == 0 {
			free = d
		}
		sc.freeCost = append(sc.freeCost, free)
		minLoad = min(minLoad, b.srv.inFlight.Load())
		if !loadingSomewhere {
			_, loadingSomewhere = b.srv.speed.pendingLoad(j.model, now)
		}
	}
	sc.best = best
	// While the best choice means waiting for a slot, an idle server
	// least_delay has not timed for a while (it looked slower than the
	// queue elsewhere) takes this request to re-measure it, as
	// pickLeastDelay does (claimRemeasure: one request per
	// remeasureAfter). Without this, single-turn traffic, all of it new
	// conversations spread here, never reached the policy's re-measuring
	// with that server among the candidates: a server that recovered
	// stayed unused for good (speedup: 0 of 300 requests after the
	// recovery, 87 with affinity off).
	if h.remeasures && bestWait > 0 {
		for i, b := range sc.list {
			if !sc.atOnce[i] || b.srv.inFlight.Load() != 0 {
				continue
			}
			switch b.srv.speed.claimRemeasure(now, j, j.copyable && j.copyTo == nil) {
			case remeasureRequest:
				out := append(sc.list[:0], b)
				return out
			case remeasureCopy:
				j.copyTo = b
			}
		}
	}
	out := sc.list[:0]
	for i, b := range sc.list {
		d := sc.delays[i]
		switch {
		case math.IsNaN(d):
			inFlight := b.srv.inFlight.Load()
			if inFlight > minLoad || b.srv.speed.probesTaken(max(b.cfg.MaxParallel, 1), &b.srv.inFlight, now) || b.srv.speed.mostlyErrors(now) {
				continue
			}
			if h.coldFor(b, j.model) && (loadingSomewhere || b.srv.speed.coldCost(j.model) >= best && !holdsNoModel(b)) {
				continue
			}
			out = append(out, b)
		case sc.waits[i] && freeBest <= d:
			// Never a server's queue when a server with a slot free is
			// expected to end no later: the wait is certain, the cache
			// the spread keeps is a bet on a next turn.
		case d <= best*(1+affinityTie)+affinityTieMargin, // a tie, waiting or not
			sc.atOnce[i] && d <= best*factor+margin,       // at once, about as fast
			relievesQueue(sc.freeCost[i], bestWait, tail): // as pickLeastDelay would take it (NaN: never)
			out = append(out, b)
		}
	}
	return out
}

// holdsNoModel reports whether the server's last /api/ps listed no model:
// a load there evicts nothing.
func holdsNoModel(b *backend) bool {
	m := b.srv.models.Load()
	return m.known && len(m.loaded) == 0
}

// expectedDelayOf is the cost model's estimate of j's delay on b, in
// seconds; ok is false while b has not been observed.
func (h *Handler) expectedDelayOf(b *backend, j *job) (float64, bool) {
	d, ok := h.estimateOf(b, j)
	return d.total(), ok
}

// estimateOf is cost.go's estimateDelay through the frontend's model
// index (a bit test per candidate).
func (h *Handler) estimateOf(b *backend, j *job) (delay, bool) {
	return b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), h.coldFor(b, j.model), time.Now())
}

// promptCost is what the server has learned of prompt evaluation for
// model (the server's over all models where model has no sample): the
// per-token part of its prompt fit in seconds (the fixed part of an
// evaluation is paid even when the prefix is cached) and characters per
// token (charsPerToken before a sample); ok is false before any prompt was
// timed. It is what each cached token saves there.
func (sp *speed) promptCost(model string) (secPerTok, charsPerTok float64, ok bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	r := &sp.all
	if mr := sp.models[model]; mr != nil && mr.promptN > 0 {
		r = mr
	}
	if r.promptN == 0 {
		return 0, 0, false
	}
	charsPerTok = charsPerToken
	if mr := sp.models[model]; mr != nil && mr.charsN > 0 {
		charsPerTok = mr.charsPerTok
	} else if sp.all.charsN > 0 {
		charsPerTok = sp.all.charsPerTok
	}
	return r.promptTok, charsPerTok, true
}
