package ollamaflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
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

func TestBodyBudgetReserveWaitRelease(t *testing.T) {
	h := &Handler{maxBodyMemory: 100}
	l1, l2 := h.newBodyLease(), h.newBodyLease()
	require.NoError(t, l1.reserve(context.Background(), 60))
	assert.EqualValues(t, 60, heldBy(h))

	// No room: a client that leaves while waiting holds nothing.
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, l2.reserve(gone, 60), context.Canceled)
	assert.EqualValues(t, 60, heldBy(h))

	// No room and the wait is over: refused, holding nothing.
	l3 := h.newBodyLease()
	l3.deadline = time.Now()
	assert.ErrorIs(t, l3.reserve(context.Background(), 41), errBodyMemory)
	require.NoError(t, l3.reserve(context.Background(), 40), "what fits is never refused")
	l3.close()

	// A waiter gets the room as soon as it is released.
	done := make(chan error, 1)
	go func() { done <- l2.reserve(context.Background(), 60) }()
	l1.release(10)
	assert.EqualValues(t, 50, heldBy(h))
	l1.close()
	require.NoError(t, <-done)
	assert.EqualValues(t, 60, heldBy(h))
	l1.close() // twice is harmless
	l2.close()
	assert.Zero(t, heldBy(h))
}

func TestBodyBudgetIsSharedByFrontends(t *testing.T) {
	used0, _, _ := bodyMemory.state()
	small := &Handler{maxBodyMemory: 100}
	big := &Handler{maxBodyMemory: 1 << 40}
	bodyMemory.register(small, small.maxBodyMemory)
	bodyMemory.register(big, big.maxBodyMemory)
	defer bodyMemory.unregister(small)
	defer bodyMemory.unregister(big)

	_, _, limit := bodyMemory.state()
	assert.EqualValues(t, int64(1<<40), limit, "the process budget is the largest frontend's")
	ls := small.newBodyLease()
	ls.deadline = time.Now()
	assert.ErrorIs(t, ls.reserve(context.Background(), 101), errBodyMemory, "a frontend keeps within its own limit")
	lb := big.newBodyLease()
	require.NoError(t, lb.reserve(context.Background(), 1000))
	used, _, _ := bodyMemory.state()
	assert.EqualValues(t, used0+1000, used)
	lb.close()
	used, _, _ = bodyMemory.state()
	assert.Equal(t, used0, used)
}

func TestReadBodyReservesAndLimits(t *testing.T) {
	h := &Handler{MaxRequestBody: 10, maxBodyMemory: 64}
	read := func(body io.Reader, length int64) ([]byte, int, error, int64) {
		r := httptest.NewRequest("POST", "/api/chat", body)
		r.ContentLength = length
		l := h.newBodyLease()
		l.deadline = time.Now() // never wait in a unit test
		b, status, err := h.readBody(r, l)
		held := l.n
		l.close()
		return b, status, err, held
	}

	_, status, err, held := read(strings.NewReader(`{"model":"a"}`), 13)
	require.Error(t, err)
	assert.Equal(t, http.StatusRequestEntityTooLarge, status)
	assert.Zero(t, held, "refused by its Content-Length before anything is reserved")

	// Without a Content-Length the limit still holds.
	_, status, err, _ = read(io.MultiReader(strings.NewReader(`{"model":`), strings.NewReader(`"abc"}`)), -1)
	require.Error(t, err)
	assert.Equal(t, http.StatusRequestEntityTooLarge, status)

	body, _, err, held := read(strings.NewReader(`{"a":1}`), 7)
	require.NoError(t, err)
	assert.Equal(t, `{"a":1}`, string(body))
	assert.EqualValues(t, 7, held, "reserved by Content-Length")
	assert.Equal(t, 7, cap(body), "and held in a buffer of exactly that size")

	body, _, err, held = read(io.MultiReader(strings.NewReader(`{"a"`), strings.NewReader(`:1}`)), -1)
	require.NoError(t, err)
	assert.Equal(t, `{"a":1}`, string(body))
	assert.EqualValues(t, cap(body), held, "a chunked body holds what its buffer takes")

	_, status, err, _ = read(strings.NewReader(`{"a"`), 7)
	require.Error(t, err, "shorter than its Content-Length")
	assert.Equal(t, http.StatusBadRequest, status)

	// The budget is exhausted by others: refused with nothing held.
	other := h.newBodyLease()
	require.NoError(t, other.reserve(context.Background(), 60))
	_, status, err, held = read(strings.NewReader(`{"a":1}`), 7)
	assert.ErrorIs(t, err, errBodyMemory)
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Zero(t, held)
	other.close()
	assert.Zero(t, heldBy(h))
}

// A limit at the integer maximum must not wrap around when the reader is
// given room for one byte more: the body would be read as empty.
func TestReadBodyLimitNearIntegerMaximum(t *testing.T) {
	for _, limit := range []int64{math.MaxInt64, math.MaxInt64 - 1} {
		for _, length := range []int64{13, -1} {
			h := &Handler{MaxRequestBody: limit, maxBodyMemory: math.MaxInt64}
			r := httptest.NewRequest("POST", "/api/chat", strings.NewReader(`{"model":"a"}`))
			r.ContentLength = length
			l := h.newBodyLease()
			body, status, err := h.readBody(r, l)
			require.NoError(t, err, "limit %d", limit)
			assert.Zero(t, status)
			assert.Equal(t, `{"model":"a"}`, string(body), "limit %d", limit)
			l.close()
		}
	}
}

// budgetHandler is a provisioned frontend over real fake servers, served
// by calling ServeHTTP directly.
func budgetHandler(t *testing.T, extra string, urls ...string) *Handler {
	t.Helper()
	var backends []string
	for i, u := range urls {
		backends = append(backends, fmt.Sprintf(`{"name":"b%d","url":%q,"health_interval":"1h","pin_completions":{"options":{"seed":%d}}}`, i, u, i))
	}
	var h Handler
	require.NoError(t, json.Unmarshal([]byte(`{"name":"budget","max_request_body":4096,"max_body_memory":8192,"retries":1,`+
		`"pin_completions":{"options":{"temperature":0.5}},`+extra+`"backends":[`+strings.Join(backends, ",")+`]}`), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	require.NoError(t, h.Provision(ctx))
	t.Cleanup(func() { _ = h.Cleanup() })
	for _, b := range h.backends {
		require.Eventually(t, func() bool { return b.srv.models.Load().known }, 10*time.Second, 5*time.Millisecond)
	}
	return &h
}

// brokenBody fails after some bytes: a client that went away mid-body.
type brokenBody struct{ r io.Reader }

func (b *brokenBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		return n, errors.New("connection reset by peer")
	}
	return n, err
}

type panicTransport struct{}

func (panicTransport) RoundTrip(*http.Request) (*http.Response, error) { panic("boom") }

func TestBodyBudgetIsReleasedOnEveryExit(t *testing.T) {
	good := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer good.Close()
	bad := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer bad.Close()
	h := budgetHandler(t, `"lb_policy":"first",`, bad.URL, good.URL)
	bodyMemory.mu.Lock()
	bodyMemory.peak = bodyMemory.used // the high-water mark of this test (no other traffic runs)
	bodyMemory.mu.Unlock()
	chat := `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`

	serve := func(body io.Reader, length int64) *httptest.ResponseRecorder {
		r := httptest.NewRequest("POST", "/api/chat", body)
		r.ContentLength = length
		rec := httptest.NewRecorder()
		_ = h.ServeHTTP(rec, r, nil)
		return rec
	}
	cases := []struct {
		name   string
		body   io.Reader
		length int64
		status int
	}{
		{"ok", strings.NewReader(chat), int64(len(chat)), http.StatusOK},
		{"too large", strings.NewReader(strings.Repeat(" ", 5000)), 5000, http.StatusRequestEntityTooLarge},
		{"too large chunked", strings.NewReader(strings.Repeat(" ", 5000)), -1, http.StatusRequestEntityTooLarge},
		{"not json", strings.NewReader(`[1]`), 3, http.StatusBadRequest},
		{"client gone", &brokenBody{strings.NewReader(chat[:20])}, -1, http.StatusBadRequest},
		{"chunked ok", strings.NewReader(chat), -1, http.StatusOK},
	}
	for _, tc := range cases {
		rec := serve(tc.body, tc.length)
		assert.Equal(t, tc.status, rec.Code, "%s: %s", tc.name, rec.Body)
		assert.Zero(t, heldBy(h), "%s: the body budget leaked", tc.name)
	}

	// Retries: the first backend fails, the body is replayed (with the
	// second's pins) and then released.
	bad.FailWith(http.StatusBadGateway, `{"error":"bad gateway"}`, fakeollama.Completions...)
	for range 2 {
		rec := serve(strings.NewReader(chat), int64(len(chat)))
		assert.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		assert.Equal(t, "b1", rec.Header().Get("X-OllamaFlow-Backend"))
		assert.Zero(t, heldBy(h), "after retries")
	}
	_, peak, _ := bodyMemory.state()
	assert.LessOrEqual(t, peak, h.maxBodyMemory, "this frontend never held more than its max_body_memory")

	// A panic below the handler unwinds through the release.
	h.transport = panicTransport{}
	func() {
		defer func() { assert.NotNil(t, recover()) }()
		serve(strings.NewReader(chat), int64(len(chat)))
	}()
	assert.Zero(t, heldBy(h), "after a panic")
}

func TestBodyBudgetExhaustedIs503WithRetryAfter(t *testing.T) {
	good := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer good.Close()
	h := budgetHandler(t, "", good.URL)
	hog := h.newBodyLease()
	require.NoError(t, hog.reserve(context.Background(), h.maxBodyMemory))
	defer hog.close()

	for _, path := range []string{"/api/chat", "/v1/chat/completions"} {
		r := httptest.NewRequest("POST", path, strings.NewReader(`{"model":"tiny-llama","messages":[]}`))
		rec := httptest.NewRecorder()
		_ = h.ServeHTTP(rec, r, nil) // waits bodyMemoryWait for room that never comes
		assert.Equal(t, http.StatusServiceUnavailable, rec.Code)
		assert.NotEmpty(t, rec.Header().Get("Retry-After"))
		assert.Contains(t, rec.Body.String(), "max_body_memory")
		if path == "/v1/chat/completions" {
			var oa struct {
				Error struct{ Message, Type string }
			}
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &oa), "the OpenAI error format")
			assert.Contains(t, oa.Error.Message, "max_body_memory")
		}
	}
	assert.Equal(t, h.maxBodyMemory, heldBy(h), "only the hog holds memory")
}
