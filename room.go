package ollamaflow

import "time"

// Room tests. A server's room for models is learned from what its lists
// showed at once and from evictions (placement.go); one whose lists only
// ever showed one model is taken to hold one, and so is the pool until a
// server is seen holding more (roomHint): a pool of small GPUs thrashed
// when taken to have room. But a server with room to spare is then never
// given a second model, however much the model lacks a place: a request
// pays a load only when the load beats the queue where its model is, and
// a queue of clients that wait for their answers never grows that long.
// On one server of one slot, three times as slow, holding model-a, and
// one of four slots and room three holding model-b, three requests in
// four for model-a queued on the slow one (models-104: 8.9 req/s against
// least_conn's 38.7, which loaded model-a beside model-b).
//
// So while a model's requests queue, a server that would serve it at
// least roomTestGain times as fast as its best copy, with a slot free and
// its room only what its lists showed (no eviction seen there, no load
// seen to swap one model for another: noticeSwap), gets a copy of a
// request that loads the model there (loadcopy.go): the request itself
// goes where it was priced to go. The server's next list
// then shows both models, and it is taken to hold two; or the model it
// held is gone, its next request there loads it (noticeEviction), the
// room is learned as one, the model is loaded again where that costs
// least, and the server is not tested again. One whose test passed may
// be tested again at once, for a third model: its room may be larger
// still. Taken as done for roomTestEvery, a server of four slots and
// room three that a test in the warm-up had shown to hold two never got
// the third, the model asked most, which queued on a server of three
// slots twice as slow (models-136: 19-22 req/s against least_conn's
// 35-47; 38-40 tested again). A test whose outcome is not seen (the copy
// failed) waits roomTestEvery.

const (
	// roomTestGain is how many times the best copy's capacity a server
	// must promise for a model before a load there tests its room.
	roomTestGain = 2
	// roomTestEvery is how long a server's room is not tested again
	// after a test, unless a larger room was seen since.
	roomTestEvery = 10 * time.Minute
	// ollamaDefaultRoom is the room of a server left at Ollama's default
	// OLLAMA_MAX_LOADED_MODELS: three models per GPU, three on a CPU.
	ollamaDefaultRoom = 3
)

// roomTest is the server to send a load copy of j to, testing its room
// (nil: none), while j's best choice best, holding the model, has it wait:
// of j's candidates whose room may be larger than their lists showed, the
// one that would serve the model most, if it has a slot free. Only that
// one: a lesser one tested first, of room one after all, evicted a model
// in use and took the model from its best copy's queue, which the larger
// server, tested next, then took too (models-109: 51 → 39 req/s, three
// models switched on the smaller one).
func (h *Handler) roomTest(j *job, best *backend, now time.Time) *backend {
	if j.model == "" || !j.copyable || j.loadTo != nil {
		return nil
	}
	held, ok := capacityFor(best, j, now)
	if !ok {
		return nil
	}
	var pick *backend
	most := roomTestGain * held
	for _, b := range j.cands {
		if _, loading := b.srv.speed.pendingLoad(j.model, now); loading {
			return nil // a copy is on its way
		}
		snap := b.srv.models.Load()
		if !b.usable() || !snap.known || snap.isLoaded(j.model) || !b.srv.speed.roomUntested(snap, j.model, now) {
			continue
		}
		if c, ok := capacityFor(b, j, now); ok && c >= most {
			pick, most = b, c
		}
	}
	if pick == nil || !h.swapBearable(pick, j, now) {
		return nil
	}
	sp := &pick.srv.speed
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if pick.srv.inFlight.Load() >= int64(sp.slotsLocked(pick.cfg.MaxParallel, now)) {
		return nil // no slot free: a later request tests it
	}
	sp.roomTested, sp.roomTestedAt = now, sp.roomLocked(pick.srv.models.Load(), 0)
	return pick
}

// roomUntested reports whether a load of model on the server is priced
// as evicting a model (its room taken as what its lists showed), although
// no eviction showed that room, and no test of it was sent within
// roomTestEvery or one was and its room has grown since.
func (sp *speed) roomUntested(snap *modelSnapshot, model string, now time.Time) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.room > 0 && !sp.roomAt.IsZero() {
		return false // an eviction showed its room
	}
	if !sp.roomTested.IsZero() && now.Sub(sp.roomTested) < roomTestEvery && sp.roomLocked(snap, 0) <= sp.roomTestedAt {
		return false // tested, and no larger room seen since
	}
	if psCount(snap) >= ollamaDefaultRoom {
		return false // it holds what Ollama holds by default
	}
	return sp.victimOfLocked(snap, model, true) != ""
}

// swapBearable reports whether a room test of j's model on pick may be
// sent, given that it may fail: on a server of room one the test swaps
// the model held there (the victim) for j's. It is sent when that swap
// alone would leave neither model more pressed than the more pressed of
// the two is now (a model's pressure: its share of the requests over
// what its copies serve together), or when the victim has been idle for
// evictionHorizon. Where pick holds the victim's only copy, the swap puts
// the model asked more on the larger server only if j's model is asked
// more than the victim (models-104's case). Without this, on models-259
// (model-a and model-b asked alike; big, three slots and room one,
// holding model-b; two servers of one slot, both holding model-a, one
// model-b too), the test took big from model-b for model-a, its three
// slots idle for the load, and model-b, left with one slot, queued until
// another test loaded it beside model-a: 24 req/s against least_conn's
// 36, in three runs of three; 38.5 with it.
func (h *Handler) swapBearable(pick *backend, j *job, now time.Time) bool {
	sp := &pick.srv.speed
	snap := pick.srv.models.Load()
	sp.mu.Lock()
	victim := sp.victimOfLocked(snap, j.model, true)
	recent := victim != "" && sp.inDemandLocked(victim, now)
	sp.mu.Unlock()
	if !recent || h.demand == nil {
		return true
	}
	sj, _ := h.demand.shareOf(j.model)
	sv, _ := h.demand.shareOf(victim)
	// Capacities for a typical request of each model, not for j, whose
	// cap moves them: on models-333 of the random model mixes, priced for
	// each request, model-b's copy served 4.2 requests a second for one
	// and 10 to 21 for the others. The gate refused 25 tests of the
	// server of four slots and room one and let that one through, which
	// put model-b there in place of the model asked most (three runs with
	// that test: 47 to 76 req/s; one without: 91).
	tj := &job{model: j.model, answers: j.answers}
	vj := &job{model: victim, answers: j.answers}
	var capJ, capV, capVPick float64
	for _, b := range h.pool() {
		snap := b.srv.models.Load()
		if !b.usable() || !snap.known {
			continue
		}
		if snap.isLoaded(j.model) {
			if c, ok := capacityFor(b, tj, now); ok {
				capJ += c
			}
		}
		if snap.isLoaded(victim) {
			if c, ok := capacityFor(b, vj, now); ok {
				capV += c
				if b.srv == pick.srv {
					capVPick = c
				}
			}
		}
	}
	if capV-capVPick <= 0 {
		return sj > sv // the victim's only copy
	}
	capJPick, ok := capacityFor(pick, tj, now)
	if !ok || capJ <= 0 {
		return true
	}
	before := max(sj/capJ, sv/capV)
	after := max(sj/(capJ+capJPick), sv/(capV-capVPick))
	return after < before
}
