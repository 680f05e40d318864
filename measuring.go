package ollamaflow

import "time"

// Holding a request for a server still being measured. awaitProbe
// (below) holds a request while such a server may be as fast as the
// best measured one for it; servers can also differ by the kind of work,
// one fast at evaluating prompts and slow at generating, another the
// reverse, and then the best measured server for a request may be the
// worst: on a fresh pool of two such servers, a summary of a long
// document went to the generating server the moment it had answered a
// short question (2 s expected there, queued behind another summary:
// 1.6 s taken) while the prompt server answered its first summary
// 20 ms later in 0.15 s (prefill-decode: p99 1.0 s against the oracle's
// 0.45 s).

// measuringHoldShare is the share of a request's expected time on the
// best measured server it may wait, from when it was first held, for
// the first answer of a server still being measured: the most a hold
// costs a request that then goes to the best after all.
const measuringHoldShare = 0.25

// atypicalFactor is how much longer than the server's typical request
// a request must take on the best measured server to be held for one
// still being measured: a request like the others is served about as
// well there as anywhere (equal-over, held on a fresh pool of equal
// servers: p99 0.18 → 0.26 s).
const atypicalFactor = 3

// awaitMeasuring reports until when j had better wait in the queue than
// take ref, the best measured server, where it takes service seconds
// and best in all: while ref is slow for j (atypicalFactor) and one of
// j's candidates (unobserved, or a candidate of its latest pick not
// offered this time: busy being measured) has been measured for less
// than bootstrapHold and is not known to load the model first or to
// answer errors, until measuringHoldShare of best after j was first held.
func (h *Handler) awaitMeasuring(unobserved []*backend, j *job, ref *backend, service, best float64, now time.Time) (time.Time, bool) {
	if j.moved || best <= 0 {
		return time.Time{}, false
	}
	since := j.heldSince
	if since.IsZero() {
		since = now
	}
	until := since.Add(time.Duration(best * measuringHoldShare * float64(time.Second)))
	if !now.Before(until) {
		return time.Time{}, false
	}
	// Whether any candidate is being measured first: on a measured pool
	// that is an atomic flag per candidate, no lock.
	measuring := false
	for _, list := range [2][]*backend{unobserved, j.cands} {
		for _, b := range list {
			if _, ok := h.sampleSoon(b, j, now); ok {
				measuring = true
				break
			}
		}
	}
	if !measuring {
		return time.Time{}, false
	}
	if typical, ok := ref.srv.speed.serviceFor(nil); !ok || service < atypicalFactor*typical {
		return time.Time{}, false
	}
	if j.heldSince.IsZero() {
		j.heldSince = now
	}
	return until, true
}

// awaitOutrun reports until when a request had better stay in the queue
// than take a slot on ref, the best server measured: while a server still
// being measured, with spares beside its measuring request, has run that
// request for longer than ref's time for it without an answer, its spares
// are about to be outrun and moved (spare.go: watch), most likely to ref.
// They were sent before this request; taking ref's free slots first would
// leave them, the oldest requests, to queue behind it there. On a fresh
// pool of a fast server of four slots and two slow ones of one, the
// client whose first answer came first sent its next request into the
// fast server's slots some 40 ms before the spares moved there, and the
// spares waited behind it a whole answer (fresh-burst: p99 0.31 s against
// 0.2 s in most runs on a 2-core machine). The hold ends when the spares
// are outrun (outrunAt: at most probeSlack of ref's time and the proxy's
// slack later, and one spareRecheck) or the server answers, whichever
// comes first.
func (h *Handler) awaitOutrun(unobserved []*backend, j *job, ref *backend, now time.Time) (time.Time, bool) {
	if j.moved {
		return time.Time{}, false
	}
	refs := [1]*backend{ref}
	var until time.Time
	for _, b := range unobserved {
		if b.cfg.MaxParallel > 0 || b.srv.inFlight.Load() < 2 {
			continue // measured with several requests of its own, or no spare beside it
		}
		p, ok := h.sampleSoon(b, j, now)
		if !ok {
			continue
		}
		_, probe := b.srv.speed.measuringJob()
		service, ok := ref.srv.speed.serviceFor(probe)
		if !ok || now.Sub(p).Seconds() < service {
			continue // it may yet answer as soon as ref would have
		}
		// The spares' watch moves them at the outrun; the hold lasts one
		// recheck longer, so that they are placed first (released at the
		// same instant, the requests held drew the slots in some runs).
		if at := outrunAt(b, refs[:]).Add(spareRecheck); at.After(now) && (until.IsZero() || at.Before(until)) {
			until = at
		}
	}
	return until, !until.IsZero()
}

// probeSlack is how much longer than the measured server's service (and
// the time the proxy saw beyond its last answer's total_duration: the
// network and the proxy, which Ollama's durations leave out) a measuring
// request may run and still be taken as about to answer: equal servers
// sent their first requests together answer within a few milliseconds of
// each other.
const probeSlack = 0.1

// awaitProbe reports until when a request had better stay in the queue
// than wait wait seconds for a slot on best, which serves it in service
// seconds, with every slot it is planned to have taken: while a server
// still being measured (not cold for the model, as far as is known) has
// run its first request for less than service plus probeSlack, it may be
// as fast as best and free a slot before that wait ends. On a fresh pool
// of equal servers the first to answer otherwise drew every request held
// back for the first answer, its queue a whole answer deep, while the
// others answered a millisecond later (equal-over's p99 was 0.44 s,
// least_conn's 0.18 s). A request that would take best's untried slot
// waits too, when another server's answer is due before its half wait:
// since spare requests (spare.go) every server of an equal pool is seen
// serving two at once by its first answers, and the first to answer drew
// requests into an untried third slot, where they waited inside the
// server while the others were answering that millisecond (equal-exact:
// two requests of 0.17 s against 0.09 s).
func (h *Handler) awaitProbe(unobserved []*backend, j *job, best *backend, service, wait float64, now time.Time) (time.Time, bool) {
	var until time.Time
	limit := now.Add(time.Duration(wait * float64(time.Second)))
	took := time.Duration(service*(1+probeSlack)*float64(time.Second)) + best.srv.speed.lastSlack()
	for _, b := range unobserved {
		p, ok := h.sampleSoon(b, j, now)
		if !ok {
			continue
		}
		answer := p.Add(took)
		if answer.After(now) && answer.Before(limit) && (until.IsZero() || answer.Before(until)) {
			until = answer
		}
	}
	return until, !until.IsZero()
}

// sampleSoon reports whether b is being measured and may answer soon:
// its first request went out (at since) less than bootstrapHold ago, and
// it is not known to load j's model first nor answering errors, which
// would give no sample soon.
func (h *Handler) sampleSoon(b *backend, j *job, now time.Time) (since time.Time, ok bool) {
	if b.srv.speed.measured.Load() {
		return time.Time{}, false
	}
	p := b.srv.speed.probingSince()
	if p.IsZero() || now.Sub(p) >= bootstrapHold {
		return time.Time{}, false
	}
	if h.coldFor(b, j.model) && b.srv.models.Load().known || b.srv.speed.mostlyErrors(now) {
		return time.Time{}, false
	}
	return p, true
}

// lastSlack is the time the proxy saw beyond the server's total_duration
// on its latest answer that reported one.
func (sp *speed) lastSlack() time.Duration {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	for i := range endedRing {
		if e := sp.endedAgoLocked(i); e.work > 0 && !e.streamed {
			return e.slack
		}
	}
	return 0
}
