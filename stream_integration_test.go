package ollamaflow

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// cutCount reads ollamaflow_responses_cut_total for backend and reason
// from Caddy's /metrics, as an operator would.
func cutCount(t *testing.T, backend, reason string) int {
	t.Helper()
	res, err := http.Get(fmt.Sprintf("http://localhost:%d/metrics", adminPort))
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	re := regexp.MustCompile(`(?m)^ollamaflow_responses_cut_total\{backend="` + backend + `",frontend="ollamaflow",reason="` + reason + `"\} (\d+)$`)
	m := re.FindSubmatch(b)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// A backend that dies or stalls after the first byte: the client reads an
// error in the API's format at the end of the stream, never a done marker;
// a non-streaming body cut short is aborted, so it cannot pass for whole.
func TestIntegrationBrokenStreamsEndWithAnError(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 5})
	defer f.Close()
	// Two configs: the stall cases need stream_idle_timeout to fire, and a
	// short one keeps them quick; the cases where the backend dies must
	// not race it (under load a gap of 300 ms between the fake's chunks
	// happens, and the cut was then blamed on idleness), so they get one
	// that only bounds a hang. The pooled server, its failure run and its
	// probe schedule (one probe, at the first load) survive the reloads.
	const (
		shortIdle = "300ms"
		longIdle  = "5m"
	)
	load := func(idle string) {
		loadCaddy(t, fmt.Sprintf(`
		stream_idle_timeout %s
		backend a %s {
			fail_threshold 1000
			health_interval 1h # a passing probe would reset the failure run counted below
		}`, idle, f.URL))
	}
	load(longIdle)
	srv := waitHealthy(t, f.URL, stateHealthy)

	cases := []struct {
		name, path, body string
		idle             string
		fault            func()
		reason           string
		wantTail         *regexp.Regexp
	}{
		{"native chat, backend dies", "/api/chat", chatBody, longIdle, func() { f.DieMidStream(2, "/api/chat") }, "backend_failed",
			regexp.MustCompile(`\n\{"error":"backend a failed mid-answer: the connection closed before the answer was complete; the answer is incomplete, retry the request"\}\n$`)},
		{"native generate, stall", "/api/generate", `{"model":"tiny-llama","prompt":"hi"}`, shortIdle, func() { f.HangAfterHeaders("/api/generate") }, "stream_idle_timeout",
			regexp.MustCompile(`^\{"error":"backend a sent nothing for 300ms \(stream_idle_timeout\); the answer is incomplete, retry the request"\}\n$`)},
		{"openai stream, backend dies", "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true}`, longIdle, func() { f.DieMidStream(2, "/v1/chat/completions") }, "backend_failed",
			regexp.MustCompile(`\n\ndata: \{"error":\{"code":"stream_broken","message":"backend a failed mid-answer: [^"]+","type":"server_error"\}\}\n\n$`)},
		{"openai stream, stall", "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true}`, shortIdle, func() { f.HangAfterHeaders("/v1/chat/completions") }, "stream_idle_timeout",
			regexp.MustCompile(`^data: \{"error":\{"code":"stream_stalled","message":"backend a sent nothing for 300ms \(stream_idle_timeout\)[^"]*","type":"server_error"\}\}\n\n$`)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			load(c.idle)
			f.ClearFaults()
			c.fault()
			before := cutCount(t, "a", c.reason)
			res, body := post(t, c.path, c.body)
			assert.Equal(t, http.StatusOK, res.StatusCode)
			assert.Regexp(t, c.wantTail, body)
			assert.NotContains(t, body, `"done":true`)
			assert.NotContains(t, body, `[DONE]`)
			assert.NotContains(t, body, "127.0.0.1", "no backend address reaches the client")
			assert.Equal(t, before+1, cutCount(t, "a", c.reason), "counted once")
			assert.EqualValues(t, 1, srv.failStreak.Load(), "charged to the backend once (after the headers' success)")
		})
	}

	t.Run("non-streaming body cut", func(t *testing.T) {
		load(longIdle)
		f.ClearFaults()
		f.DieMidStream(0, "/api/chat")
		before := cutCount(t, "a", "backend_failed")
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":false}`))
		require.NoError(t, err)
		_, err = io.ReadAll(res.Body)
		res.Body.Close()
		assert.Equal(t, http.StatusOK, res.StatusCode)
		assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "the client sees the body was cut, not a short answer")
		assert.Equal(t, before+1, cutCount(t, "a", "backend_failed"))
	})
	f.ClearFaults()
}

// Non-streaming requests are bounded by response_timeout, not by
// first_byte_timeout, and a long answer is not the backend's failure.
func TestIntegrationResponseTimeout(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3})
	defer f.Close()
	loadCaddy(t, fmt.Sprintf(`
		first_byte_timeout 200ms
		response_timeout 5s
		backend a %s {
			fail_threshold 1
		}`, f.URL))
	srv := waitHealthy(t, f.URL, stateHealthy)
	f.SlowFirstByte(time.Second, fakeollama.Completions...)

	// Longer than first_byte_timeout, within response_timeout: served.
	for _, c := range []struct{ path, body string }{
		{"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{"/api/generate", `{"model":"tiny-llama","prompt":"hi","STREAM":false}`},
		{"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`},
	} {
		res, body := post(t, c.path, c.body)
		assert.Equal(t, http.StatusOK, res.StatusCode, "%s: %s", c.path, body)
	}
	assert.Zero(t, srv.failStreak.Load())

	// A stream still gets first_byte_timeout.
	res, body := post(t, "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	assert.Equal(t, http.StatusGatewayTimeout, res.StatusCode)
	assert.Contains(t, body, "first_byte_timeout")
	assert.Equal(t, stateUnhealthy, healthState(srv.state.Load()), "a stream without headers is the backend's failure")

	// Beyond response_timeout: 504, nobody blamed.
	loadCaddy(t, fmt.Sprintf(`
		first_byte_timeout 100ms
		response_timeout 300ms
		backend b %s {
			fail_threshold 1
		}`, f.URL))
	srv = waitHealthy(t, f.URL, stateHealthy)
	res, body = post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`)
	assert.Equal(t, http.StatusGatewayTimeout, res.StatusCode)
	assert.Contains(t, body, "response_timeout")
	assert.Zero(t, srv.failStreak.Load(), "a long answer is not a failure")
	assert.Equal(t, stateHealthy, healthState(srv.state.Load()))
	f.ClearFaults()
}

// A client that stops reading a large streamed answer is cut off after
// client_write_timeout: its slot is freed, the backend request cancelled,
// and the healthy backend is not blamed, although the proxy is blocked
// writing for longer than stream_idle_timeout.
func TestIntegrationStalledClientIsCutNotTheBackend(t *testing.T) {
	// The stream must be longer than everything the kernel can buffer
	// between the fake and a client that never reads (the fake's send
	// buffer, our receive buffer from it, which autotunes up to
	// net.ipv4.tcp_rmem's maximum, 32 MiB on CI, our send buffer to the
	// client): a shorter one lets a fast fake finish its whole answer into
	// those buffers before client_write_timeout expires, and then there is
	// no backend request left to cancel. 200,000 tokens (~18 MiB) did fit
	// on an idle machine. 5,000,000 (~450 MiB) cannot; the fake produces
	// only until the cut, so the cost does not grow with this number.
	const tokens = 5_000_000
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: tokens})
	defer f.Close()
	// stream_idle_timeout is shorter than client_write_timeout, as the
	// test means; 2 s leaves a starved fake (-race, a loaded machine) time
	// to send its next token before the stall begins.
	loadCaddy(t, fmt.Sprintf(`
		stream_idle_timeout 2s
		client_write_timeout 5s
		backend a %s {
			fail_threshold 1
			max_parallel 3
		}`, f.URL))
	srv := waitHealthy(t, f.URL, stateHealthy)
	before := cutCount(t, "a", "client_write_timeout")

	// Three clients with tiny receive buffers ask for a long stream and
	// never read it.
	const clients = 3
	var conns []net.Conn
	for range clients {
		d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
			if err != nil {
				return err
			}
			return serr
		}}
		conn, err := d.DialContext(context.Background(), "tcp", strings.TrimPrefix(siteURL, "http://"))
		require.NoError(t, err)
		defer conn.Close()
		body := `{"model":"tiny-llama","prompt":"hi"}`
		_, err = fmt.Fprintf(conn, "POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		require.NoError(t, err)
		conns = append(conns, conn)
	}
	// Each took a slot and began streaming.
	require.Eventually(t, func() bool { return f.Count("/api/generate") == clients }, 60*time.Second, 10*time.Millisecond)

	// Generous: filling the buffers takes seconds under -race on a loaded
	// machine, before the 5 s client_write_timeout even starts.
	require.Eventually(t, func() bool { return srv.inFlight.Load() == 0 }, 60*time.Second, 10*time.Millisecond,
		"the stalled clients' slots are freed")
	require.Eventually(t, func() bool { return len(f.Cancellations()) == clients }, 30*time.Second, 10*time.Millisecond,
		"their backend requests are cancelled")
	for _, c := range f.Cancellations() {
		assert.Less(t, c.Chunks, tokens, "the generation stopped early")
	}
	assert.Equal(t, stateHealthy, healthState(srv.state.Load()), "the backend's breaker stays closed")
	assert.Zero(t, srv.failStreak.Load(), "nothing is charged to the backend")
	assert.Equal(t, before+clients, cutCount(t, "a", "client_write_timeout"))

	// The connections were cut: what the client can still read ends.
	for _, conn := range conns {
		// What the kernel buffered (megabytes) is read first: the deadline
		// only tells a connection left open from a slow read.
		require.NoError(t, conn.SetReadDeadline(time.Now().Add(60*time.Second)))
		_, err := io.Copy(io.Discard, bufio.NewReader(conn))
		var ne net.Error
		assert.False(t, errors.As(err, &ne) && ne.Timeout(), "the proxy closed the connection (read: %v)", err)
	}

	// The server serves the next client at once.
	res, body := post(t, "/api/generate", `{"model":"tiny-llama","prompt":"hi","stream":false,"options":{"num_predict":2}}`)
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
}

// Only the server's faults open its breaker: a 500 a client provoked does
// not count, a 502 does; a 503 "server busy" moves the request on without
// counting either way.
func TestIntegrationBreakerCountsServerFaultsOnly(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, MaxContext: 8192})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer b.Close()
	loadCaddy(t, fmt.Sprintf(`
		lb_policy first
		backend a %s {
			fail_threshold 2
		}
		backend b %s`, a.URL, b.URL))
	sa := waitHealthy(t, a.URL, stateHealthy)
	waitHealthy(t, b.URL, stateHealthy)

	// Ten requests that a cannot load: its own 500 passes through each time.
	for range 10 {
		res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false,"options":{"num_ctx":10000000}}`)
		assert.Equal(t, http.StatusInternalServerError, res.StatusCode)
		assert.Contains(t, body, "model requires more system memory")
		assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Zero(t, sa.failStreak.Load(), "a client-provoked 500 is not the server's fault")
	assert.Equal(t, stateHealthy, healthState(sa.state.Load()))

	// 503 "server busy": the request moves to b; a is not blamed.
	a.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)
	for range 3 {
		res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false}`)
		assert.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Zero(t, sa.failStreak.Load(), "busy is back-pressure, not a failure")
	assert.Equal(t, stateHealthy, healthState(sa.state.Load()))
	assert.True(t, sa.backingOff(time.Now().Add(-time.Second)), "a sits out after its 503")

	// 502 is in fail_status: two in a row open the breaker.
	a.FailWith(http.StatusBadGateway, `{"error":"bad gateway"}`, fakeollama.Completions...)
	sa.busyUntil.Store(0)
	for range 2 {
		res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false}`)
		assert.Equal(t, http.StatusOK, res.StatusCode, body)
	}
	assert.Equal(t, stateUnhealthy, healthState(sa.state.Load()))
}
