package ollamaflow

import (
	"slices"
	"time"
)

// Waiting for a model elsewhere: a request offered a load (the queue
// offers a waiter one server at a time, as slots free) waits instead when
// a candidate it was not offered is loading its model already, or would
// serve it sooner than the eviction the load costs; and a fresh pool's
// measuring request is not sent where a load is under way or another
// candidate holds the model.

// loadUnderWayElsewhere reports until when a request for j's model had
// better wait than take a load priced at best: a candidate that the pick
// was not offered (being measured with its first request, or left to
// older requests in the queue, which come first) is loading the model
// already and would serve it sooner; service is the request's time on the
// best server offered, for one whose speed is not known yet. On a fresh
// pool of room 1 such a request loaded its model on the one server it was
// offered, evicting a model in use there, a second before the load it
// could have joined was done (two-models-empty). A candidate merely
// holding the model is not waited for: queued behind a popular model's
// busy copy, requests would never make it a second one (many-models).
func (h *Handler) loadUnderWayElsewhere(avail []*backend, j *job, service, best float64, now time.Time) (time.Time, bool) {
	if j.model == "" || len(j.cands) > largePool {
		return time.Time{}, false // above largePool, a pick looks at a sample only
	}
	return earliestNotOffered(avail, j, now, func(b *backend) (float64, bool) {
		left, loading := b.srv.speed.pendingLoad(j.model, now)
		if !loading {
			return 0, false
		}
		cost, wait := left+service, left
		if d, ok := b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), true, now); ok {
			cost, wait = d.total()/float64(b.weight()), d.wait+d.load
		}
		return wait, cost < best*(1-nearTie)
	})
}

// earliestNotOffered is the earliest time one of j's usable candidates
// that the pick was not offered would take j, among those price accepts;
// price gives a candidate's wait, and false to pass it over.
func earliestNotOffered(avail []*backend, j *job, now time.Time, price func(b *backend) (wait float64, ok bool)) (time.Time, bool) {
	var until time.Time
	for _, b := range j.cands {
		if slices.Contains(avail, b) || !b.usable() {
			continue
		}
		wait, ok := price(b)
		if !ok {
			continue
		}
		at := now.Add(time.Duration(max(wait, 0.001) * float64(time.Second)))
		if until.IsZero() || at.Before(until) {
			until = at
		}
	}
	return until, !until.IsZero()
}

// soonerNotOffered reports until when a request for j's model had better
// wait than take the load priced at best, of which evict is what the load
// would cost the rest of the pool: a candidate the pick was not offered
// (busy, or left to older requests) would serve it sooner than that, and
// sooner than the eviction alone costs. The queue offers a waiter one
// server at a time as slots free, and a waiter took whatever load it was
// offered: in models-79 of the random model mixes requests for a model
// loaded it on a server three times as slow (5.1 s), evicting a model in
// use, while a server holding it was a slot away (26.5 → 47.4 req/s, p99
// 8.2 → 2.0 s). A load that evicts nothing in use (a server with room, a
// model no longer asked) is still taken: waiting behind a busy copy, a
// popular model would never get a second (loadUnderWayElsewhere). So a
// candidate holding the model is waited for only when it serves sooner
// than the eviction alone costs; one that must load the model too, when
// it serves well sooner than the offer (holdForLoadShare): the copy is
// made all the same, where it costs less. Bounded by the eviction alone
// there as well, two models asked rarely took turns in the one place of
// the pool's largest server while a server of room three had a place free
// a slot away (models-92: 40-54 req/s at a p99 of 2.2-3.2 s in most runs;
// least_conn 59-60).
func (h *Handler) soonerNotOffered(avail []*backend, j *job, best, evict float64, now time.Time) (time.Time, bool) {
	if j.model == "" || len(j.cands) > largePool || evict <= 0 {
		return time.Time{}, false
	}
	return earliestNotOffered(avail, j, now, func(b *backend) (float64, bool) {
		d, ok := b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), h.coldFor(b, j.model), now)
		if !ok {
			return 0, false
		}
		cost := d.total()
		if d.load > 0 {
			cost += evictionCost(b, j.model, j.cands, h.demand, now)
		}
		cost /= float64(b.weight())
		if d.load > 0 && cost < best*holdForLoadShare {
			return d.wait, true
		}
		return d.wait, cost < best*(1-nearTie) && cost < evict
	})
}

// holdForLoadShare is the most, as a share of the offer's price, that a
// candidate not offered which must load the model too may cost for a
// waiter offered an eviction to wait for it (soonerNotOffered). Its price
// counts its own requests in flight, not the queue's older waiters that
// will take its slots first, so it is optimistic: waited for within
// nearTie of the offer, such candidates cost more than they saved
// (many-models 142 → 102 req/s, models-08 66 → 49, two-models 42.5 →
// 33.8, one run each).
const holdForLoadShare = 0.8

// loadingElsewhere reports whether a candidate of j (offered to this pick
// or not) is loading j's model.
func loadingElsewhere(j *job, now time.Time) bool {
	if j.model == "" || len(j.cands) > largePool {
		return false
	}
	for _, b := range j.cands {
		if _, loading := b.srv.speed.pendingLoad(j.model, now); loading && b.usable() {
			return true
		}
	}
	return false
}

// residentElsewhere reports whether, with no candidate of j measured yet
// (a fresh pool), a usable one other than b holds j's model.
func (h *Handler) residentElsewhere(j *job, b *backend) bool {
	if j.model == "" || len(j.cands) > largePool {
		return false
	}
	held := false
	for _, o := range j.cands {
		if o.srv.speed.measured.Load() {
			return false
		}
		held = held || o != b && o.usable() && h.isLoaded(o, j.model)
	}
	return held
}
