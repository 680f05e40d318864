package ollamaflow

// Where a pool with more conversations than cache slots keeps the ones
// that cannot have a slot of their own. Ollama keeps one conversation's
// prompt per parallel slot and, by default, gives a turn the free slot
// sharing the longest prefix with it, so a server holding more live
// conversations than slots has them take turns in its slots, each
// evicting another: all of them miss their cache, turn after turn, and
// the rest of that server's conversations with them. Spread over every
// server, the overflow makes every conversation miss; gathered on as few
// servers as it needs, it leaves the others' caches whole (eight
// conversations on three servers of two slots: spread 3, 3 and 2, six
// conversations miss; gathered 4, 2 and 2, four do).
//
// A new conversation that would start such a cycle on a server where each
// conversation keeps its cache goes to the one that thrashes already
// (gatherNew, and keepLeastHosting's choice among the servers near the
// best), and a conversation counted out of a crowded server may move to
// one more crowded (evicts), never the other way, so the overflow settles
// on one server instead of moving between two.

import (
	"math"
	"time"
)

// gatherNew is the server where the pool's overflow of conversations
// gathers (the thrashing one of avail, a sample above largePool, holding
// the most live conversations over its slots), for a new conversation
// that would otherwise evict a live conversation on spread, none of which
// thrashes, when its expected delay there is within what spread's best
// costs the pool: best × (1 + r) plus r × evict, the cache it evicts
// there, r the share of turns that are follow-ups. nil if none.
//
// Placed where every conversation keeps its cache, it starts a cycle of
// evictions there: each of that server's conversations, and this one,
// misses its cache turn after turn. On the server that thrashes already,
// only its own turns miss. Priced for its first turn only, that server's
// queue kept new conversations away, and two servers thrashed where one
// did (conversations: 8 conversations on three servers of two slots).
func (h *Handler) gatherNew(avail, spread []*backend, j *job, evict, best float64, now time.Time) *backend {
	r := h.affinity.followShare()
	if r < followMin || math.IsInf(best, 1) {
		return nil
	}
	var buf [sampleSize]*backend
	g := h.affinity.gatherer(h.sampled(buf[:0], avail, j, ""), spread, now)
	if g == nil || !g.free() {
		return nil
	}
	if d, ok := h.expectedDelayOf(g, j); !ok || d > best*(1+r)+r*evict {
		return nil
	}
	return g
}

// evicts reports, for a conversation counted out of prev that might move
// to b, whether it evicts no conversation there (free: b holds fewer than
// its slots, one more than seen in use while more are not ruled out, as
// victim counts them), whether it evicts none or one that has most
// likely ended (idleOnly), and whether the move gathers the pool's
// overflow (gather): prev holds one live conversation more than it has
// slots, so that moving it leaves every other conversation there its
// cache, and b more than its slots too, and more over them than prev, or
// as many and b has the lower key (moves both ways would only swap
// conversations). Moved onto a server that thrashes already, it evicts a
// cache that is missed anyway. A move that leaves prev crowded spares no
// cache, and only lengthens b's queue.
func (t *affinityTable) evicts(b, prev *backend, now time.Time) (free, idleOnly, gather bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	v := t.victim(b, now)
	if v == nil {
		return true, true, false
	}
	if v.abandoned(now) {
		return false, true, false
	}
	if t.excess(prev, now) != 1 {
		return false, false, false
	}
	m := t.excess(b, now)
	return false, false, m > 1 || m == 1 && b.srv.key < prev.srv.key
}

// gatherer is the backend of list that thrashes with the most live
// conversations over its slots (the lowest key on a tie), nil when none
// does or when one of spread thrashes: the overflow gathers there already.
func (t *affinityTable) gatherer(list, spread []*backend, now time.Time) *backend {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, b := range spread {
		if t.thrashing(b, now) {
			return nil
		}
	}
	var gather *backend
	most := -1
	for _, b := range list {
		if !t.thrashing(b, now) {
			continue
		}
		if n := t.excess(b, now); n > most || n == most && b.srv.key < gather.srv.key {
			gather, most = b, n
		}
	}
	return gather
}

// mostCrowded keeps, in place (list's array is reused), the backends of
// list that thrash with the most live conversations over their slots;
// none when none thrashes. Where every server of list thrashes there is
// no cache to spare: all of them are kept, and the policy chooses (12
// conversations whose users read each answer, on three servers of two
// slots: gathered, one server held six to eight of them and their turns
// queued there, p99 0.83 s against 0.55). t.mu is held.
func (t *affinityTable) mostCrowded(list []*backend, now time.Time) []*backend {
	most, spare := t.mostOver(list, now)
	out := list[:0]
	if most < 0 {
		return out
	}
	if !spare {
		return append(out, list...) // every cache is missed already: nothing to spare by gathering
	}
	for _, b := range list {
		if t.thrashing(b, now) && t.excess(b, now) == most {
			out = append(out, b)
		}
	}
	return out
}

// mostOver is the most live conversations over its slots that a backend of
// list that thrashes holds (-1 when none thrashes), and whether one of
// list does not thrash (mostCrowded). t.mu is held.
func (t *affinityTable) mostOver(list []*backend, now time.Time) (most int, spare bool) {
	most = -1
	for _, b := range list {
		if t.thrashing(b, now) {
			most = max(most, t.excess(b, now))
		} else {
			spare = true
		}
	}
	return most, spare
}

// excess is how many more live conversations b hosts than it has slots,
// its slots known (bounded); 0 when they are not. t.mu is held.
func (t *affinityTable) excess(b *backend, now time.Time) int {
	slots, bounded := b.cacheSlots()
	if !bounded {
		return 0
	}
	return max(t.live(b, now, thrashWalk)-slots, 0)
}

// crowded reports whether b, its slots known (bounded), hosts more live
// conversations than it has slots: they take turns in its slots, each
// evicting another, whether or not a miss was seen yet. t.mu is held.
func (t *affinityTable) crowded(b *backend, now time.Time) bool {
	slots, bounded := b.cacheSlots()
	return bounded && t.live(b, now, slots+1) > slots
}

// live is how many conversations b hosts that are still going (their last
// turn within abandonedAfter and not taken to have ended), counting at
// most limit. t.mu is held.
func (t *affinityTable) live(b *backend, now time.Time, limit int) int {
	h := t.hosting[b.srv.key]
	if h == nil {
		return 0
	}
	n := 0
	for e := h.recent.Front(); e != nil && n < limit; e = e.Next() {
		a := e.Value.(*convActivity)
		if now.Sub(a.at) > abandonedAfter {
			break // most recent first: the rest idle longer
		}
		if !a.abandoned(now) {
			n++
		}
	}
	return n
}

// evictsLive reports whether a conversation placed on b evicts one that is
// still going (victim, not abandoned).
func (t *affinityTable) evictsLive(b *backend, now time.Time) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	v := t.victim(b, now)
	return v != nil && !v.abandoned(now)
}

// crowdedBest is the best delay a follow-up whose cache is believed intact
// weighs staying against (keepsConversation), given best, that of the
// servers where moving it evicts no conversation still going, and crowd,
// that of those where it does (each counting the eviction). While its own
// server has a slot free for it (no wait there), only the first count: a
// move onto a server whose slots all hold live conversations makes that
// server hold one more than it has slots, and they take turns evicting
// each other, every turn of each missing its cache until one of them
// leaves; the single eviction it is charged is the least of that. A
// slower server leaves a conversation there cached; a faster one whose
// slots are taken is no better for the pool. Where it would wait, the
// move relieves a queue, and all count (random-220: four conversations on
// a server of two slots and one of three 4x slower; a follow-up moving off
// the slow one evicted one of the fast server's two, whose turns then
// missed there, took 0.45 s instead of 0.15 and were counted out to the
// slow server, 1.4 s there: 12.2 req/s against least_conn's 15.3). +Inf
// only when both are.
func crowdedBest(best, crowd float64, prev delay) float64 {
	if prev.wait > 0 {
		return min(best, crowd)
	}
	if math.IsInf(best, 1) && !math.IsInf(crowd, 1) {
		return math.MaxFloat64 // only crowding moves: it stays, as it would against any
	}
	return best
}
