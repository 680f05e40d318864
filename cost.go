package ollamaflow

import (
	"cmp"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// The speed and cost model behind least_delay. Each pooled server learns,
// from the timings Ollama reports in a completion's final chunk (never from
// wall time, which includes how fast the client reads), how fast it
// evaluates a prompt and generates a token, how long a model load takes,
// how many requests it serves at once, and how many models it holds. A
// request's expected delay on a server is then the wait for one of its
// slots behind the work already sent there, a model load where the model
// is not resident, and the request's own work, sized from its body.

// delay is a request's expected time on a server, in seconds, by part.
type delay struct {
	wait   float64 // for a slot, behind the work already sent there
	load   float64 // loading the model, when it is not resident (or still loading)
	prompt float64 // evaluating the prompt; a prompt cache removes part of it
	output float64 // generating the answer
	// errors is the time expected to be lost to the server's errors: while
	// a share p of its recent answers were server errors, a request there
	// needs 1/(1-p) attempts on average to get an answer (see errorShare).
	errors float64
	// untried says it would take the slot planned for but never seen in
	// use; wait is then half the wait for a slot without it.
	untried bool
}

// slotFree reports whether the request would start at once, if the slot it
// would take is there.
func (d delay) slotFree() bool { return d.wait == 0 || d.untried }

func (d delay) total() float64 { return d.wait + d.load + d.prompt + d.output + d.errors }

// estimateDelay is the time job is expected to take on b if it were sent
// now: waiting for a slot, loading its model where it is not resident,
// evaluating its prompt and generating its answer. ok is false while
// nothing has been learned about b. A caller that knows part of the prompt
// is cached on b may subtract that share of d.prompt.
func estimateDelay(b *backend, j *job, now time.Time) (d delay, ok bool) {
	return b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), notResident(b, j.model), now)
}

// Tuning of the model. None of these is a threshold on what a server may
// be: they say how fast the model forgets and how sure it must be.
const (
	speedAlpha      = 0.25            // least EWMA weight of a new sample
	speedTau        = 3 * time.Second // a sample this long after the last weighs 1-1/e at least
	coldLoadPrior   = 2.0             // seconds assumed for a model load before one is seen
	charsPerToken   = 4.0             // prompt characters per token before one is seen
	slotRetest      = 30 * time.Second
	remainingFloor  = 0.1   // a request past its expected end still has this share left
	waitSignalMin   = 0.015 // seconds of unexplained time that count as a wait, above the baseline
	maxTrackedModel = 64    // per-model rates kept per server (least recently used dropped)
)

// speed is what a server has been observed to deliver. It lives on the
// pooled server, so it survives reloads.
type speed struct {
	mu     sync.Mutex
	all    rates             // every model together: the fallback
	models map[string]*rates // per model

	// Slots: slotsLo requests were served at once without one waiting;
	// slotsHi is the most that can be (one more waited), known since
	// hiAt, 0 when unknown. Estimates use slotsLo+1 while that is not ruled
	// out, so a history at concurrency 1 never locks the count at 1: the
	// first time more requests are there, the extra slot is tried.
	slotsLo, slotsHi int
	hiAt             time.Time
	// warmIdle is the baseline of time a warm request with a free slot
	// spends neither evaluating nor generating (HTTP, scheduling).
	warmIdle float64
	// room is how many models the server has been seen to hold at once
	// (0: unknown); a load beyond it evicts one. /api/ps lists read before
	// roomAt (an eviction noticed since) do not raise it.
	room   int
	roomAt time.Time
	// roomTested is when placement last loaded a model here beyond the
	// room its lists showed, to learn whether it has more (room.go), and
	// roomTestedAt the room then known: a larger room seen since means
	// the test passed.
	roomTested   time.Time
	roomTestedAt int
	// swap is the latest load sent here that the lists said would evict
	// a model they showed (placement.go, noticeSwap).
	swap swapSent
	// files are the files Ollama keeps the models listed as loaded here
	// in (/api/show's FROM), by name: Ollama evicts the idle model whose
	// file sorts first (placement.go, ollamaVictimLocked).
	files map[string]modelFile

	tasks  map[uint64]*task // requests in flight, with their expected end
	nextID uint64
	// sentWork is the expected service (prompt and output) of the
	// requests sent here lately, averaged: what one counted in flight but
	// not begun yet is taken to need (replayLocked).
	sentWork float64
	// ended remembers recent requests that ended: when they were sent,
	// when they ended and, for a complete answer, how long they worked in
	// a slot, so that an answer can tell how many requests the server
	// served at once while it worked (see servedAtOnceLocked) and, when
	// it waited, how many may have been at work when it came
	// (heldAtLocked).
	ended    [endedRing]endedTask
	endedPos int
	probing  time.Time // when least_delay first sent it a request, before any sample
	// probeBegan is when an answer first began (its headers came) while
	// the server was being measured: a measuring request still without
	// an answer long after it waits behind that one (spare.go). measured
	// is set with the first sample, so that answers on a server measured
	// note nothing without the lock.
	probeBegan time.Time
	measured   atomic.Bool
	// probeClaims are when measuring requests were claimed that have not
	// begun yet (claimProbe), at most the server's measuring limit.
	probeClaims []time.Time
	// loadPrior, when set, is the load time last learned on any server,
	// used where this one has learned none (poolLoadPrior).
	loadPrior *atomic.Uint64
	// planned are loads least_delay chose the server for whose requests
	// have not begun yet (planLoad).
	planned []plannedLoad
	// remeasuring is when least_delay last sent the server a request to
	// re-measure it (see claimRemeasure); remeasureNow asks for the next
	// one at once: the last answered much faster than believed.
	remeasuring  time.Time
	remeasureNow bool
	// remeasureSent says the next request to begin is the re-measurement
	// claimed.
	remeasureSent bool
	// copying: a measuring copy of a request is in flight there, sent at
	// copied (measurecopy.go); copyStart is when, on the process's clock,
	// and copyTook how long the last one held its slot.
	copying   bool
	copied    time.Time
	copyStart time.Time
	copyTook  time.Duration
	// errShare is the share of server errors among its recent answers,
	// as of errAt (see noteAnswer).
	errShare float64
	errAt    time.Time
	// errProbed is when a server not observed yet that answers mostly
	// errors was last sent a request to measure it anyway (claimErrorProbe).
	errProbed time.Time
	// cache is how often follow-ups sent to their prompt cache here
	// found it (cacheodds.go).
	cache cacheOdds
}

// rates are learned speeds, for one model or for all.
type rates struct {
	at        time.Time // last sample
	promptN   int
	promptTok float64 // seconds per prompt token beyond the fixed part: what a cached one saves
	// The prompt's time is fitted as fixed + per-token (a GPU evaluates a
	// short prompt in one batch whose time barely depends on its length,
	// a long one in proportion to it): EWMA moments of the prompt's
	// tokens (x) and its evaluation seconds (y), with promptN samples.
	px, py, pxx, pxy float64
	// cacheSuspects counts prompts in a row that were much faster than
	// the fit and than the generation rate explains (served in part from
	// a prompt cache); they are not folded in, unless so many come in a
	// row that the server must have changed.
	cacheSuspects int
	// shift is the way the last answer surprised (shiftedLocked: +1
	// slower, -1 faster, 0 not), as of shiftAt.
	shift       int
	shiftAt     time.Time
	genN        int
	genTok      float64 // seconds per generated token
	outN        int
	outTokens   float64 // answer length when the request set no cap
	inN         int
	inTokens    float64 // prompt length, for requests whose body gave none
	charsN      int
	charsPerTok float64
	loads       int
	load        float64 // seconds per model load
	lastUsed    time.Time
	// loadSeen is when an answer last showed a load of the model that
	// was not expected (it was believed resident), or when a request was
	// sent to load it: requests sent before then that show a load too
	// waited for that same one (Ollama's scheduler loads a model once for
	// all the requests that want it), and its eviction was counted then.
	// Taken as another, a request sent just before the load, when the
	// model was still believed there, read as an eviction of a model that
	// was not resident, and a server of room two was learned as one
	// (models-87).
	loadSeen time.Time
	// evictedAt is when a load of another model was sent that was taken
	// to evict this one (begin): an answer of a request sent before then
	// shows it resident as it was, not as it is.
	evictedAt time.Time
	// loadDone is when the server's latest load of the model, as its
	// loading request's answer showed it (started + load_duration),
	// ended: the requests that waited for that load began then.
	loadDone time.Time
}

// endedRing bounds the ended requests remembered per server.
const endedRing = 256

type endedTask struct {
	id        uint64
	began, at time.Time // sent, ended (as the proxy saw it)
	// work is its prompt evaluation and generation, in a slot (0 when
	// not known); slack the time the proxy saw beyond the server's
	// total_duration, which places that work within as much.
	work, slack time.Duration
	// streamed: an OpenAI stream's entry, whose work is only its
	// generation (first byte to last; its slot may have been taken any
	// time after it was sent) and whose slack is not measured.
	streamed bool
}

// task is one request in flight on the server.
type task struct {
	id       uint64
	sp       *speed
	job      *job
	started  time.Time
	finish   time.Time // end planned when it was sent, its wait there counted (replayLocked)
	service  float64   // expected prompt + output seconds
	work     float64   // expected load + prompt + output seconds
	cold     bool      // the model was not resident (or was loading) when it was sent
	loader   bool      // it is the request that loads the model
	blind    bool      // sent before the server's lists were read: whether it loads is not known
	inFlight int       // requests in flight on the server when it was sent (sent before it, itself included)
	measures bool      // sent to measure or re-measure the server (see longestDelay)
	done     atomic.Bool
}

// ewma folds x into old with a weight that grows with the time since the
// last sample, so a server that changed speed is re-learned within a few
// requests, and at once after a pause.
func ewma(old float64, n int, x float64, since time.Duration) float64 {
	if n == 0 {
		return x
	}
	a := sampleWeight(since)
	return old + a*(x-old)
}

// sampleWeight is the weight of a sample that comes since after the one
// before: at least speedAlpha, more the longer the silence, and all of it
// after remeasureAfter. A sample after that long is a re-measurement (or
// the first request after a pause): the only evidence of what the server
// is now, so a server that recovered while it was not used is re-learned
// by its first answer instead of by a few more spread seconds apart.
func sampleWeight(since time.Duration) float64 {
	if since >= remeasureAfter {
		return 1
	}
	return max(speedAlpha, 1-math.Exp(-since.Seconds()/speedTau.Seconds()))
}

// ratesLocked returns model's rates, created if need be ("" is all).
func (sp *speed) ratesLocked(model string) *rates {
	if model == "" {
		return &sp.all
	}
	if sp.models == nil {
		sp.models = make(map[string]*rates)
	}
	r := sp.models[model]
	if r == nil {
		if len(sp.models) >= maxTrackedModel {
			var oldest string
			for m, mr := range sp.models {
				if oldest == "" || mr.lastUsed.Before(sp.models[oldest].lastUsed) {
					oldest = m
				}
			}
			delete(sp.models, oldest)
		}
		r = &rates{}
		sp.models[model] = r
	}
	return r
}

// serviceLocked is job's expected prompt and output time, from the model's
// rates where learned, else the server's.
func (sp *speed) serviceLocked(j *job) (prompt, output float64) {
	r := &sp.all
	if mr := sp.models[j.model]; mr != nil {
		r = mr
	}
	pick := func(n int, own, all float64) float64 {
		if n > 0 {
			return own
		}
		return all
	}
	genTok := pick(r.genN, r.genTok, sp.all.genTok)
	cpt := charsPerToken
	if r.charsN > 0 {
		cpt = r.charsPerTok
	} else if sp.all.charsN > 0 {
		cpt = sp.all.charsPerTok
	}
	in := pick(r.inN, r.inTokens, sp.all.inTokens)
	if j.promptChars > 0 {
		in = float64(j.promptChars) / max(cpt, 0.5)
	}
	// The answer's length: the model's typical uncapped answer over the
	// pool, else what this server saw, at most the request's cap (all of
	// it when nothing is known).
	out, known := j.answers.typical(j.model), true
	switch {
	case out > 0:
	case r.outN > 0:
		out = r.outTokens
	case sp.all.outN > 0:
		out = sp.all.outTokens
	default:
		known = false
	}
	if j.maxOutput > 0 && (!known || float64(j.maxOutput) < out) {
		out = float64(j.maxOutput)
	}
	pr := r
	if r.promptN == 0 {
		pr = &sp.all
	}
	prompt, determined := pr.promptSecs(in)
	if !determined && j.refs.n > 0 {
		if scaled, ok := pr.promptScaled(j.refs.list(), in); ok {
			prompt = min(prompt, scaled)
		}
	}
	return prompt, out * genTok
}

// slotsLocked is the parallel slots to plan with: max_parallel when set
// (the operator knows), else what was seen, plus one while more is not
// ruled out (recently).
func (sp *speed) slotsLocked(maxParallel int, now time.Time) int {
	if maxParallel > 0 {
		return maxParallel
	}
	lo := max(sp.slotsLo, 1)
	if sp.slotsHi > 0 && sp.slotsHi <= lo && now.Sub(sp.hiAt) < slotRetest {
		return lo
	}
	return lo + 1
}

// waitLocked is how long a new request waits for a slot with inFlight
// requests on the server: none while a slot is free, else until a slot
// frees up once the work sent before it is done. The server is taken as
// Ollama's scheduler is: first come, first served over its slots. The
// requests in flight are replayed in the order they were sent, each
// taking the first free slot for its expected work; one past its
// expected end (and past the end planned for it when it was sent, its
// wait at the server counted) still has a share of its work left, and those queued
// behind it start no earlier than now, so a server whose queue runs late
// (slower than expected, or fewer slots than planned for) shows a longer
// wait instead of looking idle.
func (sp *speed) waitLocked(inFlight, slots int, typical float64, now time.Time) float64 {
	if inFlight < slots {
		return 0
	}
	return sp.replayLocked(inFlight, slots, typical, now, nil)
}

// replayLocked replays the requests in flight over slots as waitLocked
// describes, telling each (when each is not nil) when it is expected to
// end, in seconds from now, and returns when the first slot frees up.
func (sp *speed) replayLocked(inFlight, slots int, typical float64, now time.Time, each func(t *task, end float64)) float64 {
	var tbuf [32]*task
	order := tbuf[:0]
	for _, t := range sp.tasks {
		order = append(order, t)
	}
	slices.SortFunc(order, func(a, b *task) int { return cmp.Compare(a.id, b.id) })
	var fbuf [16]float64
	free := fbuf[:0] // a min-heap of the slots' free times, seconds from now
	for range slots {
		free = append(free, math.Inf(-1))
	}
	take := func(arrived, work, due float64) float64 {
		start := max(arrived, free[0])
		end := start + work
		if end < 0 && due > end {
			// Done as replayed, but expected later when it was sent (due,
			// its wait there counted): it queued at the server behind
			// requests done since, which the replay no longer holds. It
			// is late only once past due (three-speeds: the middle
			// server's requests, each sent behind two others, looked to
			// run 0.2 s late and 0.7 s long, where they took 0.5, and
			// the slowest server's 0.7 s looked no worse than the
			// queue's).
			end = min(due, work)
		}
		if late := -end; late > 0 {
			// Past its expected end, it is still there: it is taken to
			// run about as far past it again as it already has (a
			// server that turned slower, an answer longer than its
			// kind), at least remainingFloor of its work and at most
			// all of it.
			end = min(max(late, remainingFloor*work), work)
		}
		free[0] = max(end, remainingFloor*work)
		siftDown(free)
		return end
	}
	// A request sent before the server was measured was priced at
	// nothing and planned no end (a fresh pool's first requests, a
	// measuring one and its spare, sent together): it is priced now at what
	// the server is known to take, and due as the requests that ended
	// since it was sent, sent before it, ended (shifted by when it was
	// sent), a tenth of its work later: beside them in a slot of its own,
	// it answers by then. Not answered by then, it waited behind them and
	// began when they ended. Taken as done at once, the spare left waiting
	// behind the first answer on a server of one slot made it look free,
	// and the requests held for that answer, with a spare moved from a
	// slower server of three slots, were sent into its queue (random-260:
	// four conversations on that one slot for seconds, 8.1 req/s against
	// least_conn's 8.5). Taken as queued from the first answer on, the
	// spare beside it on a server of two slots, a few milliseconds from
	// its own answer, sent the requests held for the first answer to the
	// slow servers (speed-classes: p99 0.44-0.47 s against 0.33-0.34).
	var ebuf [endedReplay]endedTask
	ended := ebuf[:0]
	if slices.ContainsFunc(order, (*task).unpriced) {
		ended = sp.endedSinceLocked(order, ended)
	}
	for _, t := range order {
		arrived, work, due := t.started.Sub(now).Seconds(), t.work, t.finish.Sub(now).Seconds()
		k := 0
		for k < len(ended) && ended[k].id < t.id {
			k++
		}
		before := ended[:k]
		ended = ended[k:]
		if t.unpriced() {
			// Its work is what the server is known to take now.
			p, o := sp.serviceLocked(t.job)
			work = p + o
			if len(before) > 0 {
				beside := math.Inf(-1)
				for _, e := range before {
					beside = max(beside, e.at.Sub(now).Seconds()+t.started.Sub(e.began).Seconds())
				}
				if due = beside + probeSlack*work; due <= 0 {
					for _, e := range before {
						if at := e.at.Sub(now).Seconds(); at > free[0] {
							free[0] = at
							siftDown(free)
						}
					}
				}
			}
		}
		if at, ok := sp.joinedLoadEndLocked(t); ok {
			// It waited for another request's load of its model: its
			// work begins when that load ends, as learned once the
			// loading request answered, not as priced when it was sent
			// (with the 2 s prior before any load was seen, where the
			// load took 1 s: on two-models a server right after its
			// first load looked 1.5 s away, and a second copy of the
			// model was loaded elsewhere, evicting a model in use).
			arrived, work = max(arrived, at.Sub(now).Seconds()), t.service
		}
		end := take(arrived, work, due)
		if each != nil {
			each(t, end)
		}
	}
	// Requests the model does not track take a typical time each, after
	// those it knows: model reads, requests sent before a reload, and
	// those a queue released at this instant, whose requests have not
	// begun; those are like the requests sent here lately (sentWork), not
	// like a typical uncapped answer (capped answers teach no typical
	// length, and a typical of prompt evaluation alone took a burst of
	// eight on two slots for a wait of one).
	typical = max(typical, sp.sentWork)
	for i := len(order); i < inFlight; i++ {
		take(0, typical, math.Inf(-1))
	}
	return max(free[0], 0)
}

// unpriced reports whether t was sent before the server was measured: it
// was priced at nothing (a cold one, at its load).
func (t *task) unpriced() bool { return t.work == 0 && !t.cold }

// endedAgoLocked is the request that ended i requests before the latest
// to end (0: the latest), as the ring holds it (a zero id: none yet).
func (sp *speed) endedAgoLocked(i int) *endedTask {
	return &sp.ended[(sp.endedPos-1-i+endedRing)%endedRing]
}

// endedReplay bounds the ended requests a replay reads.
const endedReplay = 32

// endedSinceLocked appends to buf, in the order they were sent, the
// latest requests (at most endedReplay) that ended after the first of
// order (the requests in flight, in the order sent) was sent, and were
// sent before the last of them.
func (sp *speed) endedSinceLocked(order []*task, buf []endedTask) []endedTask {
	if len(order) == 0 {
		return buf
	}
	first, last := order[0].started, order[len(order)-1].id
	for i := range endedRing {
		e := *sp.endedAgoLocked(i)
		if e.id == 0 || !e.at.After(first) || len(buf) == cap(buf) {
			break // the ring holds them in the order they ended
		}
		if e.id < last {
			buf = append(buf, e)
		}
	}
	slices.SortFunc(buf, func(a, b endedTask) int { return cmp.Compare(a.id, b.id) })
	return buf
}

// joinedLoadEndLocked is when the load t waited for ends (or ended): t was
// sent while another request was loading its model there. That request's
// answer tells when the load ended (rates.loadDone, after t was sent);
// until it answers, the load is taken to last the learned load time from
// when it was sent. false: t joined no load, or nothing tells when it ended.
func (sp *speed) joinedLoadEndLocked(t *task) (time.Time, bool) {
	if !t.cold || t.loader || t.job.model == "" {
		return time.Time{}, false
	}
	if r := sp.models[t.job.model]; r != nil && r.loadDone.After(t.started) {
		return r.loadDone, true
	}
	var end time.Time
	load := time.Duration(sp.loadCostLocked(t.job.model) * float64(time.Second))
	for _, o := range sp.tasks {
		if o.loader && o.job.model == t.job.model && !o.started.After(t.started) {
			if e := o.started.Add(load); e.After(end) {
				end = e
			}
		}
	}
	return end, !end.IsZero()
}

// siftDown restores the min-heap h after h[0] grew.
func siftDown(h []float64) {
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(h) && h[l] < h[m] {
			m = l
		}
		if r < len(h) && h[r] < h[m] {
			m = r
		}
		if m == i {
			return
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}

// loadCostLocked is what loading model is expected to take.
func (sp *speed) loadCostLocked(model string) float64 {
	if r := sp.models[model]; r != nil && r.loads > 0 {
		return r.load
	}
	if sp.all.loads > 0 {
		return sp.all.load
	}
	if sp.loadPrior != nil {
		if v := math.Float64frombits(sp.loadPrior.Load()); v > 0 {
			return v
		}
	}
	return coldLoadPrior
}

// poolLoadPrior is the load time (float64 bits, seconds) a server last
// learned, for the servers that have seen no load yet: a fresh pool's
// loads take about as long on each server, and a server being measured
// with a load under way was priced at coldLoadPrior (2 s) against a load
// of a second learned on another, so a request for the model loaded it
// again there instead of joining (two-models-empty).
var poolLoadPrior atomic.Uint64

// pendingLoadLocked is the time left of a load of model already under way,
// or chosen and about to be (planLoad).
func (sp *speed) pendingLoadLocked(model string, now time.Time) (float64, bool) {
	left, found := 0.0, false
	cost := time.Duration(sp.loadCostLocked(model) * float64(time.Second))
	for _, t := range sp.tasks {
		if t.loader && t.job.model == model {
			found = true
			left = max(left, t.started.Add(cost).Sub(now).Seconds())
		}
	}
	for _, p := range sp.planned {
		if p.model == model && now.Sub(p.at) < probeClaimTTL {
			found = true
			left = max(left, p.at.Add(cost).Sub(now).Seconds())
		}
	}
	return left, found
}

// estimate is estimateDelay for a server with inFlight requests in flight
// and maxParallel configured (0: learned); cold says the model is not
// resident.
func (sp *speed) estimate(j *job, maxParallel, inFlight int, cold bool, now time.Time) (delay, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.estimateLocked(j, maxParallel, inFlight, cold, now)
}

func (sp *speed) estimateLocked(j *job, maxParallel, inFlight int, cold bool, now time.Time) (delay, bool) {
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return delay{}, false
	}
	var d delay
	d.prompt, d.output = sp.serviceLocked(j)
	tp, to := sp.serviceLocked(&job{model: j.model})
	slots := sp.slotsLocked(maxParallel, now)
	d.wait = sp.waitLocked(inFlight, slots, tp+to, now)
	untried := maxParallel == 0 && slots > max(sp.slotsLo, 1)
	if untried && inFlight+1 >= slots {
		// The slot planned for but never seen in use, only not ruled
		// out, is as likely missing as there: the request expects the
		// mean of its waits with and without it. One that would take it
		// expects half the wait it would have without it, so the untried
		// slot of a slow server with a long answer in its one real slot
		// does not look free, while a fast server's is still tried when
		// the alternative costs more; one queued either way is not
		// replayed over it as if sure (a server of two slots seen with
		// two at once had nine queued by requests that each expected a
		// third of an answer's wait less per answer ahead than they got).
		d.wait = (d.wait + sp.waitLocked(inFlight, slots-1, tp+to, now)) / 2
		d.untried = inFlight+1 == slots
	}
	if j.model != "" {
		if left, loading := sp.pendingLoadLocked(j.model, now); loading {
			// It starts once the load is done and a slot is free: a
			// wait for a slot taken by requests that wait for the load
			// themselves already holds the load.
			d.load = max(left-d.wait, 0)
		} else if cold {
			d.load = sp.loadCostLocked(j.model)
		} else {
			// Another model's load, where the room is not known, may
			// evict this one: the request waits for it.
			d.wait = max(d.wait, sp.otherLoadLocked(j.model, now))
		}
	}
	if p := sp.errorShareLocked(now); p > 0 {
		d.errors = (d.wait + d.load + d.prompt + d.output) * p / (1 - p)
	}
	return d, true
}
