package ollamaflow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// readSizes is a body that hands out its chunks one per Read (as a
// backend's tokens arrive) and records the buffer each Read was given.
type readSizes struct {
	chunks [][]byte
	sizes  []int
}

func (r *readSizes) Read(p []byte) (int, error) {
	r.sizes = append(r.sizes, len(p))
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	if r.chunks[0] = r.chunks[0][n:]; len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func streamThrough(t *testing.T, body *readSizes, contentType string) []byte {
	t.Helper()
	h := &Handler{ClientWriteTimeout: caddy.Duration(time.Minute), StreamIdleTimeout: caddy.Duration(time.Minute)}
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/api/chat", nil)
	res := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {contentType}}, Body: io.NopCloser(body)}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	end := h.stream(rec, req, res, testBackend("a", nil), ctx, cancel, func() {}, func() {}, &tailKeeper{})
	require.Equal(t, endComplete, end)
	return rec.Body.Bytes()
}

// A token stream waits for each token without a buffer (a zero-length
// read) and copies it through the small buffer, however long it runs.
func TestStreamWaitsWithoutABuffer(t *testing.T) {
	var want bytes.Buffer
	body := &readSizes{}
	for i := range 500 {
		line := []byte(fmt.Sprintf(`{"model":"tiny-llama","message":{"role":"assistant","content":"token %d "},"done":false}`+"\n", i))
		body.chunks = append(body.chunks, line)
		want.Write(line)
	}
	got := streamThrough(t, body, "application/x-ndjson")
	assert.Equal(t, want.Bytes(), got, "copied byte for byte")
	require.NotEmpty(t, body.sizes)
	for i, n := range body.sizes {
		if i%2 == 0 {
			require.Zero(t, n, "read %d: each token is waited for without a buffer", i)
		} else {
			require.Equal(t, smallCopyBuffer, n, "read %d of a token stream", i)
		}
	}
	assert.Zero(t, copyBuffersHeld.Load(), "every buffer went back to its pool")
}

// A read that fills the small buffer moves the rest of the answer to the
// large one: a bulk answer is copied in large writes, with no wait between
// reads that fill their buffer.
func TestBulkAnswerMovesToTheLargeBuffer(t *testing.T) {
	doc := []byte(`{"embeddings":[[` + strings.Repeat("0.123456789,", 30000) + `0]]}`)
	body := &readSizes{chunks: [][]byte{append([]byte(nil), doc...)}}
	got := streamThrough(t, body, "application/json")
	assert.Equal(t, doc, got, "copied byte for byte")
	require.Greater(t, len(body.sizes), 3)
	assert.Equal(t, []int{0, smallCopyBuffer}, body.sizes[:2], "every answer starts waiting, then small")
	reads := 0
	for i, n := range body.sizes[2:] {
		if n != 0 {
			reads++
			assert.Equal(t, largeCopyBuffer, n, "read %d after the small buffer filled", i+2)
		}
	}
	assert.Less(t, reads, len(doc)/largeCopyBuffer+2, "one large read per large buffer")
	assert.Zero(t, copyBuffersHeld.Load(), "every buffer went back to its pool")
}

// gatedBody is a backend's body whose reads block until the test lets the
// next token through, reporting each read's buffer size and the pooled
// buffers held while it blocks.
type gatedBody struct {
	tokens  [][]byte
	next    chan struct{} // one per token after the first
	blocked chan [2]int64 // len(p), copyBuffersHeld when a read blocks
	pending []byte
}

func (g *gatedBody) Read(p []byte) (int, error) {
	if len(g.pending) == 0 {
		if len(g.tokens) == 0 {
			return 0, io.EOF
		}
		if g.next != nil {
			g.blocked <- [2]int64{int64(len(p)), copyBuffersHeld.Load()}
			<-g.next
		}
		g.next = make(chan struct{}) // the first token is there at once
		g.pending, g.tokens = g.tokens[0], g.tokens[1:]
		gateNext <- g.next
	}
	n := copy(p, g.pending)
	g.pending = g.pending[n:]
	return n, nil
}

var gateNext = make(chan chan struct{}, 1)

// The bound on an idle stream's memory: while it waits for its next token
// it holds no pooled copy buffer.
func TestIdleStreamHoldsNoCopyBuffer(t *testing.T) {
	body := &gatedBody{blocked: make(chan [2]int64)}
	for i := range 5 {
		body.tokens = append(body.tokens, []byte(fmt.Sprintf(`{"message":{"content":"t%d"},"done":false}`+"\n", i)))
	}
	h := &Handler{ClientWriteTimeout: caddy.Duration(time.Minute), StreamIdleTimeout: caddy.Duration(time.Minute)}
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/api/chat", nil)
	res := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/x-ndjson"}}, Body: io.NopCloser(body)}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	done := make(chan streamEnd, 1)
	go func() {
		done <- h.stream(rec, req, res, testBackend("a", nil), ctx, cancel, func() {}, func() {}, &tailKeeper{})
	}()
	next := <-gateNext
	for range 4 {
		waiting := <-body.blocked
		assert.Zero(t, waiting[0], "an idle stream waits with a zero-length read")
		assert.Zero(t, waiting[1], "an idle stream holds no pooled buffer")
		close(next)
		next = <-gateNext
	}
	require.Equal(t, endComplete, <-done)
	assert.Equal(t, 5, strings.Count(rec.Body.String(), "\n"), "every token copied")
	assert.Zero(t, copyBuffersHeld.Load())
}

// waitProbe passes a real response body through, checking each
// zero-length read: it must return only once the backend has sent the
// token it waits for (sent counts the tokens written).
type waitProbe struct {
	io.ReadCloser
	sent    *atomic.Int64
	entered chan struct{}
	waited  []int64 // per zero-length read that returned: tokens sent by then
	tokens  int64   // tokens the stream has had whole
	asked   int64   // tokens had when the stream last asked for more
}

func (w *waitProbe) Read(p []byte) (int, error) {
	if w.tokens > w.asked && w.tokens < 4 { // the stream asks for the next token
		w.asked = w.tokens
		w.entered <- struct{}{}
	}
	n, err := w.ReadCloser.Read(p)
	if len(p) == 0 && err == nil {
		w.waited = append(w.waited, w.sent.Load()-w.tokens)
	}
	if n > 0 {
		w.tokens++
	}
	return n, err
}

// The transport's chunked bodies let a stream wait without a buffer: a
// zero-length read returns only once the next token has arrived. (If it
// returned at once, the buffered read after it would do the waiting,
// holding a pooled buffer for the whole idle time.)
func TestChunkedBodyWaitsWithoutABuffer(t *testing.T) {
	var sent atomic.Int64
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		for i := range 4 {
			if i > 0 {
				<-release
			}
			sent.Add(1)
			fmt.Fprintf(w, `{"message":{"content":"t%d"},"done":false}`+"\n", i)
			w.(http.Flusher).Flush()
		}
	}))
	defer backend.Close()
	tr := newTransport(func() time.Duration { return time.Second })
	defer tr.CloseIdleConnections()
	out, err := http.NewRequest(http.MethodPost, backend.URL+"/api/chat", nil)
	require.NoError(t, err)
	res, err := tr.RoundTrip(out)
	require.NoError(t, err)
	require.Equal(t, []string{"chunked"}, res.TransferEncoding)
	probe := &waitProbe{ReadCloser: res.Body, sent: &sent, entered: make(chan struct{})}
	res.Body = probe

	rec := streamReleasingTokens(t, res, probe, release, 3)
	assert.Equal(t, 4, strings.Count(rec.Body.String(), "\n"), "every token copied")
	require.Len(t, probe.waited, 4, "one wait per token")
	for i, ahead := range probe.waited {
		assert.Equal(t, int64(1), ahead, "wait %d returned with the next token sent", i)
	}
}

// streamReleasingTokens runs the handler's stream loop over res, whose body
// is probe, letting the backend send its next token (on release) each time
// the loop waits for one, n times; it returns what the client received
// once the stream has ended complete.
func streamReleasingTokens(t *testing.T, res *http.Response, probe *waitProbe, release chan<- struct{}, n int) *httptest.ResponseRecorder {
	t.Helper()
	h := &Handler{ClientWriteTimeout: caddy.Duration(time.Minute), StreamIdleTimeout: caddy.Duration(time.Minute)}
	rec := httptest.NewRecorder()
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	done := make(chan streamEnd, 1)
	go func() {
		done <- h.stream(rec, httptest.NewRequest(http.MethodPost, "/api/chat", nil), res, testBackend("a", nil), ctx, cancel, func() {}, func() {}, &tailKeeper{})
	}()
	for range n {
		<-probe.entered // waiting for the next token: let it come
		release <- struct{}{}
	}
	require.Equal(t, endComplete, <-done)
	return rec
}
