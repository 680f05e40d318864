package ollamaflow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// rootBody is what Ollama answers on /, which clients use as a liveness check.
const rootBody = "Ollama is running"

// ServeHTTP classifies the request, gates it, reads and checks its body,
// and proxies it to a backend.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if h.serveExplorer(w, r) {
		return nil // a page, not an API request: not counted as one
	}
	sw := &statusWriter{ResponseWriter: w}
	info := requestInfo{inputTokens: -1, outputTokens: -1}
	if h.stats != nil {
		h.stats.inFlight.Add(1)
		defer h.stats.inFlight.Add(-1)
	}
	// Deferred: a tenant's max_parallel place must be given back even if
	// serving panics.
	defer h.finishTenant(sw, &info)
	err := h.serve(sw, r, &info)
	h.countRequest(sw, info.kind, info.model)
	h.annotateSpan(r, sw.status, &info)
	if errors.Is(err, errAbortResponse) {
		// As reverse_proxy does: net/http resets the HTTP/2 stream or
		// closes the HTTP/1 connection before the body's end, so the client
		// sees an error instead of a truncated answer that looks whole.
		panic(http.ErrAbortHandler)
	}
	return err
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request, info *requestInfo) error {
	api := apiOf(r.URL.Path)
	rt, known, allowed := classify(r.Method, r.URL.Path)
	info.kind, info.api = rt.kind, api
	if h.handleCORS(w, r, api) {
		return nil // a preflight answered, or an origin refused (cors.go)
	}
	if !known {
		return h.fail(w, api, http.StatusNotFound, fmt.Sprintf("unknown path %s: this endpoint serves the Ollama API (/api/*) and the OpenAI-compatible API (/v1/*)", r.URL.Path))
	}
	if !allowed {
		w.Header().Set("Allow", rt.methods)
		return h.fail(w, api, http.StatusMethodNotAllowed, fmt.Sprintf("method %s is not allowed on %s; use %s", r.Method, r.URL.Path, rt.methods))
	}
	// The tenant, found once and before the body is read: 401 without
	// one, 429 over its limits (tenants.go, tenantusage.go).
	var tenant *Tenant
	if h.Tenants != nil {
		var ok bool
		if tenant, ok = h.admitTenant(w, r, api, info); !ok {
			return nil
		}
		r = r.WithContext(context.WithValue(r.Context(), tenantKey{}, tenant))
		// Its queued requests are scheduled by its share and priority.
		r = withQueueClass(r, queueClass{name: tenant.Name, share: tenant.share, priority: tenant.Priority})
	}

	switch rt.kind {
	case kindRoot:
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Content-Length", strconv.Itoa(len(rootBody)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = io.WriteString(w, rootBody)
		}
		return nil
	case kindManagement:
		if !h.AllowModelManagement {
			return h.fail(w, api, http.StatusForbidden, "model management is disabled on this frontend; set allow_model_management in its ollamaflow block to enable pull, delete, copy, create, push and blob uploads")
		}
	case kindCompletion:
		if !h.allowCompl {
			return h.fail(w, api, http.StatusForbidden, "completion requests are not allowed on this frontend")
		}
		if !tenant.allows(rt.kind) {
			return h.rejectTenant(w, api, info, rejectRequestType, fmt.Sprintf("completion requests are not allowed for tenant %q", tenant.Name))
		}
	case kindEmbedding:
		if !h.allowEmbed {
			return h.fail(w, api, http.StatusForbidden, "embedding requests are not allowed on this frontend")
		}
		if !tenant.allows(rt.kind) {
			return h.rejectTenant(w, api, info, rejectRequestType, fmt.Sprintf("embedding requests are not allowed for tenant %q", tenant.Name))
		}
	}

	// Admission: everything that does not need the body is decided before
	// it is read, so a request that cannot be served costs no memory.
	labels := h.requestLabels(r)
	if tenant != nil && len(tenant.labels) > 0 {
		labels = normalizeLabels(append(append([]string(nil), labels...), tenant.labels...))
	}
	cands, why := h.candidates(rt.kind, labels)
	if why != nil {
		w.Header().Set("Retry-After", "5")
		return h.fail(w, api, http.StatusServiceUnavailable, why.msg)
	}
	if err := h.admitQueue(r, rt.kind, cands); err != nil {
		return h.failQueue(w, api, err)
	}

	// Blob uploads stream through untouched: they can be gigabytes.
	isBlob := strings.HasPrefix(r.URL.Path, "/api/blobs/")
	var body []byte
	validated := false
	if !isBlob && (r.Method == http.MethodPost || r.Method == http.MethodDelete) {
		lease := h.newBodyLease()
		defer lease.close()
		r = r.WithContext(context.WithValue(r.Context(), bodyLeaseKey{}, lease))
		var status int
		var err error
		body, status, err = h.readBody(r, lease)
		if err != nil {
			switch {
			case errors.Is(err, errBodyMemory):
				return h.failBodyMemory(w, api)
			case r.Context().Err() != nil:
				return nil // the client left while waiting for memory
			}
			return h.fail(w, api, status, err.Error())
		}
		// The tenant's pins, then the frontend's (which win) go in before
		// routing, so a pinned model routes.
		v := vocabOf(r.URL.Path)
		tp, p := tenant.pinsFor(rt.kind, v), h.pinsFor(rt.kind, v)
		for _, pin := range []*pins{tp, p} {
			if body, err = h.frontendPinned(r, lease, pin, body); err != nil {
				if errors.Is(err, errBodyMemory) {
					return h.failBodyMemory(w, api)
				}
				return h.fail(w, api, http.StatusBadRequest, err.Error())
			}
		}
		validated = !p.empty() || !tp.empty()
	}
	read := body
	model, body, err := requestModel(rt.model, api, r.URL.Path, body, validated)
	if err != nil {
		return h.fail(w, api, http.StatusBadRequest, err.Error())
	}
	if lease := leaseFrom(r.Context()); lease != nil && lease.replaced(r.Context(), read, body) != nil {
		return h.failBodyMemory(w, api) // or the client left: then nobody reads it
	}
	info.model = model
	if model != "" {
		setPlaceholder(r, placeholderModel, model)
	}
	if model != "" && h.models != nil {
		if _, ok := h.models[model]; !ok {
			return h.fail(w, api, http.StatusForbidden, fmt.Sprintf("model %q is not allowed on this frontend", model))
		}
	}
	if model != "" && !tenant.modelAllowed(model) {
		return h.rejectTenant(w, api, info, rejectModel, fmt.Sprintf("model %q is not allowed for tenant %q", model, tenant.Name))
	}

	switch {
	case r.URL.Path == "/api/tags":
		return h.serveTags(w, r, cands)
	case r.URL.Path == "/v1/models":
		return h.serveModelList(w, r, cands)
	case r.URL.Path == "/api/ps":
		return h.servePS(w, r, cands)
	case isBlob:
		return h.serveBlob(w, r, api, cands)
	case rt.kind == kindManagement && r.URL.Path != "/api/push":
		return h.fanOut(w, r, api, body, cands)
	}
	if model != "" {
		var status int
		var msg string
		cands, status, msg = h.routeModel(r.Context(), cands, model)
		if status != 0 {
			if status == http.StatusServiceUnavailable {
				w.Header().Set("Retry-After", "10")
				return h.fail(w, api, status, msg)
			}
			return h.failCode(w, api, status, "model_not_found", msg)
		}
	}
	if rt.kind == kindModelRead || rt.kind == kindVersion {
		return h.serveMetadata(w, r, api, body, cands) // never waits for an inference slot
	}
	return h.proxy(w, r, api, body, cands, model, rt.kind, info)
}

// requestModel finds the model a request is about, normalised. A body it
// is read from is read as Ollama reads it (readFields) and comes back
// canonical: a decided field spelled more than once is spelled once, with
// the decided value. validated says body is known to be valid JSON.
func requestModel(from modelFrom, api apiFormat, path string, body []byte, validated bool) (string, []byte, error) {
	switch from {
	case modelNone:
		return "", body, nil
	case modelInPath:
		return normalizeModel(path[strings.LastIndexByte(path, '/')+1:]), body, nil
	}
	f, err := readFields(body, from, api, validated)
	if err != nil {
		return "", nil, err
	}
	if f.needsCanonical(from) {
		if body, err = canonicalBody(body, &f, from); err != nil {
			return "", nil, err
		}
	}
	return normalizeModel(f.model), body, nil
}

func isJSONObject(body []byte) bool {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	// gjson's validator recurses once per level without a limit: a body of
	// millions of '[' would overflow the stack and take Caddy down. Count
	// the depth first, as encoding/json (and so Ollama) limits it anyway.
	return len(trimmed) > 0 && trimmed[0] == '{' && nestingWithin(trimmed, maxJSONDepth) && gjson.ValidBytes(trimmed)
}

// nestingWithin reports whether the brackets of a JSON text nest at most
// limit deep, ignoring those inside strings. It does not validate.
func nestingWithin(data []byte, limit int) bool {
	depth, inString, escaped := 0, false, false
	for _, c := range data {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			if depth++; depth > limit {
				return false
			}
		case c == '}' || c == ']':
			depth--
		}
	}
	return true
}

// requestLabels is the frontend's labels plus any the client adds in the
// label header; a backend must carry all of them.
func (h *Handler) requestLabels(r *http.Request) []string {
	vals := r.Header.Values(h.labelHeader)
	if len(vals) == 0 {
		return h.labels
	}
	labels := append([]string(nil), h.labels...)
	for _, v := range vals {
		labels = append(labels, strings.Split(v, ",")...)
	}
	return normalizeLabels(labels)
}

// attemptResult says what an attempt did: wrote the response (done), or
// left the client untouched so another backend may be tried.
type attemptResult struct {
	done  bool
	abort bool   // the body was cut where no error can be written: abort the response
	cause string // what went wrong, for the final error message
}

// proxy runs the attempt loop: each attempt takes a slot on a different
// backend; failures before the first response byte move on to the next.
func (h *Handler) proxy(w http.ResponseWriter, r *http.Request, api apiFormat, body []byte, cands []*backend, model string, kind routeKind, info *requestInfo) error {
	tried := make([]*backend, 0, h.retries+1)
	j := newJob(model, api, body)
	j.answers = &answerLengths
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
		if attempt == 0 {
			b, info.sticky, info.route, convID = h.acquireFirst(r, avail, conv, j)
			if info.sticky != "" {
				w.Header().Set("X-OllamaFlow-Sticky", info.sticky)
			}
			w.Header().Set("X-OllamaFlow-Route", info.route)
		} else {
			b = h.acquire(avail, j)
		}
		if b == nil {
			avail = h.exactCandidates(avail, j) // what the queue waits on
			if len(avail) == 0 {
				break // every server left was tried
			}
			var err error
			var waited time.Duration
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
	res, err := h.roundTrip(b, out)
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
	var loaded bool
	answered := func() {
		if res.StatusCode == http.StatusOK && model != "" {
			loaded = h.learnFromAnswer(b, j, kind, api, work, &tail, streams, info.ttfb, time.Since(started))
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

// learnFromAnswer teaches the cost model what a complete answer showed, as
// soon as the backend has sent it: the model is resident there, and a
// completion that generated tokens measures the server's speed (/api/show,
// a load-only chat with no messages and no eval_count, and embeddings take
// a fraction of its time). It reports whether the answer loaded the model.
func (h *Handler) learnFromAnswer(b *backend, j *job, kind routeKind, api apiFormat, work *task, tail *tailKeeper, streams bool, ttfb, elapsed time.Duration) (loaded bool) {
	if kind != kindCompletion && kind != kindEmbedding {
		return false
	}
	b.srv.markLoaded(j.model) // it just answered: the model is in memory there
	if kind != kindCompletion || (api != apiOpenAI && tail.number("eval_count") <= 0) {
		return false
	}
	loaded, evicted := work.learn(timingsFrom(tail, api, streams, ttfb, elapsed), time.Now())
	if evicted {
		b.srv.noticeEviction(j.model, time.Now())
		// The belief of what is resident there was wrong: read /api/ps
		// again, in the background (placement.go).
		b.srv.startRefresh(time.Now(), false)
	}
	return loaded
}

type readCloser struct {
	io.Reader
	io.Closer
}

// modelMissing peeks at a 404 body to tell "model not found" (worth another
// backend) from any other 404. It returns what it read so the body can be
// passed on intact.
func modelMissing(res *http.Response) (bool, []byte) {
	head, _ := io.ReadAll(io.LimitReader(res.Body, 4<<10))
	msg := gjson.GetBytes(head, "error")
	if msg.Type == gjson.JSON {
		msg = msg.Get("message")
	}
	s := strings.ToLower(msg.String())
	return strings.Contains(s, "model") && strings.Contains(s, "not found"), head
}

// outboundRequest builds the request to b: the client's method, path,
// query and headers (minus hop-by-hop ones and its Authorization), the
// backend's credentials, headers and query, and X-Forwarded-*.
func (h *Handler) outboundRequest(ctx context.Context, r *http.Request, b *backend, body []byte) *http.Request {
	u := *b.base
	u.Path = b.base.Path + r.URL.Path
	u.RawPath = ""
	switch {
	case r.URL.RawQuery != "" && b.query != "":
		u.RawQuery = r.URL.RawQuery + "&" + b.query
	case b.query != "":
		u.RawQuery = b.query
	default:
		u.RawQuery = r.URL.RawQuery
	}

	hdr := make(http.Header, len(r.Header)+4)
	for k, v := range r.Header {
		hdr[k] = v
	}
	stripHopByHop(hdr)
	hdr.Del("Authorization")
	hdr.Del(h.labelHeader)
	hdr.Del("Origin") // the frontend decides CORS (cors.go); a backend's own list must not
	for k, v := range b.header {
		hdr[k] = v
	}
	setForwarded(hdr, r)

	out := &http.Request{
		Method:     r.Method,
		URL:        &u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     hdr,
		Host:       u.Host,
	}
	if body != nil {
		out.ContentLength = int64(len(body))
		out.Body = io.NopCloser(bytes.NewReader(body))
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		if out.ContentLength == 0 {
			out.Body = http.NoBody
		}
	}
	return out.WithContext(ctx)
}

// Hop-by-hop headers (RFC 9110 §7.6.1) and the de-facto ones proxies drop.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

func stripHopByHop(hdr http.Header) {
	for _, v := range hdr["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = textproto.TrimString(f); f != "" {
				hdr.Del(f)
			}
		}
	}
	for _, k := range hopHeaders {
		delete(hdr, k)
	}
}

// setForwarded sets X-Forwarded-For/Proto/Host, keeping incoming values only
// when Caddy trusts the peer (trusted_proxies).
func setForwarded(hdr http.Header, r *http.Request) {
	trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool)
	ip, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		ip = r.RemoteAddr
	}
	if prior := hdr.Values("X-Forwarded-For"); trusted && len(prior) > 0 {
		hdr.Set("X-Forwarded-For", strings.Join(prior, ", ")+", "+ip)
	} else {
		hdr.Set("X-Forwarded-For", ip)
	}
	if !trusted || hdr.Get("X-Forwarded-Proto") == "" {
		proto := "http"
		if r.TLS != nil {
			proto = "https"
		}
		hdr.Set("X-Forwarded-Proto", proto)
	}
	if !trusted || hdr.Get("X-Forwarded-Host") == "" {
		hdr.Set("X-Forwarded-Host", r.Host)
	}
}

func (h *Handler) logAttempt(b *backend, msg string, err error) {
	if ce := h.logger.Check(zap.WarnLevel, msg); ce != nil {
		ce.Write(zap.String("frontend", h.Name), zap.String("backend", b.cfg.Name), zap.Error(err))
	}
}

// roundTrip sends out to b over its server's pooled connections: the lean
// client's for an http server (backendconn.go), the Transport's for https
// (or the handler's own transport, which tests set).
func (h *Handler) roundTrip(b *backend, out *http.Request) (*http.Response, error) {
	if h.transport != nil {
		return h.transport.RoundTrip(out)
	}
	if b.srv.lean != nil && out.URL.Scheme == "http" {
		return b.srv.lean.roundTripNoting(out, func(err error) {
			h.logAttempt(b, "request sent again on a fresh connection (the pooled one broke before any answer)", redactURLError(err))
		})
	}
	return b.srv.transport.RoundTrip(out)
}

// newTransport is the HTTP client side to a server: no environment proxy,
// bytes passed through as sent (no transparent decompression), and enough
// idle connections for a busy frontend. It belongs to the pooled server,
// so its connections survive reloads; the dial timeout is the one the
// latest config gave.
func newTransport(dialTimeout func() time.Duration) *http.Transport {
	return &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: dialTimeout(), KeepAlive: 30 * time.Second}
			return d.DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
		// A connection holds both buffers for as long as it lives, an
		// open stream's included. A request's headers fit in 1 KiB (a
		// larger body is written past the buffer). The read buffer stays
		// at Go's 4 KiB: a token's chunk is read through it, and when
		// tokens pile up (a burst, or a proxy short of CPU) one read takes
		// them all; at 1 KiB, bench/run.sh's streaming chats took three
		// times the read calls of reverse_proxy.
		ReadBufferSize:  4 << 10,
		WriteBufferSize: 1 << 10,
	}
}
