package ollamaflow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Streaming: copying a backend's answer to the client, and ending it
// honestly when the backend fails after the first byte.
//
// Three clocks run while an answer is copied, each blaming the right party:
//   - stream_idle_timeout measures only the wait for the backend (the time
//     blocked reading its body); a stall is the backend's failure;
//   - client_write_timeout bounds each write to the client; a client that
//     stops reading is cut off, and nobody else is blamed;
//   - response_timeout (non-streaming requests only) bounds the whole
//     answer, started in attempt; a long answer is nobody's failure.

// Causes of a cancelled attempt, read back with context.Cause.
var (
	errFirstByteTimeout = errors.New("no response headers within first_byte_timeout")
	errResponseTimeout  = errors.New("no complete answer within response_timeout")
	errStreamIdle       = errors.New("stream idle beyond stream_idle_timeout")
	errClientStalled    = errors.New("client stopped reading beyond client_write_timeout")
)

// errAbortResponse tells ServeHTTP to abort the response (reset the HTTP/2
// stream, close the HTTP/1 connection before the body's end) rather than
// let a truncated body look complete.
var errAbortResponse = errors.New("response aborted mid-body")

// streamEnd says how copying an answer ended.
type streamEnd int

const (
	endComplete   streamEnd = iota // the whole body went through
	endClientGone                  // the client left or stopped reading: nobody to tell
	endReported                    // the backend failed; the stream ends with an error in the API's format
	endAbort                       // the backend failed in a body that cannot carry an error: abort it
)

// bodyFormat is how a response body is framed, which decides how a failure
// after the first byte can be reported in it.
type bodyFormat int

const (
	bodyOther  bodyFormat = iota // one JSON document (or anything else): cannot carry a late error
	bodyNDJSON                   // Ollama's streams: a last {"error":"…"} line
	bodySSE                      // OpenAI's streams: a data: {"error":{…}} event
)

func formatOf(contentType string) bodyFormat {
	mt, _, _ := mime.ParseMediaType(contentType)
	switch mt {
	case "application/x-ndjson":
		return bodyNDJSON
	case "text/event-stream":
		return bodySSE
	}
	return bodyOther
}

// requestStreams reports whether the backend will answer body with a
// stream (NDJSON or SSE) rather than one JSON document, which decides
// whether first_byte_timeout or response_timeout bounds the wait. Ollama's
// native completions and model transfers (pull, push, create) stream unless
// "stream" is false; the OpenAI-compatible API streams only when "stream"
// is true; nothing else streams. The field is read as Ollama reads it
// (readFields: folded keys, escapes, the last duplicate, null resetting
// Ollama's *bool but not the OpenAI layer's bool); a body whose stream is
// not a boolean gets the default, as Ollama refuses it anyway.
func requestStreams(api apiFormat, path string, body []byte) bool {
	switch path {
	case "/api/generate", "/api/chat", "/api/pull", "/api/push", "/api/create",
		"/v1/chat/completions", "/v1/completions":
	default:
		return false
	}
	// The handler has validated the body; an invalid one only gets the
	// default here.
	f, err := readFields(body, modelNone, api, true)
	if err != nil {
		return api == apiOllama
	}
	return f.streams(api)
}

// Copy buffers. An open stream spends nearly all its life waiting for its
// next token, for minutes with thousands of streams open, so it waits
// holding no buffer: a zero-length read blocks until the backend's next
// bytes have arrived (they land in the backend connection's own read
// buffer), and only then is a pooled buffer taken to copy them; it goes
// back as soon as a read leaves nothing more waiting. A token is tens of
// bytes: answers are copied through a small buffer, and one read that
// fills it (an embedding, a long answer sent as one document) moves the
// rest of that answer to large ones, so bulk copies keep their few large
// writes.
//
// A body that cannot wait without a buffer (a zero-length read of a
// Content-Length body returns at once) just waits in the buffered read
// that follows, holding the buffer as before: nothing spins.
const (
	smallCopyBuffer = 4 << 10
	largeCopyBuffer = 32 << 10
)

var (
	smallBufPool = sync.Pool{New: func() any { b := make([]byte, smallCopyBuffer); return &b }}
	largeBufPool = sync.Pool{New: func() any { b := make([]byte, largeCopyBuffer); return &b }}
	// copyBuffersHeld counts the pooled buffers answers hold now; the
	// tests check that idle streams hold none.
	copyBuffersHeld atomic.Int64
)

// copyBuffer is one answer's buffer: none while it waits, small until a
// read fills one, large after.
type copyBuffer struct {
	p     *[]byte
	large bool
}

// take returns the buffer for the next read, getting one from its pool
// if none is held.
func (c *copyBuffer) take() []byte {
	if c.p == nil {
		if c.large {
			c.p = largeBufPool.Get().(*[]byte)
		} else {
			c.p = smallBufPool.Get().(*[]byte)
		}
		copyBuffersHeld.Add(1)
	}
	return *c.p
}

// used notes a read of n bytes, once they have been written out: a read
// that filled the buffer keeps it (more is likely waiting), a full small
// one is swapped for a large one, and a read that left nothing waiting
// gives it back before the answer waits again.
func (c *copyBuffer) used(n int) {
	if n < len(*c.p) {
		c.release()
		return
	}
	if !c.large {
		c.release()
		c.large = true
		c.take()
	}
}

func (c *copyBuffer) held() bool { return c.p != nil }

func (c *copyBuffer) release() {
	if c.p == nil {
		return
	}
	if c.large {
		largeBufPool.Put(c.p)
	} else {
		smallBufPool.Put(c.p)
	}
	c.p = nil
	copyBuffersHeld.Add(-1)
}

// stream copies the backend's answer to the client byte for byte, flushing
// after every write so tokens arrive as they are generated. A backend that
// dies or stalls after the first byte ends the stream with an error in the
// API's format (a body that cannot carry one is aborted): the stream is
// never restarted, since the client already has part of it, and never
// ended so that a truncated answer looks complete. release frees the slot
// early when a client that stops reading cannot be cut off at once.
//
// answered runs once the backend has sent its whole answer, before the
// bytes that came with its end go to the client: a client that sends its
// next request as soon as it has read this answer (every chat client does)
// must find the server's slot free and this request's work ended. Freed
// after the last write, a non-streamed answer's slot was still held when
// the next request chose, every server of an exactly loaded pool looked
// full, and least_delay sent it to wait inside one.
func (h *Handler) stream(w http.ResponseWriter, r *http.Request, res *http.Response, b *backend, ctx context.Context, cancel context.CancelCauseFunc, release, answered func(), tail *tailKeeper) streamEnd {
	defer res.Body.Close()
	hdr := w.Header()
	stripHopByHop(res.Header)
	copyBackendHeaders(hdr, res.Header)
	hdr.Set("X-OllamaFlow-Backend", b.cfg.Name)

	cw := newClientWriter(w, time.Duration(h.ClientWriteTimeout), func() {
		cancel(errClientStalled)
		release()
	})
	defer cw.stop()
	if err := cw.writeHeader(res.StatusCode); err != nil {
		return h.clientFailed(b, cw, cancel)
	}

	// The idle timer runs only while waiting for the backend: armed before
	// each read, stopped as it returns, so a slow client is never mistaken
	// for a stalled backend.
	idle := time.Duration(h.StreamIdleTimeout)
	idleTimer := time.AfterFunc(idle, func() { cancel(errStreamIdle) })
	defer idleTimer.Stop()

	var cb copyBuffer
	defer cb.release()
	ended := false
	backendDone := func() {
		if !ended {
			ended = true
			tail.clientWait = cw.blocked // for the cost model: time the client held the stream back
			answered()
		}
	}
	for {
		var n int
		var rerr error
		idleTimer.Reset(idle)
		if !cb.held() {
			// Wait for the next bytes without a buffer (see Copy buffers).
			_, rerr = res.Body.Read(nil)
		}
		if rerr == nil {
			buf := cb.take()
			n, rerr = res.Body.Read(buf)
			if n > 0 {
				idleTimer.Stop()
				tail.keep(buf[:n])
				if rerr == io.EOF {
					backendDone()
				}
				if err := cw.write(buf[:n]); err != nil {
					return h.clientFailed(b, cw, cancel)
				}
			}
			cb.used(n)
		}
		idleTimer.Stop()
		if rerr == io.EOF {
			backendDone()
			return endComplete
		}
		if rerr != nil {
			if r.Context().Err() != nil || cw.stalled.Load() {
				return endClientGone // the client left; the backend did nothing wrong
			}
			return h.backendFailed(b, cw, res, ctx, rerr)
		}
	}
}

// backendFailed ends a response whose backend failed after the first byte:
// it charges the backend when the failure is its own, logs and counts the
// cut once, and tells the client in the body's format.
func (h *Handler) backendFailed(b *backend, cw *clientWriter, res *http.Response, ctx context.Context, rerr error) streamEnd {
	var reason, msg, code string
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errStreamIdle):
		reason, code = "stream_idle_timeout", "stream_stalled"
		msg = fmt.Sprintf("backend %s sent nothing for %s (stream_idle_timeout); the answer is incomplete, retry the request", b.cfg.Name, time.Duration(h.StreamIdleTimeout))
		b.srv.recordFailure(errStreamIdle.Error())
		h.logAttempt(b, "stream stalled, ending it with an error", errStreamIdle)
	case errors.Is(cause, errResponseTimeout):
		// A long answer is not a failure of the server: no charge.
		reason, code = "response_timeout", "timeout"
		msg = fmt.Sprintf("backend %s did not finish the answer within %s (response_timeout); the answer is incomplete", b.cfg.Name, time.Duration(h.ResponseTimeout))
		h.logAttempt(b, "answer cut at response_timeout", errResponseTimeout)
	default:
		reason, code = "backend_failed", "stream_broken"
		words := brokenInWords(rerr)
		msg = fmt.Sprintf("backend %s failed mid-answer: %s; the answer is incomplete, retry the request", b.cfg.Name, words)
		b.srv.recordFailure("stream broken: " + words)
		h.logAttempt(b, "stream broken, ending it with an error", redactURLError(rerr))
	}
	metrics.responsesCut.WithLabelValues(h.Name, b.cfg.Name, reason).Inc()
	b.srv.stats.errors.Add(1)

	format := formatOf(res.Header.Get("Content-Type"))
	if format == bodyOther {
		// One JSON document cut short: nothing can be appended that a
		// client would read as an error, and a clean end would pass the
		// truncated body off as whole. Send what arrived, then abort.
		cw.flush()
		return endAbort
	}
	_ = cw.endWithError(format, msg, code)
	return endReported
}

// brokenInWords describes a broken backend connection without the
// addresses its error carries (they are internal).
func brokenInWords(err error) string {
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "the connection closed before the answer was complete"
	case errors.Is(err, syscall.ECONNRESET):
		return "the connection was reset"
	case errors.Is(err, syscall.EPIPE):
		return "the connection broke"
	}
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		return "reading from it timed out"
	}
	return "reading its answer failed"
}

// clientFailed handles a write to the client that failed: the client left,
// or stopped reading for client_write_timeout. The backend request is
// cancelled (freeing its slot when attempt returns) and nobody is charged.
func (h *Handler) clientFailed(b *backend, cw *clientWriter, cancel context.CancelCauseFunc) streamEnd {
	if cw.stalled.Load() {
		cancel(errClientStalled)
		metrics.responsesCut.WithLabelValues(h.Name, b.cfg.Name, "client_write_timeout").Inc()
		if ce := h.logger.Check(zap.InfoLevel, "client stopped reading, cutting it off"); ce != nil {
			ce.Write(zap.String("frontend", h.Name), zap.String("backend", b.cfg.Name), zap.Duration("client_write_timeout", cw.timeout))
		}
	}
	return endClientGone
}

// clientWriter writes a response under client_write_timeout: each write
// and flush gets a deadline (http.ResponseController.SetWriteDeadline). A
// writer without deadlines gets a watchdog instead, which cancels the
// backend request and frees the slot when a write blocks too long; the
// blocked write itself then ends when the server's own timeouts close the
// connection.
type clientWriter struct {
	w        http.ResponseWriter
	rc       *http.ResponseController
	timeout  time.Duration
	onStall  func() // the watchdog's action
	noDL     bool   // SetWriteDeadline is not supported
	watchdog *time.Timer
	stalled  atomic.Bool
	written  int64
	last     [2]byte       // the last two bytes written, to start an error on a fresh line
	blocked  time.Duration // time spent in writes of the body
}

func newClientWriter(w http.ResponseWriter, timeout time.Duration, onStall func()) *clientWriter {
	return &clientWriter{w: w, rc: http.NewResponseController(w), timeout: timeout, onStall: onStall}
}

func (c *clientWriter) arm() {
	if !c.noDL {
		err := c.rc.SetWriteDeadline(time.Now().Add(c.timeout))
		if err == nil {
			return
		}
		c.noDL = true
	}
	if c.watchdog == nil {
		c.watchdog = time.AfterFunc(c.timeout, func() {
			c.stalled.Store(true)
			c.onStall()
		})
		return
	}
	c.watchdog.Reset(c.timeout)
}

// disarm stops the watchdog and notes a write that failed at its deadline.
func (c *clientWriter) disarm(started time.Time, err error) error {
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
	if err != nil && time.Since(started) >= c.timeout {
		c.stalled.Store(true)
	}
	return err
}

func (c *clientWriter) writeHeader(status int) error {
	started := time.Now()
	c.arm()
	c.w.WriteHeader(status)
	return c.disarm(started, c.rc.Flush())
}

func (c *clientWriter) write(p []byte) error {
	started := time.Now()
	c.arm()
	_, err := c.w.Write(p)
	if err == nil {
		err = c.rc.Flush()
	}
	if len(p) >= 2 {
		c.last = [2]byte{p[len(p)-2], p[len(p)-1]}
	} else if len(p) == 1 {
		c.last = [2]byte{c.last[1], p[0]}
	}
	c.written += int64(len(p))
	c.blocked += time.Since(started)
	return c.disarm(started, err)
}

func (c *clientWriter) flush() {
	started := time.Now()
	c.arm()
	_ = c.disarm(started, c.rc.Flush())
}

func (c *clientWriter) stop() {
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
}

// endWithError appends an error to a stream, on a line (or, for SSE, in
// an event) of its own: the cut may have come mid-line. It never adds a
// done marker or [DONE].
func (c *clientWriter) endWithError(format bodyFormat, msg, code string) error {
	var out []byte
	switch format {
	case bodyNDJSON:
		if c.written > 0 && c.last[1] != '\n' {
			out = append(out, '\n')
		}
		out = append(append(out, errorBody(apiOllama, msg, "", nil)...), '\n')
	case bodySSE:
		// An event ends at a blank line; close a cut one first.
		switch {
		case c.written == 0:
		case c.last[1] != '\n':
			out = append(out, "\n\n"...)
		case c.last[0] != '\n':
			out = append(out, '\n')
		}
		event := errorBody(apiOpenAI, msg, "server_error", code)
		out = append(append(append(out, "data: "...), event...), "\n\n"...)
	}
	return c.write(out)
}

// tailKeeper keeps the last bytes of a response body, where Ollama puts
// its final counts (load_duration, eval_count …) and OpenAI its usage, so
// they can be read without buffering the stream.
type tailKeeper struct {
	buf [2048]byte
	n   int
	// clientWait is how long writes to the client blocked over the whole
	// answer (set when it completes).
	clientWait time.Duration
	// sse: an OpenAI stream, whose events are counted (events): without
	// stream_options.include_usage it reports no token counts, and Ollama
	// sends one event per generated token (countSSE).
	sse    bool
	events int
	carry  [len(sseEvent) - 1]byte // the last bytes read, for an event marker split between reads
	carryN int
}

// sseEvent begins every event of a stream after the first; the first is
// counted by starting the carry with a newline. It cannot occur inside an
// event's JSON, where a newline is escaped.
const sseEvent = "\ndata:"

// countSSE makes keep count the events of an OpenAI stream.
func (t *tailKeeper) countSSE() {
	t.sse = true
	t.carry[0], t.carryN = '\n', 1
}

// sseTokens is the tokens an OpenAI stream without usage generated, one
// per event but its final one (finish_reason) and [DONE]; -1 when unknown.
func (t *tailKeeper) sseTokens() int64 {
	if !t.sse || t.events <= 2 {
		return -1
	}
	return int64(t.events - 2)
}

func (t *tailKeeper) countEvents(p []byte) {
	if len(p) == 0 {
		return
	}
	// A marker that began in the last read and ends in this one: it
	// starts in the carry, which is shorter than the marker.
	var w [2 * len(sseEvent)]byte
	n := copy(w[:], t.carry[:t.carryN])
	n += copy(w[n:], p[:min(len(p), len(sseEvent)-1)])
	t.events += bytes.Count(w[:n], []byte(sseEvent)) + bytes.Count(p, []byte(sseEvent))
	if len(p) >= len(t.carry) {
		t.carryN = copy(t.carry[:], p[len(p)-len(t.carry):])
		return
	}
	keep := min(t.carryN, len(t.carry)-len(p))
	copy(w[:], t.carry[t.carryN-keep:t.carryN])
	copy(w[keep:], p)
	t.carryN = copy(t.carry[:], w[:keep+len(p)])
}

func (t *tailKeeper) keep(p []byte) {
	if t.sse {
		t.countEvents(p)
	}
	if len(p) >= len(t.buf) {
		t.n = copy(t.buf[:], p[len(p)-len(t.buf):])
		return
	}
	if over := t.n + len(p) - len(t.buf); over > 0 {
		copy(t.buf[:], t.buf[over:t.n])
		t.n -= over
	}
	t.n += copy(t.buf[t.n:], p)
}

// number is the last integer value of "key" in the tail, or -1.
func (t *tailKeeper) number(key string) int64 {
	data := t.buf[:t.n]
	i := bytes.LastIndex(data, []byte(`"`+key+`":`))
	if i < 0 {
		return -1
	}
	data = bytes.TrimLeft(data[i+len(key)+3:], " ")
	var v int64
	digits := 0
	for _, c := range data {
		if c < '0' || c > '9' {
			break
		}
		v = v*10 + int64(c-'0')
		digits++
	}
	if digits == 0 {
		return -1
	}
	return v
}
