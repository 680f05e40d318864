package ollamaflow

import "time"

// Prompt evaluation time against prompt size. Each server fits, per model
// and over all models, a line through its samples: a fixed part every
// evaluation pays and a part per token. Until the sizes it has seen vary
// enough to tell the two apart, a prompt larger than those is priced on
// the shape another server learned, scaled to this server's own samples.

// promptSecs is the expected evaluation time of a prompt of n tokens,
// from the fit of the samples seen; determined says the fit covers n: the
// samples' sizes varied enough to separate the fixed part from the
// per-token part, or n is about the size they had. Until sizes vary, a
// prompt is taken to cost in proportion to its tokens: an overestimate for
// a long prompt on a GPU, never an underestimate (serviceLocked narrows it
// by the lines other servers learned: promptScaled).
func (r *rates) promptSecs(n float64) (sec float64, determined bool) {
	if r.promptN == 0 || r.px <= 0 {
		return 0, false
	}
	if l, ok := r.line(); ok {
		return l.fixed + l.perTok*n, true
	}
	return r.py / r.px * n, n <= 1.5*r.px
}

// promptLine is a fit of prompt evaluation time against prompt tokens: a
// fixed part paid by every evaluation and a part per token.
type promptLine struct{ fixed, perTok float64 }

func (l promptLine) at(n float64) float64 { return l.fixed + l.perTok*n }

// line is r's fit once its samples' sizes varied enough to separate the
// fixed part from the per-token part.
func (r *rates) line() (promptLine, bool) {
	vx := r.pxx - r.px*r.px
	if r.promptN < 2 || r.px <= 0 || vx <= 0.0625*r.px*r.px {
		return promptLine{}, false
	}
	b := max((r.pxy-r.px*r.py)/vx, 0)
	a := r.py - b*r.px
	if a < 0 {
		a, b = 0, r.py/r.px
	}
	return promptLine{a, b}, true
}

// promptScaled is the time for a prompt of n tokens, larger than any r has
// seen, on the shape another server learned: each line of refs scaled to
// what r took for the prompts it has seen (a server twice as slow at short
// prompts is taken as twice as slow at long ones), the slowest of them.
// Taken in proportion to tokens instead, a server timed on short prompts
// only, whose time is mostly the fixed part, looked ten or twenty times
// slower at a long prompt than it was, was never sent one, and so never
// learned better: a random pool's long prompts queued on the one server
// of a single slot that had been timed on one (random-31: 12 req/s at p99
// 1.7 s, against least_conn's 16 at 0.9 s).
func (r *rates) promptScaled(refs []promptLine, n float64) (float64, bool) {
	sec, ok := 0.0, false
	for _, l := range refs {
		if seen := l.at(r.px); seen > 0 {
			sec, ok = max(sec, r.py/seen*l.at(n)), true
		}
	}
	return sec, ok
}

// promptRefs are the prompt lines of a few of a request's candidates (for
// its model) that learned one: what promptScaled scales. Read once, before
// the request is routed, so the cost model reads them without a lock.
type promptRefs struct {
	lines [3]promptLine
	n     int
}

func (p *promptRefs) list() []promptLine { return p.lines[:p.n] }

// notePromptRefs fills j.refs from the first of cands (a handful at most)
// that learned a prompt line for j's model (the server's over all models
// where the model has none). A request without a prompt needs none.
func notePromptRefs(cands []*backend, j *job) {
	j.refs.n = 0
	if j.promptChars == 0 {
		return
	}
	for i, b := range cands {
		if i == sampleSize || j.refs.n == len(j.refs.lines) {
			return
		}
		if l, ok := b.srv.speed.promptLine(j.model); ok {
			j.refs.lines[j.refs.n] = l
			j.refs.n++
		}
	}
}

// promptLine is the server's prompt line for model (over all models where
// the model has no prompt sample), if it learned one.
func (sp *speed) promptLine(model string) (promptLine, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	r := &sp.all
	if mr := sp.models[model]; mr != nil && mr.promptN > 0 {
		r = mr
	}
	return r.line()
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
