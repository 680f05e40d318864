package ollamaflow

import (
	"cmp"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
)

// The speed and cost model behind least_delay. Each pooled server learns,
// from the timings Ollama reports in a completion's final chunk (never from
// wall time, which includes how fast the client reads), how fast it
// evaluates a prompt and generates a token, how long a model load takes,
// how many requests it serves at once, and how many models it holds. A
// request's expected delay on a server is then the wait for one of its
// slots behind the work already sent there, a model load where the model
// is not resident, and the request's own work, sized from its body.

// job is what a request asks of a server, read from its body: the input of
// the cost model.
type job struct {
	model       string // normalised; "" for a request that names none
	promptChars int    // characters of prompt text: prompt, system, suffix, messages, input
	maxOutput   int    // num_predict, max_tokens or max_completion_tokens; 0 when not set
	// cachedOn is the server whose prompt cache conversation affinity sent
	// the request to (affinity.go). Ollama counts a cached prompt whole in
	// prompt_eval_count but times only what it evaluated, so its timing
	// there says nothing of the server's prompt rate.
	cachedOn *speed
	// avoid is what the current attempt passes over above largePool
	// (largepool.go).
	avoid avoidance
}

// newJob reads what a request asks for from its body, the way Ollama
// decodes it (keys match case-insensitively, escapes decoded, the last
// duplicate wins). Parts it does not understand count as nothing: the
// estimate is a guide for routing, never a limit.
func newJob(model string, api apiFormat, body []byte) *job {
	j := &job{model: model}
	if len(body) == 0 {
		return j
	}
	fields := map[string]int{}
	gjson.ParseBytes(body).ForEach(func(k, v gjson.Result) bool {
		key := foldedKey(k.String(), jobFields)
		switch {
		case key == "prompt", key == "system", key == "suffix":
			fields[key] = textChars(v)
		case key == "messages":
			n := 0
			v.ForEach(func(_, m gjson.Result) bool {
				m.ForEach(func(mk, mv gjson.Result) bool {
					if strings.EqualFold(mk.String(), "content") {
						n += textChars(mv)
					}
					return true
				})
				return true
			})
			fields[key] = n
		case key == "input":
			fields[key] = textChars(v)
		case key == "options" && api == apiOllama:
			v.ForEach(func(ok, ov gjson.Result) bool {
				if strings.EqualFold(ok.String(), "num_predict") && ov.Type == gjson.Number {
					j.maxOutput = max(int(ov.Int()), 0)
				}
				return true
			})
		case (key == "max_tokens" || key == "max_completion_tokens") && api == apiOpenAI && v.Type == gjson.Number:
			j.maxOutput = max(int(v.Int()), 0)
		}
		return true
	})
	for _, n := range fields {
		j.promptChars += n
	}
	return j
}

// jobFields are the body's top-level members newJob reads.
var jobFields = []string{"prompt", "system", "suffix", "messages", "input", "options", "max_tokens", "max_completion_tokens"}

// foldedKey is the field of fields that key names as encoding/json matches
// keys (equal under Unicode simple folding, so "ſystem" and "max_tokenſ"
// count as Ollama reads them, which lowercasing would miss), "" if none.
func foldedKey(key string, fields []string) string {
	for _, f := range fields {
		if strings.EqualFold(key, f) {
			return f
		}
	}
	return ""
}

// textChars is the length of a text value: a string, or OpenAI's content
// parts ([{"type":"text","text":…}]) and arrays of strings.
func textChars(v gjson.Result) int {
	switch {
	case v.Type == gjson.String:
		return len(v.Str)
	case v.IsArray():
		n := 0
		v.ForEach(func(_, e gjson.Result) bool {
			if e.Type == gjson.String {
				n += len(e.Str)
			} else if e.IsObject() {
				e.ForEach(func(k, t gjson.Result) bool {
					if strings.EqualFold(k.String(), "text") && t.Type == gjson.String {
						n += len(t.Str)
					}
					return true
				})
			}
			return true
		})
		return n
	}
	return 0
}

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
}

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

	tasks  map[uint64]*task // requests in flight, with their expected end
	nextID uint64
	// ended remembers when recent requests ended, by id, so that an
	// answer can tell how many of the requests sent before it still held
	// a slot when it got its own (see aheadAtLocked).
	ended    [endedRing]endedTask
	endedPos int
	probing  time.Time // when least_delay first sent it a request, before any sample
	// remeasuring is when least_delay last sent the server a request to
	// re-measure it (see claimRemeasure); remeasureNow asks for the next
	// one at once: the last answered much faster than believed.
	remeasuring  time.Time
	remeasureNow bool
	// errShare is the share of server errors among its recent answers,
	// as of errAt (see noteAnswer).
	errShare float64
	errAt    time.Time
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
	genN          int
	genTok        float64 // seconds per generated token
	outN          int
	outTokens     float64 // answer length when the request set no cap
	inN           int
	inTokens      float64 // prompt length, for requests whose body gave none
	charsN        int
	charsPerTok   float64
	loads         int
	load          float64 // seconds per model load
	lastUsed      time.Time
	// loadSeen is when an answer last showed a load of the model that
	// was not expected (it was believed resident): requests sent before
	// then that show a load too waited for that same one (Ollama's
	// scheduler loads a model once for all the requests that want it).
	loadSeen time.Time
}

// endedRing bounds the ended requests remembered per server.
const endedRing = 256

type endedTask struct {
	id uint64
	at time.Time
}

// task is one request in flight on the server.
type task struct {
	id       uint64
	sp       *speed
	job      *job
	started  time.Time
	finish   time.Time // expected end
	service  float64   // expected prompt + output seconds
	work     float64   // expected load + prompt + output seconds
	cold     bool      // the model was not resident (or was loading) when it was sent
	loader   bool      // it is the request that loads the model
	inFlight int       // requests in flight on the server when it was sent (sent before it, itself included)
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

// promptSecs is the expected evaluation time of a prompt of n tokens,
// from the fit of the samples seen; determined says the fit covers n: the
// samples' sizes varied enough to separate the fixed part from the
// per-token part, or n is about the size they had. Until sizes vary, a
// prompt is taken to cost in proportion to its tokens: an overestimate for
// a long prompt on a GPU, never an underestimate.
func (r *rates) promptSecs(n float64) (sec float64, determined bool) {
	if r.promptN == 0 || r.px <= 0 {
		return 0, false
	}
	if vx := r.pxx - r.px*r.px; r.promptN >= 2 && vx > 0.0625*r.px*r.px {
		b := max((r.pxy-r.px*r.py)/vx, 0)
		a := r.py - b*r.px
		if a < 0 {
			a, b = 0, r.py/r.px
		}
		return a + b*n, true
	}
	return r.py / r.px * n, n <= 1.5*r.px
}

// foldPrompt adds a prompt of n tokens evaluated in sec to the fit.
func (r *rates) foldPrompt(n, sec float64, since time.Duration) {
	a := 1.0
	if r.promptN > 0 {
		a = sampleWeight(since)
	}
	r.px += a * (n - r.px)
	r.py += a * (sec - r.py)
	r.pxx += a * (n*n - r.pxx)
	r.pxy += a * (n*sec - r.pxy)
	r.promptN++
	fixed, _ := r.promptSecs(0)
	per, _ := r.promptSecs(1)
	r.promptTok = per - fixed
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
	out := pick(r.outN, r.outTokens, sp.all.outTokens)
	if j.maxOutput > 0 && (out == 0 || float64(j.maxOutput) < out || r.outN == 0 && sp.all.outN == 0) {
		out = float64(j.maxOutput)
	}
	pr := r
	if r.promptN == 0 {
		pr = &sp.all
	}
	prompt, _ = pr.promptSecs(in)
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
// expected end still has a share of its work left, and those queued
// behind it start no earlier than now, so a server whose queue runs late
// (slower than expected, or fewer slots than planned for) shows a longer
// wait instead of looking idle.
func (sp *speed) waitLocked(inFlight, slots int, typical float64, now time.Time) float64 {
	if inFlight < slots {
		return 0
	}
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
	take := func(arrived, work float64) {
		start := max(arrived, free[0])
		end := start + work
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
	}
	for _, t := range order {
		take(t.started.Sub(now).Seconds(), t.work)
	}
	// Requests the model does not track (model reads, or sent before a
	// reload) take a typical time each, after those it knows.
	for i := len(order); i < inFlight; i++ {
		take(0, typical)
	}
	return max(free[0], 0)
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

// aheadAtLocked is how many of the requests sent to the server before t
// (t itself included) were still in flight at at: those in flight now,
// and those that ended after at.
func (sp *speed) aheadAtLocked(t *task, at time.Time) int {
	n := 1
	for _, o := range sp.tasks {
		if o.id < t.id {
			n++
		}
	}
	for _, e := range sp.ended {
		if e.id != 0 && e.id < t.id && e.at.After(at) {
			n++
		}
	}
	return n
}

// loadCostLocked is what loading model is expected to take.
func (sp *speed) loadCostLocked(model string) float64 {
	if r := sp.models[model]; r != nil && r.loads > 0 {
		return r.load
	}
	if sp.all.loads > 0 {
		return sp.all.load
	}
	return coldLoadPrior
}

// pendingLoadLocked is the time left of a load of model already under way.
func (sp *speed) pendingLoadLocked(model string, now time.Time) (float64, bool) {
	left, found := 0.0, false
	for _, t := range sp.tasks {
		if t.loader && t.job.model == model {
			found = true
			end := t.started.Add(time.Duration(sp.loadCostLocked(model) * float64(time.Second)))
			left = max(left, end.Sub(now).Seconds())
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
	if untried && inFlight+1 == slots {
		// The request would take the slot planned for but never seen
		// in use, only not ruled out: as likely missing as there. It
		// expects half the wait it would have without it, so the
		// untried slot of a slow server with a long answer in its one
		// real slot does not look free, while a fast server's is still
		// tried when the alternative costs more.
		d.wait = sp.waitLocked(inFlight, slots-1, tp+to, now) / 2
	}
	if j.model != "" {
		if left, loading := sp.pendingLoadLocked(j.model, now); loading {
			d.load = left
		} else if cold {
			d.load = sp.loadCostLocked(j.model)
		}
	}
	if p := sp.errorShareLocked(now); p > 0 {
		d.errors = (d.wait + d.load + d.prompt + d.output) * p / (1 - p)
	}
	return d, true
}

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

// begin records that a request for j was sent to b, with the delay it is
// expected to take; end (or learn) removes it. A request for a model that
// is not resident makes it resident in the model's belief at once, so the
// requests that follow queue behind one load instead of each planning
// their own, and, where the server is full, the model least recently used
// there is taken to be evicted.
func (b *backend) begin(j *job, now time.Time) *task {
	s := b.srv
	cold := notResident(b, j.model)
	sp := &s.speed
	sp.mu.Lock()
	d, _ := sp.estimateLocked(j, b.cfg.MaxParallel, int(s.inFlight.Load())-1, cold, now)
	_, loading := sp.pendingLoadLocked(j.model, now)
	// Requests in flight are counted from the model's own tasks, those
	// sent before this one: the server's slot counter also holds
	// requests dispatched at the same instant (a queue released at
	// once), which reach the server after this one.
	t := &task{sp: sp, job: j, started: now, service: d.prompt + d.output, work: d.load + d.prompt + d.output,
		cold: cold || loading, loader: cold && !loading, inFlight: len(sp.tasks) + 1}
	t.finish = now.Add(time.Duration(d.total() * float64(time.Second)))
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
			evict = sp.victimLocked(s.models.Load(), j.model)
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

// end removes the request from the work in flight; safe to call twice.
func (t *task) end() { t.endAt(time.Now()) }

func (t *task) endAt(now time.Time) {
	if t == nil || !t.done.CompareAndSwap(false, true) {
		return
	}
	sp := t.sp
	sp.mu.Lock()
	delete(sp.tasks, t.id)
	sp.ended[sp.endedPos] = endedTask{t.id, now}
	sp.endedPos = (sp.endedPos + 1) % endedRing
	sp.mu.Unlock()
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
	return timings{promptCount: tail.number("prompt_tokens"), evalCount: tail.number("completion_tokens"),
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
	cacheSuspectLimit  = 12
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
	sp := t.sp
	sp.mu.Lock()
	defer sp.mu.Unlock()
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
	genRate := func(rr *rates) (*float64, *int) { return &rr.genTok, &rr.genN }
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
	}
	if t.job.cachedOn == sp {
		// Conversation affinity sent it to its prompt cache here: its
		// prompt time says nothing of the server's prompt rate.
		promptSec = -1
	}
	heldBack := tm.clientHeldBack()
	if heldBack {
		// The answer went at the client's pace: its duration says
		// nothing of the server's. The prompt was over before the first
		// byte, so its time stands.
		genSec = -1
	}
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
			sp.foldPromptLocked(targets, r, float64(tm.promptCount), promptSec, speedup, now)
		}
		fold(sample, genRate)
	} else if tm.promptCount > 0 && promptSec >= 0 {
		sp.foldPromptLocked(targets, r, float64(tm.promptCount), promptSec, 1, now)
	}
	if tm.promptCount > 0 {
		fold(float64(tm.promptCount), promptLen)
		if t.job.promptChars > 0 {
			fold(float64(t.job.promptChars)/float64(tm.promptCount), charRatio)
		}
	}
	if tm.evalCount > 0 && t.job.maxOutput == 0 {
		fold(float64(tm.evalCount), outLen)
	}
	for _, rr := range targets {
		rr.at = now
	}

	if !tm.native || tm.total <= 0 {
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
			return true, false
		}
		// Resident after all: the server holds more models than believed.
		sp.room, sp.roomAt = 0, now
	case t.cold:
		// It waited for another request's load: nothing to learn.
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
	case waitSec <= signal:
		// It had a slot at once: the server serves at least as many at
		// once as were in flight when it started work (those sent
		// before it that had not ended by then, itself included).
		started := now.Add(-(max(tm.load, 0) + max(tm.prompt, 0) + max(tm.ev, 0)))
		sp.slotsLo = max(sp.slotsLo, sp.aheadAtLocked(t, started))
		if sp.slotsHi > 0 && sp.slotsHi < sp.slotsLo {
			sp.slotsHi = 0 // served more than thought possible: it changed
		}
		sp.warmIdle = ewma(sp.warmIdle, 1, waitSec, time.Second)
	default:
		// It waited for a slot: the server has fewer than were in flight.
		if hi := t.inFlight - 1; hi >= 1 {
			if sp.slotsHi == 0 || hi < sp.slotsHi || now.Sub(sp.hiAt) >= slotRetest {
				sp.slotsHi = hi
			}
			sp.hiAt = now
		}
		if sp.slotsHi > 0 && sp.slotsLo > sp.slotsHi {
			sp.slotsLo = sp.slotsHi
		}
	}
	return false, false
}

// foldPromptLocked adds a prompt sample (n tokens evaluated in sec) to the
// fits of targets, unless it was served in part from a prompt cache:
// Ollama counts the cached tokens in prompt_eval_count while
// prompt_eval_duration covers only those evaluated, so such a sample
// would make the server look faster at prompts than it is. A sample is
// taken as cached when it is more than cacheSuspectFactor faster than the
// model's fit predicts for its size, beyond what speedup (how much faster
// the server generates now than learned) explains; a cache only ever
// makes a prompt faster, so slower samples always count.
func (sp *speed) foldPromptLocked(targets []*rates, r *rates, n, sec, speedup float64, now time.Time) {
	if pred, determined := r.promptSecs(n); determined && sec*cacheSuspectFactor*speedup < pred {
		r.cacheSuspects++
		if r.cacheSuspects < cacheSuspectLimit {
			return
		}
	}
	r.cacheSuspects = 0
	for _, rr := range targets {
		rr.foldPrompt(n, sec, now.Sub(rr.at))
	}
}

func (sp *speed) observeLoadLocked(r *rates, sec float64, now time.Time) {
	r.load = ewma(r.load, r.loads, sec, now.Sub(r.at))
	r.loads++
	if r != &sp.all {
		sp.all.load = ewma(sp.all.load, sp.all.loads, sec, time.Second)
		sp.all.loads++
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

// probingSince is when the server's first request went out, zero if none
// did or it has been observed.
// remeasureAfter is how long a server may go without a sample before
// least_delay, while the others queue, sends it one request to measure it
// again. A server believed slow is otherwise never sent anything, so it
// could never be seen to have recovered (a model that shared its GPU was
// unloaded, throttling ended); one request every few seconds is the price.
const remeasureAfter = 5 * time.Second

// claimRemeasure reports whether the server is due a re-measurement (it
// has been measured, but not for remeasureAfter, and no re-measurement
// was sent in that time) and, if so, notes that one is sent now.
func (sp *speed) claimRemeasure(now time.Time) bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return false
	}
	if !sp.remeasureNow && (now.Sub(sp.all.at) < remeasureAfter || now.Sub(sp.remeasuring) < remeasureAfter) {
		return false
	}
	sp.remeasuring, sp.remeasureNow = now, false
	return true
}

// remeasuredFaster notes the answer of a request sent at or after the
// last re-measurement: when it took well under the time expected of it,
// the server has recovered and the next re-measurement goes at once, so
// a few requests re-learn it instead of one every remeasureAfter (one
// sample after a gap moves the estimate most of the way, not all of it).
func (sp *speed) remeasuredFasterLocked(t *task, tm timings) {
	if sp.remeasuring.IsZero() || t.started.Before(sp.remeasuring) || !tm.native {
		return
	}
	if took := (tm.prompt + tm.ev).Seconds(); took > 0 && took*1.5 < t.service {
		sp.remeasureNow = true
	}
}

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
