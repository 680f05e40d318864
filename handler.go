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

// learnFromAnswer teaches the cost model what a complete answer showed, as
// soon as the backend has sent it: the model is resident there, and a
// completion that generated tokens measures the server's speed (/api/show,
// a load-only chat with no messages and no eval_count, and embeddings take
// a fraction of its time). It reports whether the answer loaded the model.
func (h *Handler) learnFromAnswer(b *backend, j *job, kind routeKind, api apiFormat, work *task, tail *tailKeeper, streams bool, ttfb, elapsed time.Duration) (loaded bool) {
	if kind != kindCompletion && kind != kindEmbedding {
		return false
	}
	if work.sentSinceEviction() {
		// It just answered: the model is in memory there, unless a load
		// sent after it evicted it (its answer came before the load's).
		b.srv.markLoaded(j.model)
	}
	if kind != kindCompletion || (api != apiOpenAI && tail.number("eval_count") <= 0) {
		return false
	}
	loaded, evicted := work.learn(timingsFrom(tail, api, streams, ttfb, elapsed), time.Now())
	if evicted {
		b.srv.noticeEviction(j.model, time.Now())
	}
	if loaded || evicted {
		// The belief of what is resident there was wrong, or a load
		// changed it: read /api/ps again, in the background, so what it
		// holds and its room are known, not guessed (placement.go).
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
