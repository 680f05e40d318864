package ollamaflow

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRequestStreams(t *testing.T) {
	cases := []struct {
		path, body string
		want       bool
	}{
		// Ollama's native API streams unless told not to.
		{"/api/chat", `{"model":"m"}`, true},
		{"/api/chat", `{"model":"m","stream":false}`, false},
		{"/api/generate", `{"model":"m","stream":true}`, true},
		{"/api/generate", `{"model":"m","stream":null}`, true},
		{"/api/pull", `{"model":"m","stream":false}`, false},
		{"/api/push", `{"model":"m"}`, true},
		{"/api/create", `{"model":"m"}`, true},
		// encoding/json's matching: any case, Unicode folding, escapes, last wins.
		{"/api/chat", `{"model":"m","STREAM":false}`, false},
		{"/api/chat", `{"model":"m","ſtream":false}`, false},
		{"/api/chat", `{"model":"m","\u0073tream":false}`, false},
		{"/api/chat", `{"model":"m","stream":false,"Stream":true}`, true},
		{"/api/chat", `{"model":"m","stream":true,"stream":false}`, false},
		{"/api/chat", `{"options":{"stream":false},"model":"m"}`, true},
		{"/api/chat", `{"model":"m","stream":"false"}`, true}, // not a boolean: Ollama refuses it
		// The OpenAI-compatible API streams only when asked.
		{"/v1/chat/completions", `{"model":"m"}`, false},
		{"/v1/chat/completions", `{"model":"m","stream":true}`, true},
		{"/v1/completions", `{"model":"m","Stream":true}`, true},
		{"/v1/completions", `{"model":"m","stream":false}`, false},
		{"/v1/completions", `{"model":"m","stream":true,"STREAM":null}`, true}, // a bool: null changes nothing
		{"/api/chat", `{"model":"m","stream":false,"STREAM":null}`, true},      // a *bool: null resets it
		// Nothing else streams.
		{"/api/embed", `{"model":"m","stream":true}`, false},
		{"/api/show", `{"model":"m"}`, false},
		{"/v1/embeddings", `{"model":"m","stream":true}`, false},
		{"/api/version", ``, false},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, requestStreams(apiOf(c.path), c.path, []byte(c.body)), "%s %s", c.path, c.body)
	}
}

// FuzzRequestStreams checks requestStreams against encoding/json, which is
// how Ollama reads "stream": wherever Ollama accepts the body, both agree.
func FuzzRequestStreams(f *testing.F) {
	for _, s := range []string{`{"stream":false}`, `{"STREAM":true}`, `{"ſtream":false}`, `{"\u0053tream":false,"x":[1,{"stream":true}]}`,
		`{"stream":true,"stream":false}`, `{"stream":null}`, `{"a":"\"stream\":false"}`, ` {"stream" : false } `} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		var req struct {
			Stream *bool `json:"stream"`
		}
		if err := json.Unmarshal([]byte(body), &req); err != nil || !isJSONObject([]byte(body)) {
			requestStreams(apiOllama, "/api/chat", []byte(body)) // must not panic
			return
		}
		want := req.Stream == nil || *req.Stream
		if got := requestStreams(apiOllama, "/api/chat", []byte(body)); got != want {
			t.Fatalf("requestStreams(%q) = %v, encoding/json says %v", body, got, want)
		}
		// Ollama's OpenAI layer holds stream as a bool, which null leaves
		// as it was ({"stream":true,"stream":null} streams).
		var oa struct {
			Stream bool `json:"stream"`
		}
		if err := json.Unmarshal([]byte(body), &oa); err != nil {
			t.Fatalf("encoding/json decodes %q into *bool but not bool: %v", body, err)
		}
		wantOpenAI := oa.Stream
		if got := requestStreams(apiOpenAI, "/v1/chat/completions", []byte(body)); got != wantOpenAI {
			t.Fatalf("requestStreams(/v1, %q) = %v, encoding/json says %v", body, got, wantOpenAI)
		}
	})
}

func TestFormatOf(t *testing.T) {
	assert.Equal(t, bodyNDJSON, formatOf("application/x-ndjson"))
	assert.Equal(t, bodySSE, formatOf("text/event-stream; charset=utf-8"))
	assert.Equal(t, bodyOther, formatOf("application/json; charset=utf-8"))
	assert.Equal(t, bodyOther, formatOf(""))
}

// The error that ends a cut stream starts on a line (an event) of its own,
// wherever the cut fell, and carries no done marker.
func TestEndWithErrorStartsOnAFreshLine(t *testing.T) {
	cases := []struct {
		format     bodyFormat
		sent, want string
	}{
		{bodyNDJSON, "", `{"error":"boom"}` + "\n"},
		{bodyNDJSON, "{\"a\":1}\n", "{\"a\":1}\n" + `{"error":"boom"}` + "\n"},
		{bodyNDJSON, `{"a":`, `{"a":` + "\n" + `{"error":"boom"}` + "\n"},
		{bodySSE, "", `data: {"error":{"code":"c","message":"boom","type":"server_error"}}` + "\n\n"},
		{bodySSE, "data: {}\n\n", "data: {}\n\n" + `data: {"error":{"code":"c","message":"boom","type":"server_error"}}` + "\n\n"},
		{bodySSE, "data: {}\n", "data: {}\n\n" + `data: {"error":{"code":"c","message":"boom","type":"server_error"}}` + "\n\n"},
		{bodySSE, "data: {", "data: {\n\n" + `data: {"error":{"code":"c","message":"boom","type":"server_error"}}` + "\n\n"},
	}
	for _, c := range cases {
		rec := httptest.NewRecorder()
		cw := newClientWriter(rec, time.Minute, func() { t.Error("the watchdog fired") })
		require.NoError(t, cw.writeHeader(http.StatusOK))
		for i := range len(c.sent) { // byte by byte: the last-bytes bookkeeping sees every split
			require.NoError(t, cw.write([]byte(c.sent[i:i+1])))
		}
		require.NoError(t, cw.endWithError(c.format, "boom", "c"))
		cw.stop()
		assert.Equal(t, c.want, rec.Body.String(), "after %q", c.sent)
	}
}

func TestBusyBackoff(t *testing.T) {
	now := time.Now()
	a, b := &backend{srv: &server{}}, &backend{srv: &server{}}
	assert.Equal(t, []*backend{a, b}, notBusy([]*backend{a, b}, now))

	// a refuses a request while serving two others of ours.
	a.srv.inFlight.Store(3)
	a.srv.backOff(busyBackoff)
	a.srv.inFlight.Store(2) // the refused request let go of its slot
	now = time.Now()
	assert.True(t, a.srv.backingOff(now))
	assert.Equal(t, []*backend{b}, notBusy([]*backend{a, b}, now), "a busy server sits out while others remain")
	assert.Equal(t, []*backend{a}, notBusy([]*backend{a}, now), "but not when it is the only one")
	assert.False(t, a.srv.backingOff(now.Add(busyBackoff)), "at most for busyBackoff")
	a.srv.inFlight.Store(1)
	assert.False(t, a.srv.backingOff(now), "and only until one of its requests finishes: it has room")
	assert.Equal(t, []*backend{a, b}, notBusy([]*backend{a, b}, now))

	// Busy with other clients' work (none of ours): only the time counts.
	b.srv.inFlight.Store(1)
	b.srv.backOff(busyBackoff)
	b.srv.inFlight.Store(0)
	now = time.Now()
	assert.True(t, b.srv.backingOff(now))
	assert.False(t, b.srv.backingOff(now.Add(busyBackoff)))
}

func TestFailStatus(t *testing.T) {
	b := &backend{cfg: &Backend{Name: "a", URL: "localhost"}}
	require.NoError(t, b.cfg.provision())
	for code, want := range map[int]bool{500: false, 502: true, 503: false, 504: true, 404: false, 200: false} {
		assert.Equal(t, want, b.failStatus(code), "default fail_status, %d", code)
	}
	b.cfg.FailStatus = []int{5, 429}
	for code, want := range map[int]bool{500: true, 503: true, 429: true, 404: false} {
		assert.Equal(t, want, b.failStatus(code), "fail_status 5xx 429, %d", code)
	}
	bad := &Backend{Name: "a", URL: "localhost", FailStatus: []int{42}}
	assert.ErrorContains(t, bad.provision(), "fail_status")
}

// blockingWriter is a ResponseWriter without write deadlines whose writes
// block until released, like a connection to a client that stopped reading.
type blockingWriter struct {
	hdr     http.Header
	release chan struct{}
}

func (w *blockingWriter) Header() http.Header { return w.hdr }
func (w *blockingWriter) WriteHeader(int)     {}
func (w *blockingWriter) Flush()              {}
func (w *blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	return 0, http.ErrHandlerTimeout
}

// Where the connection offers no write deadline, a watchdog acts at
// client_write_timeout: it cancels the backend request and frees the slot
// while the write is still blocked, and the write is then known as a stall.
func TestClientWriterWatchdogWithoutDeadlines(t *testing.T) {
	w := &blockingWriter{hdr: http.Header{}, release: make(chan struct{})}
	stalled := make(chan struct{})
	cw := newClientWriter(w, 10*time.Millisecond, func() { close(stalled) })
	defer cw.stop()
	require.NoError(t, cw.writeHeader(http.StatusOK))
	done := make(chan error)
	go func() { done <- cw.write([]byte("x")) }()
	<-stalled // the watchdog fired during the blocked write
	assert.True(t, cw.stalled.Load())
	assert.True(t, cw.noDL, "the writer has no deadlines")
	close(w.release)
	assert.Error(t, <-done)
}

// slotWatcher records, at every write to the client, whether the backend's
// slot was still held and the request still counted as work on it.
type slotWatcher struct {
	*httptest.ResponseRecorder
	b            *backend
	held, counts []bool
}

func (w *slotWatcher) Write(p []byte) (int, error) {
	w.held = append(w.held, w.b.srv.inFlight.Load() > 0)
	w.b.srv.speed.mu.Lock()
	w.counts = append(w.counts, len(w.b.srv.speed.tasks) > 0)
	w.b.srv.speed.mu.Unlock()
	return w.ResponseRecorder.Write(p)
}

// A client sends its next request as soon as it has read the answer. The
// slot and the cost model's record of the work must be free before the
// answer's last bytes reach it: freed after, every server of a pool with
// one client per slot looked full to the next request, and least_delay
// sent it to wait inside one (equal-exact).
func TestTheSlotIsFreeBeforeTheClientHasTheWholeAnswer(t *testing.T) {
	fake := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer fake.Close()
	var h Handler
	require.NoError(t, json.Unmarshal([]byte(`{"name":"release","backends":[{"name":"b0","url":"`+fake.URL+`","health_interval":"1h"}]}`), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	require.NoError(t, h.Provision(ctx))
	defer func() { _ = h.Cleanup() }()
	b := h.backends[0]
	require.Eventually(t, func() bool { return b.srv.models.Load().known }, 10*time.Second, 5*time.Millisecond)

	for _, c := range []struct{ path, body string }{
		{"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{"/api/generate", `{"model":"tiny-llama","prompt":"hi","stream":false}`},
		{"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`},
	} {
		w := &slotWatcher{ResponseRecorder: httptest.NewRecorder(), b: b}
		require.NoError(t, h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, c.path, strings.NewReader(c.body)), nil))
		require.Equal(t, http.StatusOK, w.Code, w.Body.String())
		require.NotEmpty(t, w.held, c.path)
		assert.False(t, w.held[len(w.held)-1], "%s: the slot is free when the last bytes go out", c.path)
		assert.False(t, w.counts[len(w.counts)-1], "%s: the work has ended in the cost model", c.path)
	}
	v, ok := b.srv.speed.view()
	require.True(t, ok, "the answers were learned all the same")
	assert.Positive(t, v.samples)
}
