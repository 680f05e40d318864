//go:build chaos

package ollamaflow

// The chaos and capacity suite (issue 7): fake Ollama servers that die, fail fast, hang or
// saturate, a real Caddy in-process, and closed-loop clients. Every scenario prints its figure
// and asserts its target, so a regression fails CI:
//
//	go test -tags chaos -run Chaos -count=1 -v .
//
// It uses the integration tests' Caddy (loadCaddy, pooled, waitKnown), so it cannot run in
// parallel with them; .ci/chaos runs it alone.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// chaosClient keeps a connection per worker alive: 30,000 requests through fresh connections
// would exhaust the ephemeral ports.
var chaosClient = &http.Client{
	Timeout: time.Minute,
	Transport: &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	},
}

func init() { testClients = append(testClients, chaosClient) }

const chaosChat = `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`

// chaosFakes starts n fakes serving tiny-llama (loaded) and returns them with the Caddyfile
// lines naming them a, b, c … with opts inside each backend block.
func chaosFakes(t *testing.T, n int, cfg fakeollama.Config, opts string) ([]*fakeollama.Server, string) {
	t.Helper()
	cfg.Models, cfg.Loaded = []string{"tiny-llama"}, []string{"tiny-llama"}
	var fs []*fakeollama.Server
	var lines []string
	for i := range n {
		f := fakeollama.New(cfg)
		t.Cleanup(f.Close)
		fs = append(fs, f)
		lines = append(lines, fmt.Sprintf("backend %c %s {\n%s\n}", 'a'+i, f.URL, opts))
	}
	return fs, strings.Join(lines, "\n")
}

// outcome is what a client saw of one request.
type outcome struct {
	status  int
	backend string
	err     string // transport error or incomplete body
	sent    time.Time
	took    time.Duration
}

func (o outcome) ok() bool { return o.err == "" && o.status == http.StatusOK }

// chaosSend posts body to path and reads the answer to the end; a 200 must end with the final
// "done":true object. id goes in X-Chaos-Id, which the fakes record.
func chaosSend(ctx context.Context, path, body, id string) outcome {
	o := outcome{sent: time.Now()}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, siteURL+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if id != "" {
		req.Header.Set("X-Chaos-Id", id)
	}
	res, err := chaosClient.Do(req)
	if err != nil {
		o.err, o.took = err.Error(), time.Since(o.sent)
		return o
	}
	defer res.Body.Close()
	o.status, o.backend = res.StatusCode, res.Header.Get("X-OllamaFlow-Backend")
	b, err := io.ReadAll(res.Body)
	o.took = time.Since(o.sent)
	switch {
	case err != nil:
		o.err = "body cut: " + err.Error()
	case o.status == http.StatusOK && !bytes.Contains(b, []byte(`"done":true`)):
		o.err = "incomplete body: " + string(b)
	case o.status != http.StatusOK:
		o.err = fmt.Sprintf("status %d: %s", o.status, bytes.TrimSpace(b))
	}
	return o
}

// chaosLoad sends total requests from conc closed-loop workers. onSent, if set, is called with
// the number sent so far before each request.
func chaosLoad(total, conc int, onSent func(n int64)) []outcome {
	var sent atomic.Int64
	out := make([]outcome, total)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				n := sent.Add(1)
				if n > int64(total) {
					return
				}
				if onSent != nil {
					onSent(n)
				}
				out[n-1] = chaosSend(context.Background(), "/api/chat", chaosChat, "")
			}
		})
	}
	wg.Wait()
	return out
}

// failures counts the outcomes that are not a complete 200 and lists a few of them.
func failures(outs []outcome) (int, []string) {
	n := 0
	var some []string
	for _, o := range outs {
		if !o.ok() {
			n++
			if len(some) < 10 {
				some = append(some, o.err)
			}
		}
	}
	return n, some
}

func servedBy(outs []outcome) map[string]int {
	m := map[string]int{}
	for _, o := range outs {
		if o.ok() {
			m[o.backend]++
		}
	}
	return m
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// TestChaosKillOneOfThree: one of three servers dies a third of the way through 30,000
// non-streaming requests at concurrency 16. The servers have 4 slots each (and Ollama's
// default queue), so the load spreads over all three; the one killed is the one with the most
// requests in flight. Target: no failed request.
func TestChaosKillOneOfThree(t *testing.T) {
	const total, conc = 30_000, 16
	fs, lines := chaosFakes(t, 3, fakeollama.Config{Tokens: 3, FirstByteDelay: time.Millisecond, Parallel: 4}, "")
	loadCaddy(t, lines)
	waitKnown(t, fs)

	var victim atomic.Pointer[fakeollama.Server]
	var killedAt time.Duration
	var inFlightAtKill, servedAtKill int
	var victimName string
	start := time.Now()
	outs := chaosLoad(total, conc, func(n int64) {
		if n != total/3 {
			return
		}
		// The server with the most requests in flight now (the other workers keep going).
		i := 0
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
			for j, f := range fs {
				if f.InFlight() > fs[i].InFlight() {
					i = j
				}
			}
			if fs[i].InFlight() > 0 {
				break
			}
		}
		f := fs[i]
		victim.Store(f)
		killedAt, inFlightAtKill, victimName = time.Since(start), f.InFlight(), string(rune('a'+i))
		f.Close()                           // a dead box: listener closed, open connections cut
		servedAtKill = f.Count("/api/chat") // received, at most: nothing arrives after Close
	})
	elapsed := time.Since(start)
	failed, some := failures(outs)
	served := servedBy(outs)
	dead := victim.Load()
	require.NotNil(t, dead)
	srv := pooled(t, dead.URL)
	require.NotNil(t, srv)
	attempts := 0
	for _, f := range fs {
		attempts += f.Count("/api/chat")
	}
	t.Logf("FIGURE kill 1 of 3: %d non-streaming requests at concurrency %d; %s killed after %d requests (%.1fs) with %d in flight on it (%d received in all): failed %d (target 0); served a=%d b=%d c=%d; the fakes received %d requests (%d retried after the kill); %s is %s; %.0f req/s over %.1fs",
		total, conc, victimName, total/3, killedAt.Seconds(), inFlightAtKill, servedAtKill, failed, served["a"], served["b"], served["c"],
		attempts, attempts-total, victimName, healthState(srv.state.Load()), float64(total)/elapsed.Seconds(), elapsed.Seconds())
	assert.Zero(t, failed, "failed requests: %v", some)
	assert.Equal(t, stateUnhealthy, healthState(srv.state.Load()), "the dead server's breaker is open")
	assert.Positive(t, inFlightAtKill, "requests were in flight on the server killed")
	assert.LessOrEqual(t, served[victimName], servedAtKill, "nothing served by the dead server after the kill")
}

// TestChaosFastFailingServer: one of three servers answers 503 "server busy" in 1 ms. A
// balancer that counts connections sends it the most traffic, since it always looks idle.
// Target: after its breaker first opens (or over the whole run, if the policy keeps it from
// ever opening) it receives under 2% of the requests, and no client sees an error. Two variants: it fails everything (probes too: the breaker stays open), and it
// fails only inference while its health probe passes, so the active checker closes the breaker
// every couple of health_interval and it must be caught again each time.
func TestChaosFastFailingServer(t *testing.T) {
	for _, tc := range []struct {
		name  string
		paths []string
	}{
		{"everything", nil},
		{"inference only, probes pass", fakeollama.Completions},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const total, conc = 8_000, 16
			fs, lines := chaosFakes(t, 3, fakeollama.Config{Tokens: 3, FirstByteDelay: 2 * time.Millisecond}, "health_interval 250ms")
			loadCaddy(t, lines)
			waitKnown(t, fs)
			bad := fs[0]
			bad.FailAfter(time.Millisecond, http.StatusServiceUnavailable, fakeollama.ServerBusy, tc.paths...)
			srv := pooled(t, bad.URL)
			require.NotNil(t, srv)

			// Watch for the breaker's first opening; note what bad had received and what the
			// clients had sent by then.
			var sent atomic.Int64
			var openSent, openBad atomic.Int64
			openSent.Store(-1)
			stop := make(chan struct{})
			watched := make(chan struct{})
			go func() {
				defer close(watched)
				for {
					if healthState(srv.state.Load()) == stateUnhealthy {
						openBad.Store(int64(bad.Count("/api/chat")))
						openSent.Store(sent.Load())
						return
					}
					select {
					case <-stop:
						return
					case <-time.After(100 * time.Microsecond):
					}
				}
			}()
			outs := chaosLoad(total, conc, func(n int64) { sent.Store(n) })
			close(stop)
			<-watched

			// A policy may avoid the server so well that its breaker never opens (passing
			// probes clear its failure run): then the share is over the whole run.
			opened := fmt.Sprintf("breaker opened after %d requests; then", openSent.Load())
			if openSent.Load() < 0 {
				opened = "breaker never opened (the policy kept it below fail_threshold); over the whole run"
				openSent.Store(0)
			}
			after := float64(total) - float64(openSent.Load())
			reached := float64(int64(bad.Count("/api/chat")) - openBad.Load())
			share := reached / after
			failed, some := failures(outs)
			t.Logf("FIGURE fast-failing server (%s): %s it received %.0f of %.0f requests = %.2f%% (target < 2%%); %d attempts in all = %.2f%% of %d requests; client errors %d (target 0); served %v",
				tc.name, opened, reached, after, 100*share, bad.Count("/api/chat"), 100*float64(bad.Count("/api/chat"))/total, total, failed, servedBy(outs))
			assert.Less(t, share, 0.02)
			assert.Zero(t, failed, "client errors: %v", some)
		})
	}
}

// TestChaosBurst: a burst of 4× the pool's total max_parallel arrives at once. The fakes have
// exactly max_parallel slots and no queue of their own, so any request the proxy sends beyond
// its caps comes back 503 "server busy". Targets: no backend 503; every request beyond the slots
// and max_queue is answered 429; the queued ones are dispatched the moment a slot frees, so
// their wait is whole service times (p99 printed, bounded by two service times and a margin).
func TestChaosBurst(t *testing.T) {
	const service = 400 * time.Millisecond
	const perBackend, backends = 4, 3
	const slots = perBackend * backends
	const burst = 4 * slots
	for _, tc := range []struct {
		name     string
		maxQueue int
	}{
		{"max_queue 24", 2 * slots}, // 12 served, 24 queued, 12 turned away
		{"default max_queue", 0},    // 256: everyone waits
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := fakeollama.Config{Tokens: 1, FirstByteDelay: service, Parallel: perBackend, MaxQueue: -1, History: 1000}
			fs, lines := chaosFakes(t, backends, cfg, fmt.Sprintf("max_parallel %d", perBackend))
			if tc.maxQueue > 0 {
				lines = fmt.Sprintf("max_queue %d\n%s", tc.maxQueue, lines)
			}
			// The burst stands for many clients, but all come from loopback:
			// the per-client share (queue_test.go) is not what is measured.
			lines = fmt.Sprintf("max_queue_per_client %d\n%s", cmpOr(tc.maxQueue, defaultMaxQueue), lines)
			loadCaddy(t, lines)
			waitKnown(t, fs)

			outs := make([]outcome, burst)
			var wg sync.WaitGroup
			gate := make(chan struct{})
			for i := range burst {
				wg.Go(func() {
					<-gate
					outs[i] = chaosSend(context.Background(), "/api/chat", chaosChat, fmt.Sprint(i))
				})
			}
			close(gate)
			wg.Wait()

			// Queue wait: from the client's send to the fake's receipt (the proxy adds well
			// under a millisecond besides).
			arrived := map[string]time.Time{}
			rejected := 0
			for _, f := range fs {
				rejected += f.Rejected()
				for _, r := range f.Requests() {
					if id := r.Header.Get("X-Chaos-Id"); id != "" {
						arrived[id] = r.At
					}
				}
			}
			var waits []time.Duration
			status := map[int]int{}
			for i, o := range outs {
				status[o.status]++
				if o.ok() {
					waits = append(waits, arrived[fmt.Sprint(i)].Sub(o.sent))
				}
			}
			wantQueued := min(burst-slots, cmpOr(tc.maxQueue, defaultMaxQueue))
			t.Logf("FIGURE burst of %d (4 × %d slots, max_queue %d): backend 503s %d (target 0); answered 200: %d, 429: %d (expected %d), other: %v; queue wait p50 %v p99 %v max %v (service time %v)",
				burst, slots, cmpOr(tc.maxQueue, defaultMaxQueue), rejected, status[200], status[429], burst-slots-wantQueued, status,
				quantile(waits, 0.5).Round(time.Millisecond), quantile(waits, 0.99).Round(time.Millisecond), quantile(waits, 1).Round(time.Millisecond), service)
			assert.Zero(t, rejected, "backend 503s")
			assert.Zero(t, status[http.StatusServiceUnavailable], "503s reached the clients")
			for _, o := range outs {
				if o.status == 0 {
					t.Errorf("client error: %s", o.err)
				}
			}
			assert.Equal(t, slots+wantQueued, status[http.StatusOK])
			assert.Equal(t, burst-slots-wantQueued, status[http.StatusTooManyRequests])
			for _, f := range fs {
				assert.LessOrEqual(t, f.MaxBusy(), perBackend)
			}
			// The ideal is whole rounds of service: the last round waits for
			// rounds-1 of them. A round is measured side by side, not assumed
			// to be the fake's nominal 400 ms: it is the slowest full exchange
			// (send to answer read) of the requests that found a slot free,
			// under the same load as the queued ones. On a busy 2-core CI
			// machine with -race a round took well over 400 ms and the
			// nominal target (800 ms + 300 ms) failed at 1.166 s with no
			// polling in sight. The 300 ms allowance still catches a
			// dispatcher that polls.
			var firstRound []time.Duration
			for i, o := range outs {
				if o.ok() && arrived[fmt.Sprint(i)].Sub(o.sent) < service/2 {
					firstRound = append(firstRound, o.took)
				}
			}
			require.NotEmpty(t, firstRound, "some requests found a free slot")
			round := max(quantile(firstRound, 1), service)
			rounds := (slots + wantQueued + slots - 1) / slots
			t.Logf("FIGURE burst of %d: measured round %v (service %v), queue wait p99 %v, target below %v", burst, round.Round(time.Millisecond), service,
				quantile(waits, 0.99).Round(time.Millisecond), (time.Duration(rounds-1)*round + 300*time.Millisecond).Round(time.Millisecond))
			assert.Less(t, quantile(waits, 0.99), time.Duration(rounds-1)*round+300*time.Millisecond,
				"queued requests are dispatched when a slot frees, not after a polling interval")
		})
	}
}

func cmpOr(v, fallback int) int {
	if v != 0 {
		return v
	}
	return fallback
}

// TestChaosHangAfterHeaders: a server sends 200 and its headers, then nothing. Targets: the
// stream ends within stream_idle_timeout (plus a margin) with an error in the API's format (an
// {"error":…} line, a data: {"error":{…}} event; no transport error, no done marker), and the
// server is marked failed.
func TestChaosHangAfterHeaders(t *testing.T) {
	const idle = 500 * time.Millisecond
	for _, path := range []string{"/api/chat", "/v1/chat/completions"} {
		t.Run(strings.Trim(path, "/"), func(t *testing.T) {
			fs, lines := chaosFakes(t, 2, fakeollama.Config{Tokens: 3}, "fail_threshold 1\nhealth_interval 1h")
			hang, ok := fs[0], fs[1]
			loadCaddy(t, fmt.Sprintf("lb_policy first\nstream_idle_timeout %s\n%s", idle, lines))
			waitKnown(t, fs)
			hang.HangAfterHeaders(fakeollama.Completions...)

			start := time.Now()
			res, err := chaosClient.Post(siteURL+path, "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true}`))
			require.NoError(t, err)
			body, readErr := io.ReadAll(res.Body)
			res.Body.Close()
			took := time.Since(start)
			srv := pooled(t, hang.URL)
			require.NotNil(t, srv)
			t.Logf("FIGURE hang after headers (%s): status %d from %s, stream ended after %v (stream_idle_timeout %v), read error %v, body %q; server %s (fail streak %d)",
				path, res.StatusCode, res.Header.Get("X-OllamaFlow-Backend"), took.Round(time.Millisecond), idle, readErr, body,
				healthState(srv.state.Load()), srv.failStreak.Load())
			assert.Equal(t, http.StatusOK, res.StatusCode)
			assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
			assert.GreaterOrEqual(t, took, idle)
			assert.Less(t, took, idle+500*time.Millisecond, "the stall is cut at stream_idle_timeout")
			assert.NoError(t, readErr, "the stream ends cleanly, with an error in it")
			wantErr := `{"error":"backend a sent nothing for 500ms (stream_idle_timeout)`
			if strings.HasPrefix(path, "/v1/") {
				wantErr = `data: {"error":{"code":"stream_stalled","message":"backend a sent nothing for 500ms (stream_idle_timeout)`
			}
			assert.True(t, strings.HasPrefix(string(body), wantErr), "the client is told the answer is incomplete")
			assert.NotContains(t, string(body), "[DONE]")
			assert.NotContains(t, string(body), `"done":true`)
			assert.Equal(t, stateUnhealthy, healthState(srv.state.Load()), "the hanging server is marked failed")
			require.Eventually(t, func() bool { return len(hang.Cancellations()) == 1 }, 5*time.Second, 5*time.Millisecond,
				"the upstream request is cancelled")

			// The next request goes to the other server.
			o := chaosSend(context.Background(), "/api/chat", chaosChat, "")
			assert.True(t, o.ok(), o.err)
			assert.Equal(t, "b", o.backend)
			assert.Zero(t, ok.Count("/api/chat")-1)
		})
	}
}

// TestChaosClientDisconnect: clients that go away mid-stream. Target: each upstream request is
// cancelled within 100 ms of the client closing its connection (the fake records when its
// request context was cancelled), the slot is given back, and the server is not blamed.
func TestChaosClientDisconnect(t *testing.T) {
	const rounds = 20
	fs, lines := chaosFakes(t, 1, fakeollama.Config{Tokens: 10_000, TokenGap: 5 * time.Millisecond}, "")
	f := fs[0]
	loadCaddy(t, lines)
	waitKnown(t, fs)

	var lags []time.Duration
	for i := range rounds {
		path, body := "/api/generate", `{"model":"tiny-llama","prompt":"hi"}`
		if i%2 == 1 {
			path, body = "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true}`
		}
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, siteURL+path, strings.NewReader(body))
		res, err := chaosClient.Do(req)
		require.NoError(t, err)
		sc := bufio.NewScanner(res.Body)
		for n := 0; n < 3 && sc.Scan(); n++ { // a few chunks: the stream is flowing
		}
		closed := time.Now()
		cancel()
		res.Body.Close()
		require.Eventually(t, func() bool { return len(f.Cancellations()) == i+1 }, 5*time.Second, time.Millisecond,
			"request %d: the upstream request was not cancelled", i)
		c := f.Cancellations()[i]
		lags = append(lags, c.CancelledAt.Sub(closed))
		assert.Less(t, c.Chunks, 10_000)
	}
	srv := pooled(t, f.URL)
	require.NotNil(t, srv)
	require.Eventually(t, func() bool { return srv.inFlight.Load() == 0 && f.InFlight() == 0 }, 5*time.Second, time.Millisecond,
		"slots are given back")
	t.Logf("FIGURE client disconnect mid-stream, %d streams (native and OpenAI): upstream cancelled after p50 %v, max %v (target ≤ 100ms); fail streak %d",
		rounds, quantile(lags, 0.5).Round(10*time.Microsecond), quantile(lags, 1).Round(10*time.Microsecond), srv.failStreak.Load())
	assert.LessOrEqual(t, quantile(lags, 1), 100*time.Millisecond)
	assert.Zero(t, srv.failStreak.Load(), "a client that leaves is not the server's failure")
	assert.Equal(t, stateHealthy, healthState(srv.state.Load()))
}

// watchHealth samples the servers' health every 100µs until stop is closed and returns how
// many times each was seen unhealthy.
func watchHealth(srvs []*server, stop <-chan struct{}) <-chan []int {
	out := make(chan []int, 1)
	go func() {
		downs := make([]int, len(srvs))
		for {
			for i, s := range srvs {
				if healthState(s.state.Load()) == stateUnhealthy {
					downs[i]++
				}
			}
			select {
			case <-stop:
				out <- downs
				return
			case <-time.After(100 * time.Microsecond):
			}
		}
	}()
	return out
}

// TestChaosCraftedFiveHundreds: while honest traffic runs over three servers, a client sends 50
// requests that server a cannot serve (a num_ctx it has no memory for: Ollama answers 500
// "model requires more system memory …"), steered onto a with a label. Targets: a answers all
// 50 with 500 (they pass through to the client that asked), no server ever leaves rotation, and
// no honest request fails. The honest load (12 at once on three servers of 4 slots) needs a's
// slots too, so a that is avoided after its 500s shows as a serving no honest request; with
// fewer clients than b's and c's slots, least_delay rightly leaves a idle, and whether a served
// any would say nothing about its health.
func TestChaosCraftedFiveHundreds(t *testing.T) {
	const honest, conc, crafted = 3000, 12, 50
	var fs []*fakeollama.Server
	for i := range 3 {
		cfg := fakeollama.Config{Models: []string{"tiny-llama"}, Loaded: []string{"tiny-llama"}, Tokens: 3, FirstByteDelay: time.Millisecond, Parallel: 4}
		if i == 0 {
			cfg.MaxContext = 8192 // only a lacks the memory
		}
		f := fakeollama.New(cfg)
		t.Cleanup(f.Close)
		fs = append(fs, f)
	}
	// The honest load repeats one chat body, which conversation affinity
	// would take for one conversation and keep on one server; this scenario
	// is about passive health, so the policy alone spreads it.
	loadCaddy(t, fmt.Sprintf("conversation_affinity off\nbackend a %s {\nlabels small\n}\nbackend b %s\nbackend c %s", fs[0].URL, fs[1].URL, fs[2].URL))
	waitKnown(t, fs)
	var srvs []*server
	for _, f := range fs {
		srvs = append(srvs, pooled(t, f.URL))
	}

	stop := make(chan struct{})
	downs := watchHealth(srvs, stop)
	var craftedStatus sync.Map
	var wg sync.WaitGroup
	wg.Go(func() {
		// Five at a time, so that a's answers come in runs, as an attacker would send them.
		var inner sync.WaitGroup
		for i := range crafted {
			inner.Go(func() {
				req, _ := http.NewRequest(http.MethodPost, siteURL+"/api/chat", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_ctx":10000000}}`))
				req.Header.Set("X-OllamaFlow-Label", "small")
				res, err := chaosClient.Do(req)
				if err != nil {
					craftedStatus.Store(i, err.Error())
					return
				}
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				craftedStatus.Store(i, fmt.Sprintf("%d %s %s", res.StatusCode, res.Header.Get("X-OllamaFlow-Backend"), bytes.TrimSpace(body)))
			})
			if i%5 == 4 {
				inner.Wait()
			}
		}
		inner.Wait()
	})
	outs := chaosLoad(honest, conc, nil)
	wg.Wait()
	close(stop)
	seenDown := <-downs

	fiveHundreds := 0
	craftedStatus.Range(func(_, v any) bool {
		if strings.HasPrefix(v.(string), "500 a ") && strings.Contains(v.(string), "model requires more system memory") {
			fiveHundreds++
		}
		return true
	})
	failed, some := failures(outs)
	served := servedBy(outs)
	t.Logf("FIGURE crafted 500s: %d requests with num_ctx 10M steered onto a amid %d honest requests at concurrency %d: a answered 500 to %d (target %d); samples with a server out of rotation a=%d b=%d c=%d (target 0); honest failures %d (target 0); honest served a=%d b=%d c=%d; a's fail streak %d",
		crafted, honest, conc, fiveHundreds, crafted, seenDown[0], seenDown[1], seenDown[2], failed, served["a"], served["b"], served["c"], srvs[0].failStreak.Load())
	assert.Equal(t, crafted, fiveHundreds)
	assert.Equal(t, []int{0, 0, 0}, seenDown, "no server left rotation")
	assert.Zero(t, failed, "honest failures: %v", some)
	assert.Positive(t, served["a"], "a kept serving honest traffic")
}

// TestChaosBusyServerKeepsServing: server "busy" has 2 slots and no queue of its own, so under
// load it answers 503 "server busy" to anything beyond them (Ollama with OLLAMA_MAX_QUEUE
// reached); server "ok" has room. The proxy does not know busy's capacity (no max_parallel).
// Targets: no client error (each 503 moves on to ok), busy never leaves rotation and serves
// throughout the overload, and once the overload ends it serves again within the back-off.
func TestChaosBusyServerKeepsServing(t *testing.T) {
	const total, conc = 3000, 12
	busy := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Loaded: []string{"tiny-llama"}, Tokens: 3, FirstByteDelay: 20 * time.Millisecond, Parallel: 2, MaxQueue: -1})
	t.Cleanup(busy.Close)
	ok := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Loaded: []string{"tiny-llama"}, Tokens: 3, FirstByteDelay: 20 * time.Millisecond, Parallel: 16})
	t.Cleanup(ok.Close)
	loadCaddy(t, fmt.Sprintf("lb_policy round_robin\nbackend busy %s\nbackend ok %s", busy.URL, ok.URL))
	fs := []*fakeollama.Server{busy, ok}
	waitKnown(t, fs)
	sb := pooled(t, busy.URL)

	stop := make(chan struct{})
	downs := watchHealth([]*server{sb}, stop)
	start := time.Now()
	outs := chaosLoad(total, conc, nil)
	elapsed := time.Since(start)
	ended := time.Now()
	failed, some := failures(outs)
	served := servedBy(outs)
	rejected := busy.Rejected()

	// Overload over: the next requests (round robin) reach busy again once its back-off ends.
	var back time.Duration
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		o := chaosSend(context.Background(), "/api/chat", chaosChat, "")
		require.True(t, o.ok(), o.err)
		if o.backend == "busy" {
			back = time.Since(ended)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	seenDown := <-downs
	t.Logf("FIGURE busy server: %d requests at concurrency %d over %.1fs to busy (2 slots, no queue) and ok: busy answered 503 %d times, served %d (%.1f/s) during the overload; samples with busy out of rotation %d (target 0); client errors %d (target 0); after the overload busy served again %v after it ended (target ≤ %v back-off + 500ms); fail streak %d",
		total, conc, elapsed.Seconds(), rejected, served["busy"], float64(served["busy"])/elapsed.Seconds(), seenDown[0], failed, back.Round(time.Millisecond), busyBackoff, sb.failStreak.Load())
	assert.Positive(t, rejected, "busy was overloaded")
	assert.Zero(t, seenDown[0], "busy never left rotation")
	assert.Zero(t, failed, "client errors: %v", some)
	assert.Positive(t, served["busy"], "busy served during the overload")
	assert.Positive(t, back, "busy served after the overload")
	assert.LessOrEqual(t, back, busyBackoff+500*time.Millisecond)
}
