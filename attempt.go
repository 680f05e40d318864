package ollamaflow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"
)

// The attempt loop: each attempt takes a slot on a different backend, and a
// failure before the first byte of the answer moves the request on to the
// next one; after it, the answer streams to the client (stream.go).

// attemptResult says what an attempt did: wrote the response (done), or
// left the client untouched so another backend may be tried.
type attemptResult struct {
	done  bool
	abort bool   // the body was cut where no error can be written: abort the response
	cause string // what went wrong, for the final error message
	// moved: a spare request whose server another outran (spare.go); it
	// is chosen again, and the move is no failure and no retry.
	moved bool
}

// proxy runs the attempt loop: each attempt takes a slot on a different
// backend; failures before the first response byte move on to the next.
func (h *Handler) proxy(w http.ResponseWriter, r *http.Request, api apiFormat, body []byte, cands []*backend, model string, kind routeKind, info *requestInfo) error {
	tried := make([]*backend, 0, h.retries+1)
	j := newJob(model, api, body)
	j.arrived = time.Now()
	j.answers = &answerLengths
	j.copyable = h.copyable(r, api, kind, body, j)
	defer dropCopy(j) // a copy claimed by a pick whose request went nowhere
	if kind == kindCompletion {
		h.demand.note(j.model, time.Now())
	}
	notePromptRefs(cands, j)
	var conv conversation
	var convID uint64 // the conversation's, once known; 0: a new one
	if h.affinity != nil && kind == kindCompletion {
		conv = conversationOf(r.URL.Path, model, body)
	}
	var last attemptResult
	var failed *backend // the backend of the last failed attempt
	for attempt := 0; attempt <= h.retries; attempt++ {
		// Servers already tried are out; servers that just answered 503
		// "server busy" sit out a moment, unless nothing else is left; of
		// those left, the lowest SRV priority that can serve takes the
		// request (largepool.go: above largePool, without copying cands).
		avail, remaining := h.attemptCandidates(cands, tried, j)
		if remaining == 0 {
			break
		}
		var b *backend
		if attempt == 0 && !j.moved {
			b, info.sticky, info.route, convID = h.acquireFirst(r, avail, conv, j)
			if info.sticky != "" {
				w.Header().Set("X-OllamaFlow-Sticky", info.sticky)
			}
			w.Header().Set("X-OllamaFlow-Route", info.route)
		} else {
			b = h.acquire(avail, j)
		}
		h.sendCopy(r, api, kind, body, j)
		if b == nil {
			avail = h.exactCandidates(avail, j) // what the queue waits on
			if len(avail) == 0 {
				break // every server left was tried
			}
			var err error
			var waited time.Duration
			// Picks made for it while queued claim no copy: one would
			// hold the claim (one per server) for as long as it waits.
			j.copyable = false
			b, waited, err = h.queue.wait(r.Context(), h.newWaiter(r, kind, j, avail, tried))
			metrics.queueWait.WithLabelValues(h.Name).Observe(waited.Seconds())
			switch {
			case errors.Is(err, errQueueFull), errors.Is(err, errClientShare), errors.Is(err, errClassShare), errors.Is(err, errPushedOut):
				return h.failQueue(w, api, err)
			case errors.Is(err, errQueueTimeout):
				w.Header().Set("Retry-After", "5")
				return h.fail(w, api, http.StatusServiceUnavailable, fmt.Sprintf("no backend slot freed within %s (queue_timeout); retry shortly", time.Duration(h.QueueTimeout)))
			case err != nil:
				return nil // the client left while queued
			}
		}
		tried = append(tried, b)
		if !conv.none() { // the next turn finds the server that has this one in its cache
			j.turn = h.affinity.record(conv, b.srv.key, convID, time.Now())
		}
		if failed != nil { // counted only now: a failure with nothing left to try is no retry
			metrics.retries.WithLabelValues(h.Name, failed.cfg.Name).Inc()
		}
		final := attempt == h.retries || remaining == 1
		// Per attempt, so the last one wins: the backend that answered.
		info.backend, info.attempts = b.cfg.Name, info.attempts+1
		setPlaceholder(r, placeholderBackend, b.cfg.Name)
		last = h.attempt(w, r, api, body, b, final, j, kind, info)
		traceAttempt(r, b.cfg.Name, last.cause)
		if last.abort {
			return errAbortResponse
		}
		if last.done {
			return nil
		}
		if last.moved {
			// No attempt and no failure: the server it left stays a
			// candidate (its first answer may yet show it the best), the
			// retry counted for it already is not counted again, and the
			// route chosen first (sticky, affinity) is not chosen anew.
			// A request is moved once at most (claimSpare).
			j.spareOn, j.spareAmong, j.measureOn, j.moved = nil, nil, nil, true
			tried = tried[:len(tried)-1]
			info.attempts--
			failed = nil
			attempt--
			continue
		}
		failed = b
	}
	if r.Context().Err() != nil {
		return nil // the client is gone; nobody to answer
	}
	msg := "no backend could serve the request"
	if last.cause != "" {
		msg += ": " + last.cause
	}
	return h.fail(w, api, http.StatusBadGateway, msg)
}

// busyBackoff is the longest a server that answered 503 "server busy" is
// passed over while other candidates remain; it is back sooner when one of
// the requests it was serving finishes (see server.backingOff).
const busyBackoff = time.Second

// notBusy drops the servers still backing off after a 503 "server busy",
// unless that would leave none: a busy server is better than no server.
func notBusy(list []*backend, now time.Time) []*backend {
	if now.UnixNano() >= backOffUntil.Load() {
		return list // nobody is backing off
	}
	noteWalk(list)
	n := 0
	for _, b := range list {
		if !b.srv.backingOff(now) {
			n++
		}
	}
	if n == len(list) || n == 0 {
		return list
	}
	out := make([]*backend, 0, n)
	for _, b := range list {
		if !b.srv.backingOff(now) {
			out = append(out, b)
		}
	}
	return out
}

func exclude(list, drop []*backend) []*backend {
	noteWalk(list)
	out := make([]*backend, 0, len(list))
outer:
	for _, b := range list {
		for _, d := range drop {
			if b == d {
				continue outer
			}
		}
		out = append(out, b)
	}
	return out
}

// retryable reports whether a backend status before the first byte may be
// retried on another backend.
func retryable(status int) bool {
	return status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout
}

// attempt sends the request to b (holding a slot on it) and, unless it
// fails in a way another backend may fix, streams the answer to the client.
// It always releases the slot.
func (h *Handler) attempt(w http.ResponseWriter, r *http.Request, api apiFormat, body []byte, b *backend, final bool, j *job, kind routeKind, info *requestInfo) attemptResult {
	release := sync.OnceFunc(b.release) // the stall watchdog may free it early
	defer release()
	model := j.model
	started := time.Now()
	// The cost model counts this request as work on the server until it
	// ends, whatever the outcome; only a complete answer teaches it.
	var work *task
	if kind == kindCompletion || kind == kindEmbedding {
		work = b.begin(j, started)
		defer work.end()
	}
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)

	// The backend's pins apply to the frontend-pinned body, afresh on each
	// attempt: a retry on another server gets that server's pins only.
	body, unpin, err := h.backendPinned(r, b.cfg.pinsFor(kind, vocabOf(r.URL.Path)), body)
	defer unpin()
	if err != nil {
		if errors.Is(err, errBodyMemory) {
			_ = h.failBodyMemory(w, api)
		} else if r.Context().Err() == nil {
			_ = h.fail(w, api, http.StatusBadRequest, err.Error())
		}
		return attemptResult{done: true}
	}
	out := h.outboundRequest(ctx, r, b, body)

	// A stream must show its headers within first_byte_timeout; a
	// non-streaming answer, whose headers come only with the whole answer,
	// gets response_timeout for all of it (the timer runs on through the
	// body).
	streams := requestStreams(api, r.URL.Path, body)
	limit, limitErr := time.Duration(h.FirstByteTimeout), errFirstByteTimeout
	if !streams {
		limit, limitErr = time.Duration(h.ResponseTimeout), errResponseTimeout
	}
	timer := time.AfterFunc(limit, func() { cancel(limitErr) })
	defer timer.Stop()
	var spare *spareRace
	if j.spareOn == b.srv || j.measureOn == b.srv {
		// Sent beside the server's measuring request: moved if another
		// server outruns it before its answer begins; the measuring
		// request itself only once it waits behind a spare (spare.go).
		spare = newSpareRace()
		go spare.watch(ctx, cancel, h, b, j, j.spareAmong, j.measureOn == b.srv)
	}
	res, err := h.roundTrip(b, out)
	if err == nil {
		b.srv.speed.noteAnswerBegan(time.Now()) // a measuring request may wait behind it (spare.go)
	}
	if spare != nil && !spare.answered() {
		if err == nil {
			res.Body.Close()
		}
		if r.Context().Err() != nil {
			return attemptResult{done: true} // the client left too
		}
		if ce := h.logger.Check(zap.DebugLevel, "spare request moved: another server answered sooner"); ce != nil {
			ce.Write(zap.String("frontend", h.Name), zap.String("backend", b.cfg.Name))
		}
		return attemptResult{moved: true}
	}
	if streams {
		timer.Stop()
	}
	if err == nil && ctx.Err() != nil {
		// Cancelled as the headers arrived (a timer, or the client left).
		res.Body.Close()
		err = context.Cause(ctx)
	}
	if err != nil {
		if r.Context().Err() != nil {
			return attemptResult{done: true} // client went away: not the backend's fault
		}
		b.srv.stats.requests.Add(1)
		b.srv.stats.errors.Add(1)
		switch cause := context.Cause(ctx); {
		case errors.Is(cause, errFirstByteTimeout):
			b.srv.recordFailure(errFirstByteTimeout.Error())
			h.logAttempt(b, "first byte timeout", errFirstByteTimeout)
			_ = h.fail(w, api, http.StatusGatewayTimeout, fmt.Sprintf("backend %s sent no response within %s (first_byte_timeout); the model may still be loading, retry later", b.cfg.Name, time.Duration(h.FirstByteTimeout)))
			return attemptResult{done: true}
		case errors.Is(cause, errResponseTimeout):
			// A long answer is not the server's failure: no charge.
			h.logAttempt(b, "response timeout", errResponseTimeout)
			_ = h.fail(w, api, http.StatusGatewayTimeout, fmt.Sprintf("backend %s did not finish the answer within %s (response_timeout); ask for less (num_predict, max_tokens), stream it, or raise response_timeout", b.cfg.Name, time.Duration(h.ResponseTimeout)))
			return attemptResult{done: true}
		}
		err = redactURLError(err)
		b.srv.recordFailure(err.Error())
		h.logAttempt(b, "backend unreachable", err)
		// The client reads the cause: in words, no internal address.
		return attemptResult{cause: fmt.Sprintf("backend %s: %s", b.cfg.Name, failureInWords(err))}
	}

	info.ttfb = time.Since(started)
	metrics.firstByte.WithLabelValues(h.Name, b.cfg.Name, model).Observe(info.ttfb.Seconds())
	b.srv.stats.requests.Add(1)
	b.srv.stats.observeTTFB(info.ttfb)
	if h.stats != nil {
		h.stats.observeTTFB(info.ttfb)
	}
	if res.StatusCode >= 500 {
		b.srv.stats.errors.Add(1)
	}
	if kind == kindCompletion || kind == kindEmbedding {
		// least_delay's error share (cost.go): a server answering errors
		// at once must not look free and fast.
		b.srv.speed.noteAnswer(res.StatusCode, time.Now())
	}
	switch {
	case b.failStatus(res.StatusCode):
		b.srv.recordFailure(fmt.Sprintf("status %d", res.StatusCode))
	case res.StatusCode == http.StatusServiceUnavailable:
		// Ollama's "server busy": back-pressure, not a fault. The server
		// sits out a moment; the breaker does not count it.
		b.srv.backOff(busyBackoff)
	default:
		b.srv.recordSuccess()
	}
	if !final {
		if retryable(res.StatusCode) {
			res.Body.Close()
			h.logAttempt(b, "retrying after backend status", fmt.Errorf("status %d", res.StatusCode))
			return attemptResult{cause: fmt.Sprintf("backend %s answered %d", b.cfg.Name, res.StatusCode)}
		}
		if res.StatusCode == http.StatusNotFound {
			retry, head := modelMissing(res)
			if retry {
				res.Body.Close()
				// Read its lists again rather than strike the model off:
				// the lists are what the server said, and a client can
				// provoke a "not found" (an odd spelling, a model only a
				// backend pin names), which must not make a real model
				// look absent. The request moves on to the next backend.
				b.srv.poke()
				h.logAttempt(b, "model missing on backend, retrying", nil)
				return attemptResult{cause: fmt.Sprintf("backend %s does not have the model", b.cfg.Name)}
			}
			res.Body = readCloser{io.MultiReader(bytes.NewReader(head), res.Body), res.Body}
		}
	}
	var tail tailKeeper
	if api == apiOpenAI && streams {
		tail.countSSE()
	}
	var loaded bool
	answered := func() {
		if res.StatusCode == http.StatusOK && model != "" {
			loaded = h.learnFromAnswer(b, j, kind, api, work, &tail, streams, info.ttfb, time.Since(started))
			if kind == kindCompletion {
				h.served.note(time.Since(j.arrived).Seconds(), time.Now())
			}
		}
		work.end()
		release()
	}
	end := h.stream(w, r, res, b, ctx, cancel, release, answered, &tail)
	if end == endComplete && res.StatusCode == http.StatusOK && model != "" {
		info.inputTokens, info.outputTokens = h.recordFinalCounts(b, model, &tail, loaded)
	}
	return attemptResult{done: true, abort: end == endAbort}
}
