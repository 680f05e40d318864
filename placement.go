package ollamaflow

import (
	"cmp"
	"math"
	"slices"
	"time"
)

// Model placement: which models a server holds, what a load there would
// evict, and what that eviction costs the rest of the pool. least_delay
// adds these to the speed model's estimates (cost.go) so that, under a
// steady mix, models settle on servers instead of thrashing.

// evictionHorizon is how recently a model must have been used for its
// eviction to count as a cost: one idle longer is no longer in demand.
const evictionHorizon = 60 * time.Second

// inDemandLocked reports whether model was used on the server within
// evictionHorizon: evicting it there costs a load.
func (sp *speed) inDemandLocked(model string, now time.Time) bool {
	r := sp.models[model]
	return r != nil && now.Sub(r.lastUsed) < evictionHorizon
}

// noticeEviction records that the server loaded model although it was
// believed resident: it holds fewer models than believed (at most n-1 of
// the n believed there with model), and model's fellows were the ones it
// dropped. An eviction only ever lowers the room: a belief that listed
// models gone long ago says nothing about a room already learned lower.
//
// The belief was wrong, so the handler has the server's /api/ps read
// again (in the background, one read at a time): the load evicted a
// model, and the guess of which one (ollamaVictimLocked: Ollama's own
// order, once the files of the models there are read) fails when another
// client used them. Until the list is read the guess stands; a list read after the
// eviction also raises the room back to what the server was seen to hold
// at once.
//
// Not when the server's last list showed every model believed there at
// once: it held them all, so no load of ours overflowed its room; they
// were unloaded (keep_alive, a restart, another client's load) and are
// taken as gone until the list read again says which are not. Taken as
// an eviction, a server of room two that lost both models was learned to
// have room for one, and the pool's hint with it (roomHint), until its
// lists showed two again, which placement then no longer sought.
func (s *server) noticeEviction(model string, now time.Time) {
	snap := s.models.Load()
	s.speed.mu.Lock()
	n := len(snap.loaded) + s.speed.loadingBesideLocked(snap, model)
	if n < 2 {
		s.speed.mu.Unlock()
		return // alone: it expired (keep_alive), nothing about room
	}
	if psCount(snap) == n {
		s.speed.mu.Unlock()
		for m := range snap.loaded {
			if m != model {
				s.markUnloaded(m)
			}
		}
		return
	}
	if s.speed.room == 0 || n-1 < s.speed.room {
		s.speed.room = n - 1
	}
	s.speed.roomAt = now
	victim := s.speed.victimLocked(snap, model)
	s.speed.mu.Unlock()
	if victim != "" {
		s.markUnloaded(victim)
	}
}

// swapSent is a load sent to a server whose lists showed it full: model
// was to evict victim, one of the listed models.
type swapSent struct {
	model, victim string
	at            time.Time
	listed        int
}

// noticeSwap learns the room from the first list read after a load that
// was to evict a listed model: showing the model loaded, the victim gone
// and no more models than before, it shows the server held no more, as an
// eviction a request runs into does (noticeEviction). A load whose victim
// was foreseen evicts what was expected and is never run into, so a server
// of room one whose loads all swapped one model for another was taken to
// hold what its lists showed, as one never seen full, and tested for
// more: the test's copy evicted the model in use there (models-136).
//
// Models other loads in flight there are loading count as held: Ollama
// lists a model only once its runner has started, which for a llama model
// is at the end of its load (tiny-llama on v0.17.4 was listed 318 ms into
// a 324 ms load; tiny-bert 78 ms into 330), and the fakes list it at the
// end. Read as the room, a list taken while two other models were loading
// on models-274's four-slot server of room three showed it one, which made
// the pool's hint one (roomHint), and every server was priced as full.
func (sp *speed) noticeSwap(snap *modelSnapshot) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	w := sp.swap
	if w.at.IsZero() || !snap.at.After(w.at) || snap.loaded[w.model] == nil {
		if !w.at.IsZero() && snap.at.Sub(w.at) > evictionHorizon {
			sp.swap = swapSent{} // never seen loaded: nothing to learn
		}
		return
	}
	sp.swap = swapSent{}
	n := psCount(snap) + sp.loadingBesideLocked(snap, w.model)
	if snap.loaded[w.victim] != nil || n > w.listed {
		return // room for more than was listed
	}
	if sp.room == 0 || n < sp.room || sp.roomAt.IsZero() {
		sp.room = n
	}
	sp.roomAt = snap.at
}

// loadingBesideLocked counts the models other than model, and than those
// believed resident, that requests in flight on the server may be loading
// (sent where it was not resident, or before the lists were read): the
// server was asked to hold them too. Left out, the load of one of them,
// still unanswered (or read over by a list taken while it loaded),
// evicting model read as a room one smaller than it was (models-87, a
// debug log of each eviction noticed: a server of room two learned as one
// while a third model's requests were in flight there).
func (sp *speed) loadingBesideLocked(snap *modelSnapshot, model string) int {
	var seen []string
	for _, t := range sp.tasks {
		m := t.job.model
		if !(t.cold || t.blind) || t.done.Load() || m == "" || m == model || snap.isLoaded(m) || slices.Contains(seen, m) {
			continue
		}
		seen = append(seen, m)
	}
	return len(seen)
}

// victimLocked is the model a load of model would evict on the server,
// when it is known to be full: the one Ollama picks (ollamaVictimLocked),
// or, while the file of a model resident is not known yet, the least
// recently used; "" when there is room or nothing is known.
func (sp *speed) victimLocked(snap *modelSnapshot, model string) string {
	return sp.victimOfLocked(snap, model, false)
}

// victimOfLocked is victimLocked; unknownFull takes a server whose room
// is not known yet to be full: what a load may evict, for pricing it.
func (sp *speed) victimOfLocked(snap *modelSnapshot, model string, unknownFull bool) string {
	room := sp.room
	if snap.at.After(sp.roomAt) {
		room = max(room, psCount(snap))
		sp.room = room
	}
	others := len(snap.loaded)
	if _, ok := snap.loaded[model]; ok {
		others--
	}
	if room == 0 && unknownFull {
		room = others
	}
	if room == 0 || others < room {
		return "" // model fits beside the others
	}
	if v, ok := sp.ollamaVictimLocked(snap, model); ok {
		return v
	}
	var victim string
	var oldest time.Time
	for m := range snap.loaded {
		if m == model {
			continue
		}
		var used time.Time
		if r := sp.models[m]; r != nil {
			used = r.lastUsed
		}
		if victim == "" || used.Before(oldest) || used.Equal(oldest) && m < victim {
			victim, oldest = m, used
		}
	}
	return victim
}

// modelFile is the file Ollama keeps a model in, for the digest its
// /api/ps entry showed.
type modelFile struct{ digest, path string }

// ollamaVictimLocked is the model Ollama evicts to load model, once the
// file of every other model resident is known: of those no request of
// ours is using, the one whose file sorts first; when each is in use, the
// first of all, which the load waits for. Ollama v0.17.4 orders them by
// keep_alive, then by file (server/sched.go, findRunnerToUnload), not by
// use: on a server of room two, tl2, tl1, tl2, then tl3 evicted tl2, the
// model used last (the fakes evict so too: internal/fakeollama,
// residency.go). Guessed as the least recently used, the victim was
// wrong wherever the files' order and the use differed, and the next
// request for the model really evicted, sent as if it were resident,
// paid its load (models-262). keep_alive is taken to be alike.
func (sp *speed) ollamaVictimLocked(snap *modelSnapshot, model string) (string, bool) {
	var first, idle string
	before := func(m, than string) bool {
		a, b := sp.files[m].path, sp.files[than].path
		return than == "" || a < b || a == b && m < than
	}
	for m := range snap.loaded {
		if m == model {
			continue
		}
		if _, ok := sp.files[m]; !ok {
			return "", false
		}
		if before(m, first) {
			first = m
		}
		if !sp.usingLocked(m) && before(m, idle) {
			idle = m
		}
	}
	return cmp.Or(idle, first), first != ""
}

// usingLocked reports whether a request of ours for model is in flight
// on the server.
func (sp *speed) usingLocked(model string) bool {
	for _, t := range sp.tasks {
		if t.job.model == model && !t.done.Load() {
			return true
		}
	}
	return false
}

// fileUnknown reports whether the file of model, listed with digest, is
// still to be read.
func (sp *speed) fileUnknown(model, digest string) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	f, ok := sp.files[model]
	return !ok || f.digest != digest
}

// setFile records the file of model, listed with digest, keeping those
// of the models listed (at most maxTrackedModel).
func (sp *speed) setFile(model, digest, path string, listed map[string][]byte) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.files == nil {
		sp.files = make(map[string]modelFile)
	}
	for m := range sp.files {
		if _, ok := listed[m]; !ok {
			delete(sp.files, m)
		}
	}
	if len(sp.files) < maxTrackedModel {
		sp.files[model] = modelFile{digest, path}
	}
}

// otherLoadLocked is the time left of the longest load of a model other
// than model under way on a server whose room for models is not known at
// all (no list showed a model there, no eviction was seen): a request for
// a model resident there waits for it, as the load may evict its model
// (Ollama evicts an idle model to make room, and the request then loads
// it again). On two servers of room 1 started empty, one holding model-a
// and loading model-b, a request for model-a sent there during the load
// took 3.2 s and evicted model-b, whose requests then loaded it again
// (two-models-empty: 27-33 loads per 1,000 in about 1 run of 10, against 10).
func (sp *speed) otherLoadLocked(model string, now time.Time) float64 {
	if sp.room != 0 || model == "" {
		return 0
	}
	left := 0.0
	for _, t := range sp.tasks {
		if t.loader && t.job.model != "" && t.job.model != model {
			cost := time.Duration(sp.loadCostLocked(t.job.model) * float64(time.Second))
			left = max(left, t.started.Add(cost).Sub(now).Seconds())
		}
	}
	return left
}

// psCount is how many models the server's /api/ps listed at once (entries
// learned from answers carry no raw entry).
func psCount(snap *modelSnapshot) int {
	n := 0
	for _, raw := range snap.loaded {
		if raw != nil {
			n++
		}
	}
	return n
}

// markUnloaded records that model is no longer resident on the server,
// until /api/ps says otherwise.
func (s *server) markUnloaded(model string) {
	s.editModels(func(cur *modelSnapshot) *modelSnapshot {
		if !cur.isLoaded(model) {
			return nil
		}
		next := *cur
		next.loaded = copyWithout(cur.loaded, model)
		return &next
	})
}

// evictionCost is what loading model on b costs the rest of the pool: the
// model it would evict must be loaded again somewhere if it is still in
// demand (used within evictionHorizon), less so when other candidates hold
// it too. Under a steady mix this keeps each model where it is and sends a
// load where it evicts least, so models settle instead of thrashing.
//
// Evicting a model's only copy costs more the more it is asked (demand's
// rate): each request for it until it is loaded again waits for that load.
// Priced at one load, a request for a model asked once in twenty evicted
// the only copy of the one asked most on a server of room three holding
// four models' worth of demand, and the two then took turns there
// (models-21: 88 loads per 1,000 in the runs that went so, 5.2 req/s
// against 10 to 12 in those that did not). Counted, 15 model workloads
// ran 1.074 times as fast (geometric mean, 2 runs each; the bimodal draws
// still go either way). demand may be nil (nothing known: one load).
func evictionCost(b *backend, model string, pool []*backend, demand *modelDemand, now time.Time) float64 {
	sp := &b.srv.speed
	snap := b.srv.models.Load()
	sp.mu.Lock()
	if _, loading := sp.pendingLoadLocked(model, now); loading {
		sp.mu.Unlock()
		return 0 // joining a load under way evicts nothing more
	}
	// A server whose room is not known yet is priced as full: a fresh
	// pool's servers with a model each otherwise looked free to load a
	// second one beside a model in use, and one of room 1 then evicted it
	// (two-models-empty).
	victim := sp.victimOfLocked(snap, model, true)
	var cost float64
	if victim != "" {
		if sp.inDemandLocked(victim, now) {
			cost = sp.loadCostLocked(victim)
		}
	}
	sp.mu.Unlock()
	if cost == 0 {
		return 0
	}
	holders := 0
	for _, o := range pool {
		if o.srv != b.srv && o.srv.models.Load().isLoaded(victim) {
			holders++
		}
	}
	if holders == 0 {
		// Its only copy: every request for it until it is loaded again
		// waits for that load, half of it on average.
		cost *= 1 + demand.rateOf(victim)*cost/2
	}
	return cost / float64(1+holders)
}

// coldCost is what a model load is expected to cost on the server.
func (sp *speed) coldCost(model string) float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.loadCostLocked(model)
}

// A request for a model that comes before a candidate's lists were ever
// read waits for them, up to listsHold after the read began: sent blind,
// a fresh pool's first requests for a model that is resident nowhere
// loaded it on every server they reached, evicting the model the others
// wanted, and since such a request is no known load (begin), the next
// ones for it could not join it either (two-models: 20–27 loads per
// 1,000 requests in two of four runs against 3). A loopback read takes a
// millisecond or two; a server whose read hangs delays the first
// requests by listsHold once.
const (
	listsHold = 250 * time.Millisecond
	listsPoll = 2 * time.Millisecond
)

// firstListsDue is when to look again for the lists of a candidate whose
// first read is under way; zero when none is (or it began listsHold ago).
func firstListsDue(avail []*backend, now time.Time) time.Time {
	var due time.Time
	for _, b := range avail {
		if b.srv.models.Load().known {
			continue
		}
		started := b.srv.firstReadStarted()
		if started.IsZero() || now.Sub(started) >= listsHold {
			continue
		}
		at := now.Add(listsPoll)
		if end := started.Add(listsHold); end.Before(at) {
			at = end
		}
		if due.IsZero() || at.Before(due) {
			due = at
		}
	}
	return due
}

// plannedLoad is a load of model chosen at at, its request not begun yet.
type plannedLoad struct {
	model string
	at    time.Time
}

// maxPlanned bounds the loads planned per server: a burst for many models
// at once keeps the latest.
const maxPlanned = 8

// planLoad notes that a request for model, not resident on the server, was
// just given it, unless a load of model is under way there already. Until
// the request begins (begin makes it the loader), the load counts as under
// way: requests picked in the same instant (a burst, a queue released at
// once) join it instead of each loading the model on another server,
// evicting what the others wanted there (two-models: a fresh pool's burst
// loaded the rarer model on two servers of three in two of eight runs).
func (sp *speed) planLoad(model string, now time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if _, loading := sp.pendingLoadLocked(model, now); loading {
		return
	}
	keep := sp.planned[:0]
	for _, p := range sp.planned {
		if now.Sub(p.at) < probeClaimTTL {
			keep = append(keep, p)
		}
	}
	if len(keep) >= maxPlanned {
		keep = append(keep[:0], keep[1:]...)
	}
	sp.planned = append(keep, plannedLoad{model, now})
}

// planLoad notes the load of j's model on b, which the policy just gave
// the request a slot of, when the model is known not to be resident there.
func (h *Handler) planLoad(b *backend, j *job) {
	if j.model != "" && b.srv.models.Load().known && h.coldFor(b, j.model) {
		b.srv.speed.planLoad(j.model, time.Now())
	}
}

// takePlannedLocked removes the load planned for model, as its request
// begins.
func (sp *speed) takePlannedLocked(model string) {
	for i, p := range sp.planned {
		if p.model == model {
			sp.planned = slices.Delete(sp.planned, i, i+1)
			return
		}
	}
}

// unplanLoad gives up the load planned for model (planLoad) whose request
// was never sent.
func (sp *speed) unplanLoad(model string) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.takePlannedLocked(model)
}

// notResident reports whether model is not resident on b as far as its
// snapshot says, which is also true before its lists were read (begin
// checks known itself: a request then is no load).
func notResident(b *backend, model string) bool {
	return model != "" && !b.srv.models.Load().isLoaded(model)
}

// coldFor is notResident through the frontend's model index: a bit test
// per candidate.
func (h *Handler) coldFor(b *backend, model string) bool {
	return model != "" && !h.isLoaded(b, model)
}

// pendingLoad is the time left of a load of model under way on the server
// (false: none is).
func (sp *speed) pendingLoad(model string, now time.Time) (float64, bool) {
	if model == "" {
		return 0, false
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.pendingLoadLocked(model, now)
}

// joinLoadCost is the expected delay, on a server not observed yet that is
// loading model, of one more request for model: the rest of the load,
// then its own work at service seconds (the best observed server's: the
// server's own speed is not known), behind the requests already sent
// there, taken one at a time (it may have a single slot). Requests for a
// model whose load is under way wait for that load instead of starting
// another elsewhere, as Ollama's scheduler has them wait on one server.
func joinLoadCost(b *backend, model string, service float64, now time.Time) float64 {
	left, _ := b.srv.speed.pendingLoad(model, now)
	ahead := max(b.srv.inFlight.Load()-1, 0)
	return left + float64(ahead)*service + service
}

// roomLocked is the server's room for models as far as known: learned
// from an eviction, or as many as its lists showed at once, and at least
// hint (the pool's, roomHint), even where an eviction showed this server
// less (only a room of one lowers the hint itself); at least one.
func (sp *speed) roomLocked(snap *modelSnapshot, hint int) int {
	if room := max(sp.room, psCount(snap)); room > 0 && room >= hint {
		return room
	}
	return max(sp.room, hint, 1)
}

// roomHint is the room placement takes a server of pool to have before
// its own evictions or lists show it: as many models as any server of the
// pool listed at once in /api/ps, unless some server's room was taken as
// one (a pool of small GPUs): an eviction showed it, or a load there was
// priced (victimOfLocked) while its lists showed one model. The second is
// broader than "shown by an eviction", and kept so: taken that narrowly
// (with placementMove's victim counted in the same room), a fresh pool's
// hint rose with the first server seen holding two, servers of smaller
// room were taken to have room for more, and moves evicted models in use
// (many-models 0 → 18 loads per 1,000, models-room-2-3 3 → 17, models-44
// 49 → 124, models-31 33 → 62; throughput 0.75 and 0.83 of main on the
// last two; one run each, 2026-12-05). What is merely believed
// resident (answers since the last list) counts for nothing: a server of
// room one that loaded a second model is believed to hold both until a
// request finds the first gone. Taken as one, servers each seen with one
// model of six, beside others holding two, were taken as full: a model
// short of copies never got another while servers holding a rarely used
// model idled (many-models: one server at 32 of 400 requests). Taken as
// two on a pool where none ever held two, servers of room one thrashed
// (two-models-empty: 30-43 loads/1k against 10).
func roomHint(pool []*backend) int {
	seen := 1
	for _, b := range pool {
		snap := b.srv.models.Load()
		sp := &b.srv.speed
		sp.mu.Lock()
		learned := sp.room
		sp.mu.Unlock()
		if learned == 1 {
			return 1
		}
		room := max(learned, psCount(snap))
		seen = max(seen, room)
	}
	return seen
}

// placementMove is the server a request for j's model is sent to, to load
// it there, when the model has fewer copies than its share of the places,
// every copy is busy, and a server offered holds a model that can spare a
// copy (or has room) and has a slot free of other models' requests; nil
// when no move is due.
func (h *Handler) placementMove(avail []*backend, j *job, now time.Time) *backend {
	if j.model == "" || h.demand == nil {
		return nil
	}
	pool := h.pool()
	if len(pool) > largePool || len(pool) < 2 {
		return nil
	}
	share, requests := h.demand.shareOf(j.model)
	if requests < planMinRequests {
		return nil
	}
	have, total := 0, 0
	held := 0.0 // the requests a second the copies serve (capacityFor)
	hint := roomHint(pool)
	for _, b := range pool {
		snap := b.srv.models.Load()
		if !b.usable() || !snap.known {
			continue
		}
		if _, loading := b.srv.speed.pendingLoad(j.model, now); loading {
			return nil // a copy is on its way: one move at a time
		}
		b.srv.speed.mu.Lock()
		total += b.srv.speed.roomLocked(snap, hint)
		slots := b.srv.speed.slotsLocked(b.cfg.MaxParallel, now)
		c, measured := b.srv.speed.capacityLocked(j, slots)
		b.srv.speed.mu.Unlock()
		if snap.isLoaded(j.model) {
			if b.srv.inFlight.Load() < int64(slots) {
				return nil // a copy has a slot free: the model is not short
			}
			have++
			if measured {
				held = max(held, c)
			}
		}
	}
	need := share*float64(total) - float64(have)
	if have == 0 || need < planMargin {
		return nil // no copy anywhere (an ordinary load), or enough
	}
	var pick *backend
	pickCost := math.Inf(1)
	for _, b := range avail {
		snap := b.srv.models.Load()
		if !snap.known || snap.isLoaded(j.model) {
			continue
		}
		// A copy where it serves a small part of what the best copy
		// does is not worth its load: the request sent to load it waits
		// for the load there and leaves the shortage as it was. A slow
		// server is the idlest one, so the least busy took the moves,
		// and its slow loads (a server of one slot, three times as slow,
		// loading for 2.4 s) made the run's longest requests (models-08
		// of the random model mixes).
		if c, ok := capacityFor(b, j, now); ok && c < placeMinCapacity*held {
			continue
		}
		sp := &b.srv.speed
		sp.mu.Lock()
		victim := sp.victimLocked(snap, j.model)
		free := victim == "" && len(snap.loaded) < sp.roomLocked(snap, hint)
		// Nor is one placed where requests for other models fill its
		// slots: the load waits for them and evicts the model they asked
		// for, whatever the lists showed (read while it loaded, they
		// show the one before), and those sent after them load it back.
		// Shares lag a shift in demand by seconds (demandTau): moved by
		// them alone, the model asked least after a shift evicted the
		// one asked most from a server where eight of its requests
		// queued, and they waited for two loads (models-136: p99 3.6 s,
		// least_conn's 0.46 s).
		full := victim != "" && sp.servingOthersLocked(j.model) >= sp.slotsLocked(b.cfg.MaxParallel, now)
		sp.mu.Unlock()
		if full {
			continue
		}
		// The victim keeps a copy elsewhere and, one copy short, would
		// lack less than the model does now.
		ok := free
		if victim != "" {
			vs, _ := h.demand.shareOf(victim)
			copies := placesOf(pool, victim)
			ok = copies >= 2 && vs*float64(total)-float64(copies-1)+planMargin < need
		}
		if !ok {
			continue
		}
		// The one where the request is expected to be served soonest
		// (a server not measured yet last): the load waits for the
		// requests in flight there and takes as long as that server's
		// loads do. Taken to the least busy, the moves that the check
		// above lets through still went to the slowest of them, a
		// server three times as slow loading for 4.5 s (models-08).
		cost := math.Inf(1)
		if d, measured := estimateDelay(b, j, now); measured {
			cost = d.total()
		}
		if pick == nil || cost < pickCost || cost == pickCost && b.srv.inFlight.Load() < pick.srv.inFlight.Load() {
			pick, pickCost = b, cost
		}
	}
	return pick
}

// placeMinCapacity is the least share of the best copy's capacity a new
// copy of a model must have to be placed by demand (placementMove).
const placeMinCapacity = 0.25

// capacityFor is how many requests like j a second the server serves with
// its slots busy (slots over its time for j); false before it is measured.
func capacityFor(b *backend, j *job, now time.Time) (float64, bool) {
	sp := &b.srv.speed
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.capacityLocked(j, sp.slotsLocked(b.cfg.MaxParallel, now))
}

// capacityLocked is capacityFor with the server's slots known.
func (sp *speed) capacityLocked(j *job, slots int) (float64, bool) {
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return 0, false
	}
	p, o := sp.serviceLocked(j)
	if p+o <= 0 {
		return 0, false
	}
	return float64(slots) / (p + o), true
}

// placesOf counts the usable servers of pool whose lists show model
// resident.
func placesOf(pool []*backend, model string) int {
	n := 0
	for _, b := range pool {
		if snap := b.srv.models.Load(); b.usable() && snap.known && snap.isLoaded(model) {
			n++
		}
	}
	return n
}

// scoredOf is b as priced in observed (zero when it is not there).
func scoredOf(observed []scored, b *backend) scored {
	for _, c := range observed {
		if c.b == b {
			return c
		}
	}
	return scored{}
}
