package ollamaflow

import (
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

// noticeEviction records that the server loaded model although it was
// believed resident: it holds fewer models than believed (at most n-1 of
// the n believed there with model), and model's fellows were the ones it
// dropped. An eviction only ever lowers the room: a belief that listed
// models gone long ago says nothing about a room already learned lower.
//
// The belief was wrong, so the handler has the server's /api/ps read
// again (in the background, one read at a time): the load evicted a
// model, and the guess of which one (the least recently used, as
// Ollama's scheduler chooses among idle models) fails when that one was
// busy. Until the list is read the guess stands; a list read after the
// eviction also raises the room back to what the server was seen to hold
// at once.
func (s *server) noticeEviction(model string, now time.Time) {
	snap := s.models.Load()
	n := len(snap.loaded)
	if n < 2 {
		return // alone: it expired (keep_alive), nothing about room
	}
	s.speed.mu.Lock()
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

// victimLocked is the model a load of model would evict on the server:
// the least recently used of those resident, when the server is known to
// be full; "" when there is room or nothing is known.
func (sp *speed) victimLocked(snap *modelSnapshot, model string) string {
	room := sp.room
	if snap.at.After(sp.roomAt) {
		room = max(room, psCount(snap))
		sp.room = room
	}
	others := len(snap.loaded)
	if _, ok := snap.loaded[model]; ok {
		others--
	}
	if room == 0 || others < room {
		return "" // model fits beside the others
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
func evictionCost(b *backend, model string, pool []*backend, now time.Time) float64 {
	sp := &b.srv.speed
	snap := b.srv.models.Load()
	sp.mu.Lock()
	victim := sp.victimLocked(snap, model)
	var cost float64
	if victim != "" {
		if r := sp.models[victim]; r != nil && now.Sub(r.lastUsed) < evictionHorizon {
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
