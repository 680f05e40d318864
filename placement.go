package ollamaflow

import "time"

// Model placement: which models a server holds, what a load there would
// evict, and what that eviction costs the rest of the pool. least_delay
// adds these to the speed model's estimates (cost.go) so that, under a
// steady mix, models settle on servers instead of thrashing.

// evictionHorizon is how recently a model must have been used for its
// eviction to count as a cost: one idle longer is no longer in demand.
const evictionHorizon = 60 * time.Second

// noticeEviction records that the server loaded model although it was
// believed resident: it holds fewer models than believed, and model's
// fellows were the ones it dropped.
func (s *server) noticeEviction(model string, now time.Time) {
	snap := s.models.Load()
	n := len(snap.loaded)
	if n < 2 {
		return // alone: it expired (keep_alive), nothing about room
	}
	s.speed.mu.Lock()
	s.speed.room, s.speed.roomAt = n-1, now
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

// notResident reports whether model is known not to be resident on b.
func notResident(b *backend, model string) bool {
	return model != "" && !b.srv.models.Load().isLoaded(model)
}

// coldFor is notResident through the frontend's model index: a bit test
// per candidate.
func (h *Handler) coldFor(b *backend, model string) bool {
	return model != "" && !h.isLoaded(b, model)
}
