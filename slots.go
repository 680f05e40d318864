package ollamaflow

import "time"

// How a server's parallel slots are learned (issue 13: "slots are
// estimated robustly: never locked in by a quiet history"): from the
// times Ollama reports on /api (learnSlotsLocked) and from an OpenAI
// stream's first and last bytes (learnStreamSlotsLocked). cost.go plans
// with them (slotsLocked).

// learnSlotsLocked learns the server's parallel slots from an answer that
// was warm (no model load in it) and not held back by its client: how
// many requests surely worked at once with it (slotsLo), and, when it
// waited for a slot (waited), how many may have been at work when it came
// (slotsHi).
//
// Both counts rest on times the server reported, never on the order in
// which requests were sent: requests sent together (a queue released at
// once, clients answered at once) reach the server in any order, and the
// proxy sees an answer end some time after the server freed its slot,
// more on a busy machine. A count that trusted the order read those races
// as a third slot on a server of two (and planned a fourth, leaving
// requests queued inside a full server while another had a slot free) or
// as one slot on a server of two. Each request's place in time is only
// known within its slack: the time the proxy saw beyond the server's
// total_duration (the network, both ways, and the proxy's own delays).
func (sp *speed) learnSlotsLocked(t *task, tm timings, waited bool, now time.Time) {
	work := max(tm.prompt, 0) + max(tm.ev, 0)
	if work <= 0 {
		return
	}
	slack := max(now.Sub(t.started)-tm.total, 0)
	sp.noteWorkLocked(t.id, work, slack, false)
	atOnce := sp.servedAtOnceLocked(t, now.Add(-work), now.Add(-slack))
	sp.sawAtOnceLocked(atOnce)
	if waited {
		// It waited for a slot: every slot was at work when it came, so
		// the server has no more than the requests that may have been
		// at work then.
		sp.sawWaitLocked(sp.heldAtLocked(t, t.started, now.Add(-tm.total)), atOnce, now)
	}
}

// sawAtOnceLocked notes that atOnce requests were surely served at once.
func (sp *speed) sawAtOnceLocked(atOnce int) {
	if atOnce > sp.slotsLo {
		sp.slotsLo = atOnce
		if sp.slotsHi > 0 && sp.slotsHi < sp.slotsLo {
			sp.slotsHi = 0 // served more than thought possible: it changed
		}
	}
}

// sawWaitLocked notes that a request served beside atOnce others waited
// for a slot while at most hi others may have been at work: the server
// has no more than hi slots.
func (sp *speed) sawWaitLocked(hi, atOnce int, now time.Time) {
	if hi < 1 || hi < atOnce {
		return // a race: as many worked beside it
	}
	if sp.slotsHi == 0 || hi < sp.slotsHi || now.Sub(sp.hiAt) >= slotRetest {
		sp.slotsHi = hi
	}
	sp.hiAt = now
	if sp.slotsLo > sp.slotsHi {
		sp.slotsLo = sp.slotsHi
	}
}

// learnStreamSlotsLocked learns the server's parallel slots from an
// OpenAI stream, whose answer reports no durations. From its first byte to
// its last it surely generated in a slot: that stretch counts towards the
// requests served at once (slotsLo). It surely waited for a slot when its
// first byte came only after a request in flight when it was sent had
// ended, that request's end being later than twice its own prompt's
// expected time (plus waitSignalMin) after it was sent: with a slot of its
// own its first token would have come well before. Those in flight when it
// was sent are then the most the server has (slotsHi).
//
// Without this a server that only /v1 streams reach never learned its
// slots: a slow server of one slot kept its untried second slot, looked
// free at half the wait, and drew a second request to queue inside it
// again and again (openai-stream: the slow servers' answers took 1.0 s
// where one takes 0.5 s). The test is strict on purpose: a first byte
// merely later than expected (a prompt longer than estimated, a busy
// machine) is no wait, and neither is one after a request that was about
// to end anyway; a wait missed costs a slot not ruled out, a wait
// imagined takes a slot away from a server that has it.
func (sp *speed) learnStreamSlotsLocked(t *task, tm timings, now time.Time) {
	gen := tm.elapsed - tm.ttfb
	first := now.Add(-gen)
	sp.noteWorkLocked(t.id, gen, 0, true)
	atOnce := sp.servedAtOnceLocked(t, first, now)
	sp.sawAtOnceLocked(atOnce)
	prompt, _ := sp.serviceLocked(t.job)
	late := t.started.Add(time.Duration((2*prompt + waitSignalMin) * float64(time.Second)))
	waited := false
	for _, e := range sp.ended {
		if e.id != 0 && e.id != t.id && !e.began.After(t.started) && e.at.After(late) && !e.at.After(first) {
			waited = true
			break
		}
	}
	if waited {
		sp.sawWaitLocked(sp.heldAtLocked(t, t.started, t.started), atOnce, now)
	}
}

// noteWorkLocked records, for the ended request id, how long it worked in
// a slot (its prompt evaluation and generation, which end as its answer
// does) and its slack.
func (sp *speed) noteWorkLocked(id uint64, work, slack time.Duration, streamed bool) {
	for i := range endedRing {
		e := sp.endedAgoLocked(i)
		if e.id == id {
			e.work, e.slack, e.streamed = work, slack, streamed
			return
		}
	}
}

// sureWork is the stretch in which an ended request was surely at work
// in a slot, whichever part of its slack the network took: from its
// latest possible start to its earliest possible end. ok is false when
// the slack is longer than the work.
func (e *endedTask) sureWork() (from, to time.Time, ok bool) {
	from, to = e.at.Add(-e.work), e.at.Add(-e.slack)
	return from, to, e.work > 0 && to.After(from)
}

// servedAtOnceLocked is the most requests surely at work at one time
// while t surely was (from start to end), t included: the largest number
// of ended requests' sure stretches of work that share a moment with t's.
// Such a moment begins where the latest of them starts, so the count is
// taken at t's start and at each later start.
func (sp *speed) servedAtOnceLocked(t *task, start, end time.Time) int {
	if !end.After(start) {
		return 1
	}
	var buf [32]endedTask
	spans := buf[:0]
	for _, e := range sp.ended {
		if e.id == 0 || e.id == t.id || len(spans) == cap(spans) {
			continue
		}
		if from, to, ok := e.sureWork(); ok && to.After(start) && from.Before(end) {
			spans = append(spans, e)
		}
	}
	most := 0
	at := func(p time.Time) {
		n := 0
		for i := range spans {
			if from, to, _ := spans[i].sureWork(); !from.After(p) && to.After(p) {
				n++
			}
		}
		most = max(most, n)
	}
	at(start)
	for i := range spans {
		if p, _, _ := spans[i].sureWork(); p.After(start) && p.Before(end) {
			at(p)
		}
	}
	return 1 + most
}

// heldAtLocked is how many requests other than t may have been at work
// on the server when t came, some time between from and to: all but
// those sent after to, those that ended before from and those whose work
// surely started after to or ended before from (an OpenAI stream's work may
// have started as soon as it was sent). When t waited, every slot
// was at work then: the server has no more slots than that.
func (sp *speed) heldAtLocked(t *task, from, to time.Time) int {
	n := 0
	for _, o := range sp.tasks {
		if o != t && !o.started.After(to) {
			n++
		}
	}
	for _, e := range sp.ended {
		if e.id == 0 || e.id == t.id || e.began.After(to) || e.at.Before(from) {
			continue
		}
		if e.work <= 0 || e.streamed || !e.at.Add(-e.slack-e.work).After(to) {
			n++
		}
	}
	return n
}
