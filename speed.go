package ollamaflow

import (
	"math"
	"sync/atomic"
	"time"
)

// How each pooled server learns its speed: the requests in flight (task:
// begin, end), the timings Ollama reports in a completion's final chunk
// (timingsFrom, learn) and the recent share of server errors; slots.go
// learns its parallel slots, shift.go notices a server that changed speed.
// cost.go turns what is learned here into a request's expected delay.

// Server errors. A server that answers 500 at once (a broken GPU, a
// runner that crashes on load) looks idle and fast: nothing of its speed
// is learned from an error, but its free slots would draw every request.
// Its recent share of server errors makes its expected time longer
// instead, by the attempts a request needs there to get an answer
// (1/(1-p)), bounded (errorShareMax) and forgotten within seconds
// (errorForget): a client can provoke a 500 (a num_ctx the server has no
// memory for), so errors never take a server out of rotation; they only
// make it the last choice for a few seconds, and honest traffic still
// reaches it while the others queue. 500 stays out of fail_status and is
// not retried (SPEC: retries on connection errors, 502, 503 and 504), so
// a crafted request costs the pool one attempt.
const (
	errorAlpha    = 0.25            // weight of each answer in the share
	errorForget   = 2 * time.Second // the share falls by 1/e in this time without answers
	errorShareMax = 0.75            // at most 4 attempts expected: a bounded penalty
)

// noteAnswer folds an answer's status into the server's error share: a
// 5xx is a server error, except Ollama's 503 "server busy" (back-pressure,
// handled by backing off); anything else is an answer.
func (sp *speed) noteAnswer(status int, now time.Time) {
	if status == 503 {
		return
	}
	x := 0.0
	if status >= 500 {
		x = 1
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if x == 0 && sp.errShare == 0 {
		return
	}
	p := sp.errorShareLocked(now)
	sp.errShare, sp.errAt = p+errorAlpha*(x-p), now
	if sp.errShare < 1e-3 {
		sp.errShare = 0
	}
}

// errorShareLocked is the server's recent share of server errors, decayed
// to now, at most errorShareMax.
func (sp *speed) errorShareLocked(now time.Time) float64 {
	if sp.errShare == 0 {
		return 0
	}
	p := sp.errShare * math.Exp(-max(now.Sub(sp.errAt).Seconds(), 0)/errorForget.Seconds())
	return min(p, errorShareMax)
}

// errorShare is errorShareLocked for a caller not holding the lock.
func (sp *speed) errorShare(now time.Time) float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.errorShareLocked(now)
}

// mostlyErrors reports whether most of the server's recent answers were
// server errors. One not observed yet is then not measured with a request
// (nothing is learned from an error, and a server that fails at once is
// always free), nor offered to a new conversation: the policy would have
// to take it if it were the only one offered.
func (sp *speed) mostlyErrors(now time.Time) bool {
	return sp.errorShare(now) >= 0.5
}

// errorProbeEvery is how often a server not observed yet whose recent
// answers are mostly errors is measured anyway while the others queue.
const errorProbeEvery = time.Second

// claimErrorProbe reports whether a server not observed yet that answers
// mostly errors may be sent one request to measure it, and notes that one
// is. A client can make a server answer 500 (a num_ctx it has no memory
// for): were it never measured while its share lasts, a steady run of such
// requests would keep honest traffic off it for good, the others queueing
// beside its free slots. One request per errorProbeEvery, and only while
// the others queue, is what a server that is really broken costs.
func (sp *speed) claimErrorProbe(now time.Time) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if !sp.errProbed.IsZero() && now.Sub(sp.errProbed) < errorProbeEvery {
		return false
	}
	sp.errProbed = now
	return true
}

// begin records that a request for j was sent to b, with the delay it is
// expected to take; end (or learn) removes it. A request for a model that
// is not resident makes it resident in the model's belief at once, so the
// requests that follow queue behind one load instead of each planning
// their own, and, where the server is full, the model Ollama evicts there
// (placement.go, victimLocked) is taken to be evicted.
func (b *backend) begin(j *job, now time.Time) *task {
	s := b.srv
	// Before the server's lists are read, a request is not taken to load
	// its model: not knowing is no load, and the belief would draw the
	// requests after it to join a load that is not there (a fresh pool's
	// first burst stacked three requests on each slow server of
	// fresh-burst), and its answer would reset what room was learned.
	known := s.models.Load().known
	cold := known && notResident(b, j.model)
	sp := &s.speed
	sp.mu.Lock()
	if !j.claimHeld {
		// It holds its slot now: its claim, or another's, is counted in
		// the slot counter instead (claimProbe). One claimed by the pick
		// that took the slot was given up then (dropClaim).
		sp.dropClaimLocked()
	}
	j.claimHeld = false
	sp.takePlannedLocked(j.model)
	d, _ := sp.estimateLocked(j, b.cfg.MaxParallel, int(s.inFlight.Load())-1, cold, now)
	_, loading := sp.pendingLoadLocked(j.model, now)
	// Requests in flight are counted from the model's own tasks, those
	// sent before this one: the server's slot counter also holds
	// requests dispatched at the same instant (a queue released at
	// once), which reach the server after this one.
	t := &task{sp: sp, job: j, started: now, service: d.prompt + d.output, work: d.load + d.prompt + d.output,
		cold: cold || loading, loader: cold && !loading, blind: !known && j.model != "", inFlight: len(sp.tasks) + 1,
		measures: j.copy || sp.remeasureSent || sp.all.promptN == 0 && sp.all.genN == 0}
	switch {
	case j.copy: // a measuring copy is neither the re-measurement claimed nor the work clients send
	case sp.sentWork == 0:
		sp.remeasureSent, sp.sentWork = false, t.service
	default:
		sp.remeasureSent = false
		sp.sentWork += sentWorkWeight * (t.service - sp.sentWork)
	}
	t.finish = now.Add(time.Duration((d.wait + d.load + d.prompt + d.output) * float64(time.Second)))
	sp.nextID++
	t.id = sp.nextID
	if sp.tasks == nil {
		sp.tasks = make(map[uint64]*task)
	}
	sp.tasks[t.id] = t
	var evict string
	if j.model != "" {
		r := sp.ratesLocked(j.model)
		r.lastUsed = now
		if t.loader {
			r.loadSeen = now
			snap := s.models.Load()
			evict = sp.victimLocked(snap, j.model)
			if evict != "" {
				sp.ratesLocked(evict).evictedAt = now
				if snap.loaded[evict] != nil { // listed, not merely believed
					sp.swap = swapSent{model: j.model, victim: evict, at: now, listed: psCount(snap)}
				}
			}
		}
	}
	sp.mu.Unlock()
	if t.loader {
		if evict != "" {
			s.markUnloaded(evict)
		}
		s.markLoaded(j.model)
	}
	return t
}

// sentSinceEviction reports whether the request t was sent after the
// latest load that was taken to evict its model from the server: only then
// does its answer show the model resident (nil: not known, taken as so).
func (t *task) sentSinceEviction() bool {
	if t == nil || t.job.model == "" {
		return true
	}
	t.sp.mu.Lock()
	defer t.sp.mu.Unlock()
	r := t.sp.models[t.job.model]
	return r == nil || !t.started.Before(r.evictedAt)
}

// end removes the request from the work in flight; safe to call twice.
func (t *task) end() { t.endAt(time.Now()) }

func (t *task) endAt(now time.Time) {
	if t == nil || !t.done.CompareAndSwap(false, true) {
		return
	}
	sp := t.sp
	sp.mu.Lock()
	delete(sp.tasks, t.id)
	sp.ended[sp.endedPos] = endedTask{id: t.id, began: t.started, at: now}
	sp.endedPos = (sp.endedPos + 1) % endedRing
	sp.mu.Unlock()
}

// servingOthersLocked counts the requests in flight on the server for
// models other than model.
func (sp *speed) servingOthersLocked(model string) int {
	n := 0
	for _, t := range sp.tasks {
		if t.job.model != model && !t.done.Load() {
			n++
		}
	}
	return n
}

// timings are the counts and durations a completion's final chunk gave
// (-1: absent), and what the proxy measured.
type timings struct {
	native                  bool // Ollama's own API: durations reported; else OpenAI usage
	promptCount, evalCount  int64
	total, load, prompt, ev time.Duration
	ttfb, elapsed           time.Duration
	streamed                bool
	// clientWait is how long writes to the client blocked: a client that
	// reads slowly holds the stream back, and with it the timings the
	// proxy measures (and, once buffers fill, the server's own).
	clientWait time.Duration
}

// timingsFrom reads the final counts a response ended with.
func timingsFrom(tail *tailKeeper, api apiFormat, streamed bool, ttfb, elapsed time.Duration) timings {
	if api == apiOllama {
		return timings{native: true,
			promptCount: tail.number("prompt_eval_count"), evalCount: tail.number("eval_count"),
			total: time.Duration(tail.number("total_duration")), load: time.Duration(tail.number("load_duration")),
			prompt: time.Duration(tail.number("prompt_eval_duration")), ev: time.Duration(tail.number("eval_duration")),
			ttfb: ttfb, elapsed: elapsed, streamed: streamed, clientWait: tail.clientWait}
	}
	eval := tail.number("completion_tokens")
	if eval < 0 {
		// A stream without stream_options.include_usage (the SDKs'
		// default): its events are its tokens. Without them nothing was
		// learned from it, and a pool serving only such streams stayed
		// unmeasured, least_delay falling back to least_conn.
		eval = tail.sseTokens()
	}
	return timings{promptCount: tail.number("prompt_tokens"), evalCount: eval,
		total: -1, load: -1, prompt: -1, ev: -1, ttfb: ttfb, elapsed: elapsed, streamed: streamed, clientWait: tail.clientWait}
}

// clientHeldBack reports whether the client's reading slowed the answer
// enough to distort its timings: writes to it blocked for more than a
// tenth of the generation (and more than a few scheduler ticks).
func (tm timings) clientHeldBack() bool {
	span := tm.elapsed - tm.ttfb
	if tm.native && tm.ev > 0 {
		span = tm.ev
	}
	return tm.clientWait > max(10*time.Millisecond, span/10)
}

// Prompt samples faster than the fit by more than this factor (beyond
// what the generation rate says of the server's speed now) are taken to
// have been served in part from the prompt cache; cacheSuspectLimit in a
// row mean the server did get faster.
const (
	cacheSuspectFactor = 2.0
	cacheSuspectLimit  = 6
)

// learn folds a completed request's timings into the model and ends the
// task. loaded reports that the request loaded its model (a cold load,
// whatever it took); evicted that it found a model gone that was believed
// resident.
func (t *task) learn(tm timings, now time.Time) (loaded, evicted bool) {
	if t == nil {
		return false, false
	}
	t.endAt(now)
	if t.job.turn != nil {
		t.job.turn.answered.Store(now.UnixNano()) // its client's pause starts (abandoned)
	}
	sp := t.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		defer sp.signalFirstLocked()
	}
	sp.remeasuredFasterLocked(t, tm)
	r := sp.ratesLocked(t.job.model)
	targets := []*rates{&sp.all}
	if r != &sp.all {
		targets = append(targets, r)
	}
	fold := func(x float64, field func(*rates) (*float64, *int)) {
		for _, rr := range targets {
			v, n := field(rr)
			*v = ewma(*v, *n, x, now.Sub(rr.at))
			*n++
		}
	}
	promptLen := func(rr *rates) (*float64, *int) { return &rr.inTokens, &rr.inN }
	charRatio := func(rr *rates) (*float64, *int) { return &rr.charsPerTok, &rr.charsN }
	outLen := func(rr *rates) (*float64, *int) { return &rr.outTokens, &rr.outN }

	promptSec, genSec := -1.0, -1.0
	switch {
	case tm.native:
		if tm.prompt > 0 {
			promptSec = tm.prompt.Seconds()
		}
		if tm.ev > 0 {
			genSec = tm.ev.Seconds()
		}
	case tm.streamed && tm.elapsed > tm.ttfb:
		// OpenAI reports no durations: the first byte comes after the
		// prompt, the rest is generation. Only a request that had a slot
		// and a warm model measures the prompt this way.
		genSec = (tm.elapsed - tm.ttfb).Seconds()
		if !t.cold && t.inFlight <= max(sp.slotsLo, 1) {
			promptSec = tm.ttfb.Seconds()
		}
	case tm.elapsed > 0 && tm.evalCount > 0 && !t.cold && t.inFlight <= max(sp.slotsLo, 1):
		// A non-streamed OpenAI answer (the SDKs' default) gives one
		// time for the prompt and the answer together. Learning
		// nothing from it would leave a server that only gets those
		// unmeasured, at one request at a time, while a slower one
		// that answered on /api draws the queue. Taken only from a
		// request that had a slot and a warm model.
		promptSec, genSec = sp.splitLocked(r, float64(max(tm.promptCount, 0)), float64(tm.evalCount), tm.elapsed.Seconds())
	}
	if t.job.cachedOn == sp {
		// Conversation affinity sent it to its prompt cache here: its
		// prompt time says nothing of the server's prompt rate, but
		// whether the cache was there (cacheodds.go), unless it took
		// clearly longer than the whole prompt would: no cache explains
		// that, the server is slower (slowdown: identical prompts, each
		// sent to its cache, and the server that turned four times
		// slower was learned from one answer in two). A split of one
		// time by the fit would only echo the fit.
		if tm.native || tm.streamed {
			sp.noteCacheOutcomeLocked(r, t.job, float64(tm.promptCount), promptSec)
		}
		if !(tm.native || tm.streamed) || !r.slowerThanAnyCache(float64(tm.promptCount), promptSec) {
			promptSec = -1
		}
	}
	heldBack := tm.clientHeldBack()
	if heldBack {
		// The answer went at the client's pace: its duration says
		// nothing of the server's. The prompt was over before the first
		// byte, so its time stands.
		genSec = -1
	}
	// Two answers in a row that disagree with what was learned the same
	// way: the server changed speed, and the latest answer is what it is
	// now (shift.go).
	shifted := r.shiftedLocked(float64(max(tm.promptCount, 0)), float64(max(tm.evalCount, 0)), promptSec, genSec, now)
	// A generation rate of one token says little: its time is mostly the
	// fixed cost of a step.
	if tm.evalCount > 0 && genSec >= 0 {
		sample := genSec / float64(tm.evalCount)
		// How much faster the server generates now than learned: a
		// server that got faster evaluates prompts faster too.
		speedup := 1.0
		if r.genN > 0 && sample > 0 && tm.evalCount >= 2 {
			speedup = max(r.genTok/sample, 1)
		}
		if tm.promptCount > 0 && promptSec >= 0 {
			sp.foldPromptLocked(targets, r, float64(tm.promptCount), promptSec, speedup, shifted, t.job.uncached, now)
		}
		for _, rr := range targets {
			rr.genTok = ewma(rr.genTok, rr.genN, sample, sampleGap(rr, r, shifted, now))
			rr.genN++
		}
	} else if tm.promptCount > 0 && promptSec >= 0 {
		sp.foldPromptLocked(targets, r, float64(tm.promptCount), promptSec, 1, shifted, t.job.uncached, now)
	}
	if tm.promptCount > 0 {
		fold(float64(tm.promptCount), promptLen)
		if t.job.promptChars > 0 {
			fold(float64(t.job.promptChars)/float64(tm.promptCount), charRatio)
		}
	}
	if n := float64(tm.evalCount); tm.evalCount > 0 && (t.job.maxOutput == 0 || tm.evalCount < int64(t.job.maxOutput)) {
		// An answer that ended on its own, capped or not, is the length
		// of an uncapped one.
		fold(n, outLen)
		t.job.answers.note(t.job.model, n, now)
	} else if tm.evalCount > 0 {
		// One its cap cut says only that it is longer: a typical length
		// below it is raised, one above it stands. Left as it was, a
		// length learned from other clients' short answers (30 tokens)
		// priced answers capped at, and running to, 100 as 30 long, and
		// a slow server of one slot drew a second one to queue (p99 1.9
		// s against 0.9).
		for _, rr := range targets {
			if rr.outN > 0 && rr.outTokens < n {
				rr.outTokens = ewma(rr.outTokens, rr.outN, n, now.Sub(rr.at))
				rr.outN++
			}
		}
		if typ := t.job.answers.typical(t.job.model); typ > 0 && typ < n {
			t.job.answers.note(t.job.model, n, now)
		}
	}
	for _, rr := range targets {
		rr.at = now
	}

	if !tm.native || tm.total <= 0 {
		if tm.streamed && !tm.native && !t.cold && !heldBack && tm.elapsed > tm.ttfb {
			sp.learnStreamSlotsLocked(t, tm, now)
		}
		return false, false
	}

	// Time neither evaluating nor generating: a model load
	// (load_duration), a wait for a parallel slot (Ollama takes one inside
	// the runner, after load_duration is measured, so it shows only in
	// total_duration), and overhead.
	loadSec := max(tm.load, 0).Seconds()
	waitSec := (tm.total - max(tm.load, 0) - max(tm.prompt, 0) - max(tm.ev, 0)).Seconds()
	signal := 2*sp.warmIdle + waitSignalMin
	switch {
	case t.loader:
		if loadSec > signal {
			sp.observeLoadLocked(r, loadSec, now)
			r.loadDone = t.started.Add(max(tm.load, 0))
			return true, false
		}
		// Resident after all: the server holds more models than believed.
		sp.room, sp.roomAt = 0, now
	case t.cold:
		// It waited for another request's load: nothing to learn.
	case t.blind && loadSec > signal:
		// A load where nothing was known of what the server held: no
		// eviction to learn the room from.
		sp.observeLoadLocked(r, loadSec, now)
		return true, false
	case loadSec > signal && !r.loadSeen.Before(t.started):
		// It shared a load already noticed (sent before that answer
		// came): one load, one eviction. Counting it again would take
		// one more model off the server's room each time.
	case loadSec > signal:
		// A load although the model was believed resident: it was
		// evicted (or expired) since.
		r.loadSeen = now
		sp.observeLoadLocked(r, loadSec, now)
		return true, true
	case heldBack:
		// total_duration may hold time the server spent waiting on the
		// client: it says nothing about slots.
	default:
		sp.learnSlotsLocked(t, tm, waitSec > signal, now)
		if waitSec <= signal {
			sp.warmIdle = ewma(sp.warmIdle, 1, waitSec, time.Second)
		}
	}
	return false, false
}

// splitLocked divides the time total of a prompt of n tokens and an answer
// of out tokens between the two, by what is known of the server (rates r
// of the model, else all of its): in the proportion its fit predicts when
// both are known (the whole changed speed, not one part); the part known
// and the rest to the other when one is (and fits in total); else the
// prompt as one step of the answer (a short prompt is evaluated in one
// batch, about the time of one generated token).
func (sp *speed) splitLocked(r *rates, n, out, total float64) (promptSec, genSec float64) {
	pr, gr := r, r
	if r.promptN == 0 {
		pr = &sp.all
	}
	if r.genN == 0 {
		gr = &sp.all
	}
	p, pok := 0.0, pr.promptN > 0
	if pok {
		p, _ = pr.promptSecs(n)
	}
	g, gok := gr.genTok*out, gr.genN > 0 && gr.genTok > 0
	switch {
	case pok && gok && p+g > 0:
		return total * p / (p + g), total * g / (p + g)
	case gok && g < total:
		return total - g, g
	case pok && p < total:
		return p, total - p
	}
	return total / (out + 1), total * out / (out + 1)
}

// foldPromptLocked adds a prompt sample (n tokens evaluated in sec) to the
// fits of targets, unless it was served in part from a prompt cache:
// Ollama counts the cached tokens in prompt_eval_count while
// prompt_eval_duration covers only those evaluated, so such a sample
// would make the server look faster at prompts than it is. A sample is
// taken as cached when it is more than cacheSuspectFactor faster than the
// model's fit predicts for its size, beyond what speedup (how much faster
// the server generates now than learned) explains; a cache only ever
// makes a prompt faster, so slower samples always count. A sample whose
// prompt no cache held (uncached: a measuring copy made uncacheable) and
// that is that much faster is what the server is now: it replaces the
// fit, as a shift's does (speedup-prompt: a server that recovered was
// learned only after six answers in a row, one copy a second, while the
// others queued).
func (sp *speed) foldPromptLocked(targets []*rates, r *rates, n, sec, speedup float64, shifted, uncached bool, now time.Time) {
	if pred, determined := r.promptSecs(n); determined && sec*cacheSuspectFactor*speedup < pred {
		if uncached {
			r.cacheSuspects = cacheSuspectLimit // no cache served it: the server got faster
		} else if r.cacheSuspects++; r.cacheSuspects < cacheSuspectLimit {
			return
		}
	}
	if r.cacheSuspects >= cacheSuspectLimit {
		// That many in a row: the server got faster at prompts (a
		// model that shared its GPU left, throttling ended). The sample
		// is what it is now, as for a shift in the other direction: an
		// average with the old fit would take as many again to move.
		shifted = true
	}
	r.cacheSuspects = 0
	for _, rr := range targets {
		rr.foldPrompt(n, sec, sampleGap(rr, r, shifted, now))
	}
}

func (sp *speed) observeLoadLocked(r *rates, sec float64, now time.Time) {
	r.load = ewma(r.load, r.loads, sec, now.Sub(r.at))
	r.loads++
	if r != &sp.all {
		sp.all.load = ewma(sp.all.load, sp.all.loads, sec, time.Second)
		sp.all.loads++
	}
	if sp.loadPrior != nil {
		sp.loadPrior.Store(math.Float64bits(sp.all.load))
	}
}

// startProbe notes that a request is going to a server not observed yet.
func (sp *speed) startProbe(now time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 && sp.probing.IsZero() {
		sp.probing = now
	}
}

// probeClaimTTL bounds how long a claimed measuring request that never
// began (its slot was lost to another request, it was not a completion)
// keeps the server counted as busy being measured.
const probeClaimTTL = 250 * time.Millisecond

// claimProbe reserves, for a request least_delay is about to send to
// measure the server (not observed yet), one of limit requests it may
// have at once, counting those in flight (inFlight, the server's slot
// counter) and those claimed that have not begun; it reports false when
// none is left. Claims are checked and taken under the lock, so requests
// that choose at the same instant cannot all pick the same idle server;
// begin consumes one.
func (sp *speed) claimProbe(limit int, inFlight *atomic.Int64, now time.Time) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	claims := sp.liveClaimsLocked(now)
	// Read after the claims: a request that claimed took its slot before
	// its claim was given up, so one or the other is always seen.
	if int(inFlight.Load())+claims >= limit {
		return false
	}
	sp.probeClaims = append(sp.probeClaims, now)
	if sp.all.promptN == 0 && sp.all.genN == 0 && sp.probing.IsZero() {
		sp.probing = now
	}
	return true
}

// probesTaken reports whether claimProbe would find none of limit left
// (in flight and claimed), without taking one: for a caller that only
// narrows the list the policy then chooses from (nearBest).
func (sp *speed) probesTaken(limit int, inFlight *atomic.Int64, now time.Time) bool {
	return sp.sentOrClaimed(inFlight, now) >= limit
}

// dropClaim gives up one claim of a measuring request or spare whose
// request has taken its slot (takeOrHold): the slot counter holds it now.
func (sp *speed) dropClaim() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.dropClaimLocked()
}

func (sp *speed) dropClaimLocked() {
	if len(sp.probeClaims) > 0 {
		sp.probeClaims = sp.probeClaims[1:]
	}
}

// liveClaimsLocked drops the claims older than probeClaimTTL (their
// requests never began) and counts those left.
func (sp *speed) liveClaimsLocked(now time.Time) int {
	keep := sp.probeClaims[:0]
	for _, c := range sp.probeClaims {
		if now.Sub(c) < probeClaimTTL {
			keep = append(keep, c)
		}
	}
	sp.probeClaims = keep
	return len(keep)
}

// sentOrClaimed is the requests the server has in flight (inFlight) and
// those claimed to measure it that have not begun: a measuring request
// claimed is not in flight until its attempt takes the slot.
func (sp *speed) sentOrClaimed(inFlight *atomic.Int64, now time.Time) int {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	claims := sp.liveClaimsLocked(now)
	return int(inFlight.Load()) + claims
}

// probingSince is when the server's first request went out, zero if none
// did or it has been observed.
func (sp *speed) probingSince() time.Time {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN > 0 || sp.all.genN > 0 {
		return time.Time{}
	}
	return sp.probing
}

// speedView is what the admin API shows of a server's learned speed.
type speedView struct {
	samples               int
	service, coldLoad     float64 // seconds: a typical request, a model load
	slots                 int
	promptTokMS, genTokMS float64
	modelRoom             int
}

// view summarises the model; ok is false before any sample.
func (sp *speed) view() (v speedView, ok bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return v, false
	}
	p, o := sp.serviceLocked(&job{})
	return speedView{samples: max(sp.all.promptN, sp.all.genN), service: p + o, coldLoad: sp.loadCostLocked(""),
		slots: max(sp.slotsLo, 1), promptTokMS: sp.all.promptTok * 1000, genTokMS: sp.all.genTok * 1000,
		modelRoom: sp.room}, true
}

// sentWorkWeight is the weight of the latest request in sentWork: about
// the last five sent.
const sentWorkWeight = 0.2
