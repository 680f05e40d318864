package ollamaflow

// Integration tests: a real Caddy in-process (caddytest) loaded from a
// Caddyfile, fake Ollama servers on 127.0.0.1, and a client that talks HTTP
// to the site. They cannot run in parallel: there is one Caddy. Its admin
// and site ports are picked free at start, so two test processes (or
// another suite on caddytest's default 2999) never meet.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

var (
	adminPort, sitePort, tlsPort = freePort(), freePort(), freePort()
	siteURL                      = fmt.Sprintf("http://127.0.0.1:%d", sitePort)
)

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// caddyConfig is a whole Caddyfile: one site whose ollamaflow block holds
// body.
func caddyConfig(body string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	skip_install_trust
}
:%d {
	ollamaflow {
%s
	}
}
`, adminPort, sitePort, tlsPort, sitePort, body)
}

// loadCaddy (re)loads the in-process Caddy with caddyConfig(body).
func loadCaddy(t *testing.T, body string) {
	t.Helper()
	cfg := caddyConfig(body)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: adminPort, LoadRequestTimeout: 30 * time.Second})
	tester.InitServer(cfg, "caddyfile")
	require.False(t, t.Failed(), "caddy did not load the config")
	dropIdleConnections()
}

// testClients are the clients tests share across configs. A load stops
// the old config's server, which closes its idle keep-alive connections;
// a client that picks one before it has seen the close writes a POST on a
// dead connection and, as POSTs are not retried, gets EOF. Dropping them
// after every load keeps one test's connections out of the next.
var testClients = []*http.Client{client}

func dropIdleConnections() {
	for _, c := range testClients {
		c.CloseIdleConnections()
	}
}

// loadCaddyRaw posts a Caddyfile to /load without caddytest's checks, for
// reload tests that must not wait a second between loads.
func loadCaddyRaw(t *testing.T, cfg string) {
	t.Helper()
	if res, err := http.Get(fmt.Sprintf("http://localhost:%d/config/", adminPort)); err == nil {
		res.Body.Close()
	} else {
		// No Caddy yet: caddytest starts it in-process with this config.
		caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: adminPort, LoadRequestTimeout: 30 * time.Second}).InitServer(cfg, "caddyfile")
		require.False(t, t.Failed(), "caddy did not load the config")
		return
	}
	res, err := adminRequest(http.MethodPost, "/load", "text/caddyfile", cfg)
	require.NoError(t, err)
	defer res.Body.Close()
	msg, _ := io.ReadAll(res.Body)
	require.Equal(t, http.StatusOK, res.StatusCode, string(msg))
	dropIdleConnections()
}

// adminRequest sends a request to Caddy's admin API on a connection of
// its own, and again (three times at most) if it closed unanswered. Each
// config change starts a new admin server on the listener and stops the
// old one from a goroutine; its Shutdown closes the connections idle
// between requests, and a request written on one just then was never
// read (one in 25 runs of the admin tests beside a browser test: EOF on
// a POST, which the client does not send again itself). Shutdown waits
// for a request being handled, so an unanswered one was not, and sending
// it again is safe whatever its method.
func adminRequest(method, path, contentType, body string) (*http.Response, error) {
	var err error
	for range 3 {
		var req *http.Request
		req, err = http.NewRequest(method, fmt.Sprintf("http://localhost:%d%s", adminPort, path), strings.NewReader(body))
		if err != nil {
			return nil, err
		}
		if contentType != "" {
			req.Header.Set("Content-Type", contentType)
		}
		req.Close = true
		var res *http.Response
		if res, err = http.DefaultClient.Do(req); err == nil {
			return res, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, err
}

var client = &http.Client{Timeout: 30 * time.Second}

func post(t *testing.T, path, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	return send(t, http.MethodPost, siteURL+path, body, hdr...)
}

// postAfterReload is post for the first request after a reload. Caddy stops
// the old config's server without waiting for its Shutdown to begin, so for
// a moment both servers accept on the shared listener; a connection the old
// one accepts is closed unanswered once it reads the request (net/http's
// conn.serve returns when its server is shutting down), and the client sees
// EOF on a fresh connection before our handler is reached. That is the one
// error retried here, once; anything else fails as in post.
func postAfterReload(t *testing.T, path, body string) (*http.Response, string) {
	t.Helper()
	res, b, err := trySend(t, http.MethodPost, siteURL+path, body)
	if errors.Is(err, io.EOF) {
		t.Logf("POST %s: %v (a connection the old server accepted as it shut down); once more", path, err)
		return post(t, path, body)
	}
	require.NoError(t, err)
	return res, b
}

// send makes one request with header name/value pairs and reads the answer.
func send(t *testing.T, method, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	res, b, err := trySend(t, method, url, body, hdr...)
	require.NoError(t, err)
	return res, b
}

// trySend is send, reporting an error of the round trip instead of failing
// the test on it.
func trySend(t *testing.T, method, url, body string, hdr ...string) (*http.Response, string, error) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	res, err := client.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return res, string(b), nil
}

// currentHandler finds the handler of the loaded config through the
// servers it uses: the queue of the newest handler listens on them.
func currentHandler(t *testing.T) *Handler {
	t.Helper()
	var newest *Handler
	servers.Range(func(_, v any) bool {
		s := v.(*server)
		s.queuesMu.Lock()
		for q := range s.queues {
			q.mu.Lock()
			if !q.closed {
				newest = q.h
			}
			q.mu.Unlock()
		}
		s.queuesMu.Unlock()
		return true
	})
	require.NotNil(t, newest, "no live handler")
	return newest
}

func pooled(t *testing.T, url string) *server {
	t.Helper()
	var found *server
	servers.Range(func(k, v any) bool {
		if k == url {
			found = v.(*server)
			return false
		}
		return true
	})
	return found
}

func waitHealthy(t *testing.T, url string, want healthState) *server {
	t.Helper()
	var s *server
	require.Eventually(t, func() bool {
		s = pooled(t, url)
		return s != nil && healthState(s.state.Load()) == want
	}, 30*time.Second, 10*time.Millisecond, "%s never became %s", url, want) // generous: a loaded machine probes late
	return s
}

const chatBody = `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`

// gatedBackend streams one chunk, then waits for the test to open the gate
// before sending the rest: if the proxy buffered, the client would never
// see the first chunk while the gate is shut.
func gatedBackend(t *testing.T) (*httptest.Server, chan struct{}) {
	gate := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/chat":
			w.Header().Set("Content-Type", "application/x-ndjson")
			fmt.Fprintln(w, `{"model":"tiny-llama","created_at":"2026-11-25T00:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}`)
			w.(http.Flusher).Flush()
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
			fmt.Fprintln(w, `{"model":"tiny-llama","created_at":"2026-11-25T00:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":2}`)
		case "/v1/chat/completions":
			w.Header().Set("Content-Type", "text/event-stream")
			fmt.Fprint(w, "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n")
			w.(http.Flusher).Flush()
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
			fmt.Fprint(w, "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n")
			fmt.Fprint(w, "data: [DONE]\n\n")
		case "/api/tags":
			fmt.Fprint(w, `{"models":[{"name":"tiny-llama:latest","model":"tiny-llama:latest","modified_at":"2026-11-25T00:00:00Z","size":1,"digest":"abc","details":{}}]}`)
		case "/api/ps":
			fmt.Fprint(w, `{"models":[]}`)
		default:
			w.WriteHeader(http.StatusOK)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, gate
}

func TestIntegrationStreamsChunkByChunk(t *testing.T) {
	for _, tc := range []struct{ path, first, last string }{
		{"/api/chat", `"content":"Hel"`, `"done":true`},
		{"/v1/chat/completions", `"content":"Hel"`, "data: [DONE]"},
	} {
		t.Run(strings.Trim(tc.path, "/"), func(t *testing.T) {
			backend, gate := gatedBackend(t)
			loadCaddy(t, fmt.Sprintf("backend gated %s", backend.URL))

			res, err := client.Post(siteURL+tc.path, "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":true}`))
			require.NoError(t, err)
			defer res.Body.Close()
			require.Equal(t, http.StatusOK, res.StatusCode)
			assert.Equal(t, "gated", res.Header.Get("X-OllamaFlow-Backend"))

			lines := make(chan string, 16)
			go func() {
				defer close(lines)
				sc := bufio.NewScanner(res.Body)
				for sc.Scan() {
					if sc.Text() != "" {
						lines <- sc.Text()
					}
				}
			}()
			select {
			case first := <-lines:
				assert.Contains(t, first, tc.first)
			case <-time.After(10 * time.Second):
				t.Fatal("the first chunk did not reach the client while the backend held the rest: the proxy buffers")
			}
			close(gate)
			var rest []string
			for l := range lines {
				rest = append(rest, l)
			}
			require.NotEmpty(t, rest)
			assert.Contains(t, rest[len(rest)-1], tc.last)
		})
	}
}

func TestIntegrationRoutingAndErrors(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		allow_embeddings false
		labels gpu
		models tiny-llama
		max_request_body 1KiB
		backend a %s {
			labels gpu eu
			bearer_token backend-secret
			header X-Api-Key k1
			query token=q1
		}`, a.URL))

	res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`,
		"Authorization", "Bearer client-secret", "X-OllamaFlow-Label", "GPU")
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
	assert.Contains(t, body, `"done":true`)
	// The last request to /api/chat: discovery reads the lists meanwhile.
	last, ok := lastRequestTo(a, "/api/chat")
	require.True(t, ok)
	assert.Equal(t, "Bearer backend-secret", last.Header.Get("Authorization"), "the client's token is replaced by the backend's")
	assert.Equal(t, "k1", last.Header.Get("X-Api-Key"))
	assert.Equal(t, "token=q1", last.RawQuery)
	assert.Equal(t, "127.0.0.1", last.Header.Get("X-Forwarded-For"))

	// GET / and HEAD / answer locally; /api/version comes from a backend.
	r, err := client.Get(siteURL + "/")
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	assert.Equal(t, "Ollama is running", string(b))
	r, err = client.Head(siteURL + "/")
	require.NoError(t, err)
	r.Body.Close()
	assert.Equal(t, http.StatusOK, r.StatusCode)
	r, err = client.Get(siteURL + "/api/version")
	require.NoError(t, err)
	b, _ = io.ReadAll(r.Body)
	r.Body.Close()
	assert.JSONEq(t, `{"version":"0.17.4"}`, string(b))
	assert.Equal(t, "a", r.Header.Get("X-OllamaFlow-Backend"))

	cases := []struct {
		name, method, path, body string
		hdr                      []string
		status                   int
		msg                      string
	}{
		{"unknown path", "GET", "/api/nope", "", nil, 404, "unknown path"},
		{"wrong method", "GET", "/api/chat", "", nil, 405, "use POST"},
		{"not json", "POST", "/api/chat", "hello", nil, 400, "JSON object"},
		{"no model", "POST", "/v1/chat/completions", `{"messages":[]}`, nil, 400, "must name a model"},
		{"model not allowed", "POST", "/api/chat", `{"model":"llama3:70b"}`, nil, 403, `"llama3:70b" is not allowed`},
		{"embeddings off", "POST", "/v1/embeddings", `{"model":"tiny-llama","input":"x"}`, nil, 403, "embedding requests are not allowed"},
		{"management off", "POST", "/api/pull", `{"model":"tiny-llama"}`, nil, 403, "allow_model_management"},
		{"too large", "POST", "/api/chat", `{"model":"tiny-llama","prompt":"` + strings.Repeat("x", 2000) + `"}`, nil, 413, "max_request_body"},
		{"labels nobody has", "POST", "/api/chat", chatBody, []string{"X-OllamaFlow-Label", "us"}, 503, "labels gpu, us"},
		{"label substring", "POST", "/api/chat", chatBody, []string{"X-OllamaFlow-Label", "e"}, 503, "labels"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest(c.method, siteURL+c.path, strings.NewReader(c.body))
			for i := 0; i+1 < len(c.hdr); i += 2 {
				req.Header.Set(c.hdr[i], c.hdr[i+1])
			}
			res, err := client.Do(req)
			require.NoError(t, err)
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			assert.Equal(t, c.status, res.StatusCode, string(b))
			var msg string
			if strings.HasPrefix(c.path, "/v1/") {
				var e struct {
					Error struct{ Message, Type string } `json:"error"`
				}
				require.NoError(t, json.Unmarshal(b, &e), string(b))
				assert.NotEmpty(t, e.Error.Type)
				msg = e.Error.Message
			} else {
				var e struct{ Error string }
				require.NoError(t, json.Unmarshal(b, &e), string(b))
				msg = e.Error
			}
			assert.Contains(t, msg, c.msg)
			if c.status == 405 {
				assert.Equal(t, "POST", res.Header.Get("Allow"))
			}
			if c.status == 503 {
				assert.NotEmpty(t, res.Header.Get("Retry-After"))
			}
		})
	}
}

func TestIntegrationRetriesAndPassThrough(t *testing.T) {
	busy := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer busy.Close()
	ok := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer ok.Close()
	missing := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer missing.Close()
	busy.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)
	loadCaddy(t, fmt.Sprintf(`
		lb_policy first
		backend busy %s {
			fail_threshold 1000
		}
		backend missing %s
		backend ok %s`, busy.URL, missing.URL, ok.URL))
	// missing loses the model after the proxy has read its list: the
	// proxy only learns of it from the 404.
	sm := waitHealthy(t, missing.URL, stateHealthy)
	require.Eventually(t, func() bool { has, _ := sm.models.Load().has("tiny-llama:latest"); return has }, 5*time.Second, 5*time.Millisecond)
	missing.SetModels("other")

	// busy answers 503, missing lacks the model: both are skipped.
	res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "ok", res.Header.Get("X-OllamaFlow-Backend"))
	assert.Equal(t, 1, busy.Count("/api/chat"))
	assert.Equal(t, 1, missing.Count("/api/chat"))
	require.Eventually(t, func() bool { has, _ := sm.models.Load().has("tiny-llama:latest"); return !has }, 5*time.Second, 5*time.Millisecond,
		"the 404 made the proxy reread missing's list")

	// With every backend busy, the last attempt's own answer passes through.
	ok.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy)
	missing.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy)
	res, body = post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false}`)
	assert.Equal(t, http.StatusServiceUnavailable, res.StatusCode)
	assert.Equal(t, fakeollama.ServerBusy, strings.TrimSpace(body))

	// Every backend down: 502 in the API's format.
	busy.Close()
	ok.Close()
	missing.Close()
	res, body = post(t, "/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusBadGateway, res.StatusCode, body)
	assert.Contains(t, body, `"type":"server_error"`)
	assert.NotContains(t, body, "127.0.0.1", "the cause is in words, without the backends' addresses")
}

func TestIntegrationFailoverWithoutClientErrors(t *testing.T) {
	var fakes []*fakeollama.Server
	var lines []string
	for _, name := range []string{"a", "b", "c"} {
		f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3})
		defer f.Close()
		fakes = append(fakes, f)
		lines = append(lines, fmt.Sprintf("backend %s %s {\n health_interval 100ms\n}", name, f.URL))
	}
	loadCaddy(t, strings.Join(lines, "\n"))

	const total, workers = 300, 8
	var sent, failed atomic.Int32
	var mu sync.Mutex
	var failures []string
	served := map[string]int{}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sent.Add(1) <= total {
				res, err := client.Post(siteURL+"/api/chat", "application/json",
					strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":false}`))
				if err != nil {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, err.Error())
					mu.Unlock()
					continue
				}
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				mu.Lock()
				if res.StatusCode != http.StatusOK || !bytes.Contains(b, []byte(`"done":true`)) {
					failed.Add(1)
					failures = append(failures, fmt.Sprintf("%d %s", res.StatusCode, b))
				}
				served[res.Header.Get("X-OllamaFlow-Backend")]++
				mu.Unlock()
			}
		}()
	}
	require.Eventually(t, func() bool { return sent.Load() > 60 }, 10*time.Second, time.Millisecond)
	fakes[1].Close() // b dies mid-run
	wg.Wait()

	assert.Zero(t, failed.Load(), "client errors: %v", failures)
	assert.Equal(t, total, served["a"]+served["b"]+served["c"])
	assert.Positive(t, served["b"], "b served requests before it died")
	t.Logf("served: %v", served)
	// b is out of rotation: its breaker opened from the failed attempts, or
	// (if the policy sent it nothing after its death) the active checker
	// found it down.
	s := pooled(t, "http://"+fakes[1].HostPort())
	require.NotNil(t, s)
	assert.Eventually(t, func() bool { return healthState(s.state.Load()) == stateUnhealthy }, 5*time.Second, 10*time.Millisecond)
}

func TestIntegrationReloadKeepsServerState(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	gone := fakeollama.New(fakeollama.Config{})
	gone.Close() // a dead address: its first probe fails
	c := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer c.Close()
	d := fakeollama.New(fakeollama.Config{})
	defer d.Close()

	backends := func(extra string) string {
		return fmt.Sprintf(`
		backend a %s {
			health_interval 1h
		}
		backend gone %s {
			health_interval 1h
		}
		%s`, a.URL, "http://"+gone.HostPort(), extra)
	}
	loadCaddy(t, backends(fmt.Sprintf("backend d %s {\n health_interval 1h\n}", d.URL)))
	sa := waitHealthy(t, a.URL, stateHealthy)
	sg := waitHealthy(t, "http://"+gone.HostPort(), stateUnhealthy)
	waitHealthy(t, d.URL, stateHealthy)
	require.Equal(t, 1, a.Count("/"), "one probe at start")

	// Hold a request on a across the reload: its slot must survive.
	a.Hold("/api/chat")
	held := make(chan int, 1)
	go func() {
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":false}`))
		if err != nil {
			held <- 0
			return
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		held <- res.StatusCode
	}()
	require.Eventually(t, func() bool { return sa.inFlight.Load() == 1 }, 5*time.Second, 5*time.Millisecond)

	// Reload: a and gone stay, d leaves, c arrives; the frontend is renamed.
	loadCaddyRaw(t, caddyConfig("name renamed\n"+backends(fmt.Sprintf("backend c %s", c.URL))))
	waitHealthy(t, c.URL, stateHealthy)

	assert.Same(t, sa, pooled(t, a.URL), "a's live state is the same object")
	assert.Same(t, sg, pooled(t, "http://"+gone.HostPort()))
	assert.Equal(t, stateHealthy, healthState(sa.state.Load()), "no flap to unknown")
	assert.Equal(t, stateUnhealthy, healthState(sg.state.Load()), "gone is still known to be down: no re-probe wait")
	assert.EqualValues(t, 1, sa.inFlight.Load(), "the in-flight count survives the reload")
	assert.Equal(t, 1, a.Count("/"), "no duplicate probe of a kept server")
	require.Eventually(t, func() bool { return pooled(t, d.URL) == nil }, 10*time.Second, 10*time.Millisecond, "a removed server leaves the pool")

	a.Release()
	assert.Equal(t, http.StatusOK, <-held, "the request in flight across the reload completed")
	assert.Eventually(t, func() bool { return sa.inFlight.Load() == 0 }, 5*time.Second, 5*time.Millisecond)

	// Requests after the reload never reach the dead server.
	for i := 0; i < 10; i++ {
		res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[],"stream":false}`)
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.NotEqual(t, "gone", res.Header.Get("X-OllamaFlow-Backend"))
	}
}

func TestIntegrationCapsAndTimeouts(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		max_queue 1
		queue_timeout 200ms
		backend a %s {
			max_parallel 1
			fail_threshold 1000
		}`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})

	// One request in flight fills the cap; the next waits in the queue and
	// gives up after queue_timeout; with the queue full, a third gets 429.
	a.Hold("/api/chat")
	done := make(chan struct{})
	go func() {
		defer close(done)
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(chatBody))
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return a.InFlight() == 1 }, 5*time.Second, 5*time.Millisecond)
	queued := make(chan *http.Response, 1)
	go func() {
		res, _ := post(t, "/api/chat", chatBody)
		queued <- res
	}()
	h := currentHandler(t)
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond)
	res, body := post(t, "/api/chat", chatBody)
	assert.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.Equal(t, "1", res.Header.Get("Retry-After"))
	assert.Contains(t, body, "max_queue 1")
	res = <-queued
	assert.Equal(t, http.StatusServiceUnavailable, res.StatusCode)
	assert.NotEmpty(t, res.Header.Get("Retry-After"))

	// A slot that frees goes to the queue at once.
	go func() {
		res, _ := post(t, "/api/chat", chatBody)
		queued <- res
	}()
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond, "%v", func() string {
		select {
		case r := <-queued:
			b, _ := io.ReadAll(r.Body)
			return fmt.Sprint(r.StatusCode, string(b))
		default:
			return "pending"
		}
	})
	a.Release()
	<-done
	res = <-queued
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Zero(t, h.queue.length())
	// The admin API shows how many waited and how long.
	_, raw := adminGet(t, "/ollamaflow/frontends")
	var fr []frontendJSON
	require.NoError(t, json.Unmarshal(raw, &fr))
	require.Len(t, fr, 1)
	assert.EqualValues(t, 2, fr[0].QueuedTotal, "one timed out, one was served")
	assert.GreaterOrEqual(t, fr[0].QueueWaitMaxMS, 200.0, "the one that timed out waited queue_timeout")

	loadCaddy(t, fmt.Sprintf(`
		first_byte_timeout 300ms
		stream_idle_timeout 300ms
		backend a %s {
			fail_threshold 1000
		}`, a.URL))

	a.SlowFirstByte(2*time.Second, "/api/chat")
	res, body = post(t, "/api/chat", chatBody)
	assert.Equal(t, http.StatusGatewayTimeout, res.StatusCode, body)
	assert.Contains(t, body, "first_byte_timeout")
	a.ClearFaults()

	// A backend that goes silent after the headers: the stream ends.
	a.HangAfterHeaders("/api/chat")
	start := time.Now()
	res, _ = post(t, "/api/chat", chatBody)
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Less(t, time.Since(start), 10*time.Second, "the stall was cut, not waited out")
	a.ClearFaults()
}

func TestIntegrationClientCancelReachesBackend(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1000, TokenGap: 20 * time.Millisecond})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf("backend a %s", a.URL))

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, siteURL+"/api/generate", strings.NewReader(`{"model":"tiny-llama","prompt":"hi"}`))
	res, err := client.Do(req)
	require.NoError(t, err)
	sc := bufio.NewScanner(res.Body)
	require.True(t, sc.Scan(), "first chunk")
	cancel()
	res.Body.Close()

	require.Eventually(t, func() bool { return len(a.Cancellations()) == 1 }, 5*time.Second, 5*time.Millisecond,
		"the backend's request was not cancelled")
	c := a.Cancellations()[0]
	assert.Equal(t, "/api/generate", c.Path)
	assert.Less(t, c.Chunks, 1000, "the generation stopped early")
	s := pooled(t, a.URL)
	require.NotNil(t, s)
	assert.Zero(t, s.failStreak.Load(), "a client that went away is not the backend's failure")
	assert.Eventually(t, func() bool { return s.inFlight.Load() == 0 }, 5*time.Second, 5*time.Millisecond)
}
