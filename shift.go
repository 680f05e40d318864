package ollamaflow

import "time"

// A server that changed speed (issue 13: "estimates decay so a server that
// changed speed is re-learned within seconds"). Two ways of noticing it:
// answers that disagree with what was learned, two in a row, replace the
// estimate instead of being averaged in (shiftedLocked); and a server
// believed slow, which least_delay sends nothing, is re-measured while the
// others queue (claimRemeasure): by a copy of a waiting request each
// second (measurecopy.go), or by a request itself every remeasureAfter.

// A sample more than shiftFactor slower than the model's rates predict for
// its counts (or, by its generation, that much faster) is a surprise; a
// second surprise the same way within shiftWithin is a shift, and the
// answer that confirms it is all that is known of the server's speed now.
// The EWMA's least weight (speedAlpha) is there for noise: from a steady
// 0.1 s, answers of 0.4 s moved the estimate to 0.17 s, then 0.23 s, and a
// server that had turned four times slower kept drawing requests at the
// speed it no longer had (slowdown: five answers of 0.4 s in the first
// second, where two were already on their way when it changed). One
// surprise alone is weighed as usual: an answer longer than its kind, a
// busy moment, says little.
const (
	shiftFactor = 1.5
	shiftWithin = speedTau
)

// shiftedLocked reports whether the answer of promptN prompt tokens in
// promptSec and outN tokens in genSec (each -1 when not measured)
// confirms a shift of r's speed, and keeps track of surprises in a row.
func (r *rates) shiftedLocked(promptN, outN, promptSec, genSec float64, now time.Time) bool {
	dir := r.surprise(promptN, outN, promptSec, genSec)
	if dir != 0 && dir == r.shift && now.Sub(r.shiftAt) < shiftWithin {
		r.shift = 0
		return true
	}
	r.shift, r.shiftAt = dir, now
	return false
}

// surprise is +1 when the answer took more than shiftFactor times what r
// predicts for its counts, -1 when it generated its tokens that much
// faster, 0 otherwise; a difference under waitSignalMin is none (the
// scheduling noise of a busy machine). A faster prompt is not a surprise:
// a prompt cache makes one faster without the server being so
// (foldPromptLocked); a generation has no such cache. A single generated
// token says nothing of the generation rate: its time is mostly a step's
// fixed cost.
func (r *rates) surprise(promptN, outN, promptSec, genSec float64) int {
	gen := r.genN > 0 && r.genTok > 0 && outN >= 2 && genSec >= 0
	if gen {
		predicted := r.genTok * outN
		switch {
		case genSec*shiftFactor < predicted && predicted-genSec > waitSignalMin:
			return -1
		case genSec > shiftFactor*predicted && genSec-predicted > waitSignalMin:
			return 1
		}
	}
	predicted, took := 0.0, 0.0
	if promptSec >= 0 && promptN > 0 && r.promptN > 0 {
		p, _ := r.promptSecs(promptN)
		predicted, took = predicted+p, took+promptSec
	}
	if gen {
		predicted, took = predicted+r.genTok*outN, took+genSec
	}
	if predicted > 0 && took > shiftFactor*predicted && took-predicted > waitSignalMin {
		return 1
	}
	return 0
}

// slowerThanAnyCache reports whether a prompt of n tokens evaluated in sec
// took clearly longer (shiftFactor) than r's fit predicts for the whole of
// it: no prompt cache explains that, so it is the server's speed even
// where a cache was expected.
func (r *rates) slowerThanAnyCache(n, sec float64) bool {
	pred, _ := r.promptSecs(n)
	return r.promptN > 0 && n > 0 && sec > shiftFactor*pred && sec-pred > waitSignalMin
}

// remeasureAfter is how long a server may go without a sample before
// least_delay, while the others queue, sends it a request that may not be
// copied (an embedding, a long prompt) to measure it again. A server
// believed slow is otherwise never sent anything, so it could never be
// seen to have recovered (a model that shared its GPU was unloaded,
// throttling ended); one such request every few seconds is the price.
const remeasureAfter = 5 * time.Second

// How a server believed slow is re-measured (claimRemeasure).
type remeasure int

const (
	remeasureNone remeasure = iota
	// remeasureRequest: the request itself goes there.
	remeasureRequest
	// remeasureCopy: a copy of the request goes there, its answer read by
	// the proxy alone, while the request goes where the policy sends it
	// (measurecopy.go).
	remeasureCopy
)

// claimRemeasure reports how the server is to be re-measured now with j,
// if at all, and notes it. A request that may be copied (copyable)
// re-measures it with a copy once it has had no sample for copyAfter and
// no copy is in flight: the client's answer does not wait on a server
// believed slow. A request re-measures it itself once it has had no
// sample for remeasureAfter and none was sent in that time, and at once
// after an answer much faster than believed (remeasureNow): the server is
// likely fast again, and a client's request confirms it (a shift needs
// two answers in a row). Only a request of about the server's typical
// size does (remeasureSpan), the claim left to the next one otherwise.
func (sp *speed) claimRemeasure(now time.Time, j *job, copyable bool) remeasure {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return remeasureNone
	}
	if !sp.remeasureNow && copyable && !sp.copying && now.Sub(sp.all.at) >= copyAfter && now.Sub(sp.copied) >= max(copyAfter, copyShare*sp.copyTook) {
		sp.copying, sp.copied, sp.remeasuring = true, now, now
		sp.copyStart = time.Now()
		return remeasureCopy
	}
	if !sp.remeasureNow && (now.Sub(sp.all.at) < remeasureAfter || now.Sub(sp.remeasuring) < remeasureAfter) {
		return remeasureNone
	}
	if j != nil {
		p, o := sp.serviceLocked(j)
		tp, to := sp.serviceLocked(&job{model: j.model, answers: j.answers})
		if p+o > remeasureSpan*(tp+to) {
			return remeasureNone
		}
	}
	sp.remeasuring, sp.remeasureNow, sp.remeasureSent = now, false, true
	return remeasureRequest
}

// remeasureSpan is how much longer than the server's typical request one
// may be and still re-measure it itself. Any request did: after a quiet
// start the first request of the burst while a slow server had gone
// unsampled re-measured it, a long prompt and answer among them taking
// 2.2 s there against 0.5 s on the fast server (random-128: p99 0.73 s
// against least_conn's 0.61 s in half the runs). A server's typical
// request shows its speed as well as a long one, at a cost the pool
// already bears.
const remeasureSpan = 2

// copyDone notes that the server's measuring copy ended, answered or not.
func (sp *speed) copyDone() {
	sp.mu.Lock()
	sp.copying = false
	if !sp.copyStart.IsZero() {
		sp.copyTook = time.Since(sp.copyStart)
	}
	sp.mu.Unlock()
}

// remeasuredFaster notes the answer of a request sent at or after the
// last re-measurement: when it took well under the time expected of it,
// the server has recovered and the next re-measurement goes at once, so
// a few requests re-learn it instead of one every remeasureAfter (one
// sample after a gap moves the estimate most of the way, not all of it).
func (sp *speed) remeasuredFasterLocked(t *task, tm timings) {
	if sp.remeasuring.IsZero() || t.started.Before(sp.remeasuring) {
		return
	}
	took := (tm.prompt + tm.ev).Seconds()
	if !tm.native {
		took = tm.elapsed.Seconds() // OpenAI: no durations; all of it is at most this
	}
	if took > 0 && took*1.5 < t.service {
		sp.remeasureNow = true
	}
}

// sampleGap is the silence a speed sample for the rates r of its model is
// folded into rr after: the time since rr's last sample, or, when the
// sample confirmed a shift of r, as long as makes it replace what r knew.
// The server's rates over all models (the fallback for a model not seen
// there) fold it as usual: another model's shift says less of theirs.
func sampleGap(rr, r *rates, shifted bool, now time.Time) time.Duration {
	if shifted && rr == r {
		return remeasureAfter
	}
	return now.Sub(rr.at)
}
