package ollamaflow

// CORS through a real Caddy: preflights, the headers on every kind of
// answer, refused origins, a backend's own CORS headers, "*" and off; and a
// real browser whose page, on another origin, streams a chat through the
// frontend.

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

const pageOrigin = "http://localhost:3000"

// assertCORS checks that an answer to a request from origin carries the
// frontend's CORS headers, once each.
func assertCORS(t *testing.T, res *http.Response, origin, what string) {
	t.Helper()
	assert.Equal(t, []string{origin}, res.Header.Values("Access-Control-Allow-Origin"), "%s: Access-Control-Allow-Origin", what)
	assert.True(t, varyHas(strings.Join(res.Header.Values("Vary"), ","), "Origin"), "%s: Vary %q lacks Origin", what, res.Header.Values("Vary"))
	assert.Equal(t, []string{corsExposeHeaders}, res.Header.Values("Access-Control-Expose-Headers"), "%s: Access-Control-Expose-Headers", what)
}

func TestCORSPreflightsAndHeadersOnEveryAnswer(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		models tiny-llama
		max_queue 1
		sticky {
			headers x-conversation-id
		}
		backend a %s {
			max_parallel 1
			labels gpu
		}`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	origin := []string{"Origin", pageOrigin}

	// Preflights, on every route and on a path the frontend does not serve
	// (so a page sees the real 404 rather than a failed preflight).
	for _, path := range []string{"/api/chat", "/v1/chat/completions", "/api/tags", "/v1/models/tiny-llama", "/api/blobs/sha256:abc", "/", "/nope"} {
		res, body := send(t, http.MethodOptions, siteURL+path, "",
			"Origin", pageOrigin,
			"Access-Control-Request-Method", "POST",
			"Access-Control-Request-Headers", "authorization,content-type,x-ollamaflow-label,x-conversation-id")
		assert.Equal(t, http.StatusNoContent, res.StatusCode, "%s: %s", path, body)
		assert.Empty(t, body)
		assert.Equal(t, []string{pageOrigin}, res.Header.Values("Access-Control-Allow-Origin"), path)
		assert.Equal(t, "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS", res.Header.Get("Access-Control-Allow-Methods"), path)
		allowed := strings.ToLower(res.Header.Get("Access-Control-Allow-Headers"))
		for _, h := range []string{"authorization", "content-type", "x-ollamaflow-label", "x-conversation-id", "openai-beta", "x-stainless-os"} {
			assert.Contains(t, strings.Split(allowed, ","), h, "%s: Access-Control-Allow-Headers %q", path, allowed)
		}
		assert.Equal(t, "43200", res.Header.Get("Access-Control-Max-Age"), path)
		assert.Equal(t, "Origin, Access-Control-Request-Method, Access-Control-Request-Headers", strings.Join(res.Header.Values("Vary"), ", "), path)
	}
	for _, r := range a.Requests() {
		assert.NotEqual(t, http.MethodOptions, r.Method, "preflights never reach a backend")
	}

	// A proxied stream.
	res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`, origin...)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Contains(t, body, `"done":true`)
	assertCORS(t, res, pageOrigin, "proxied chat")
	last, ok := a.LastRequestTo("/api/chat")
	require.True(t, ok)
	assert.Empty(t, last.Header.Values("Origin"), "the backend never sees the page's origin")

	// The frontend's own answers, and its errors of every kind.
	cases := []struct {
		method, path, body string
		status             int
		hdr                []string
	}{
		{"GET", "/api/tags", "", 200, nil},
		{"GET", "/v1/models", "", 200, nil},
		{"GET", "/api/ps", "", 200, nil},
		{"GET", "/", "", 200, nil},
		{"HEAD", "/", "", 200, nil},
		{"GET", "/api/version", "", 200, nil},
		{"POST", "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`, 200, nil},
		{"GET", "/nope", "", 404, nil},
		{"GET", "/api/chat", "", 405, nil},
		{"OPTIONS", "/api/chat", "", 405, nil}, // no Access-Control-Request-Method: not a preflight
		{"POST", "/api/chat", `[1]`, 400, nil},
		{"POST", "/v1/chat/completions", `{"model":"forbidden"}`, 403, nil},
		{"POST", "/api/pull", `{"model":"tiny-llama"}`, 403, nil},
		{"POST", "/api/chat", chatBody, 503, []string{"X-OllamaFlow-Label", "cpu"}},
		{"GET", "/v1/models/missing", "", 403, nil},
	}
	for _, c := range cases {
		res, body := send(t, c.method, siteURL+c.path, c.body, append(append([]string(nil), origin...), c.hdr...)...)
		what := c.method + " " + c.path
		assert.Equal(t, c.status, res.StatusCode, "%s: %s", what, body)
		assertCORS(t, res, pageOrigin, what)
	}

	// 429: the queue full, while one request holds the only slot and
	// another waits.
	a.Hold("/api/chat")
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(chatBody))
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return a.InFlight() == 1 }, 5*time.Second, 5*time.Millisecond)
	go func() {
		defer wg.Done()
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(chatBody))
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}()
	h := currentHandler(t)
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond)
	res, body = post(t, "/api/chat", chatBody, origin...)
	assert.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.NotEmpty(t, res.Header.Get("Retry-After"))
	assertCORS(t, res, pageOrigin, "429")
	a.Release()
	wg.Wait()

	// The site's own pages are not cross-origin: nothing to allow or
	// refuse; nor is a client without Origin, which sees what Ollama sends.
	own, body := post(t, "/api/chat", chatBody, "Origin", siteURL)
	assert.Equal(t, http.StatusOK, own.StatusCode, body)
	plain, _ := send(t, http.MethodGet, siteURL+"/api/tags", "")
	for _, res := range []*http.Response{own, plain} {
		for k := range res.Header {
			assert.False(t, strings.HasPrefix(k, "Access-Control-") || k == "Vary", "no %s", k)
		}
	}
}

func TestCORSRefusesOtherOrigins(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		allow_model_management
		backend a %s`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})

	for _, c := range []struct{ method, path, body string }{
		{"OPTIONS", "/api/chat", ""},
		{"POST", "/api/chat", chatBody},
		{"POST", "/api/pull", `{"model":"tiny-llama"}`}, // a "simple" cross-site POST must not run
		{"GET", "/api/tags", ""},
		{"POST", "/v1/chat/completions", chatBody},
		{"GET", "/nope", ""},
	} {
		res, body := send(t, c.method, siteURL+c.path, c.body, "Origin", "https://evil.example", "Access-Control-Request-Method", "POST", "Content-Type", "text/plain")
		what := c.method + " " + c.path
		assert.Equal(t, http.StatusForbidden, res.StatusCode, "%s: %s", what, body)
		assert.Empty(t, res.Header.Values("Access-Control-Allow-Origin"), what)
		assert.Contains(t, body, `origin \"https://evil.example\" may not call this API from a browser`, what)
		if strings.HasPrefix(c.path, "/v1/") {
			assert.Contains(t, body, `"type":"permission_error"`, what)
		}
	}
	for _, p := range []string{"/api/chat", "/api/pull", "/v1/chat/completions", "/nope"} {
		assert.Zero(t, a.Count(p), "a refused origin reaches no backend: %s", p)
	}
}

// corsBackend is an Ollama-like server that sets CORS headers of its own,
// as a backend behind another proxy might, and says whether it saw Origin.
func corsBackend(t *testing.T) (*httptest.Server, *sync.Map) {
	seen := new(sync.Map)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if o := r.Header.Get("Origin"); o != "" {
			seen.Store(r.URL.Path, o)
		}
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.Header().Set("Access-Control-Allow-Credentials", "true")
		w.Header().Set("Access-Control-Expose-Headers", "X-Internal")
		w.Header().Add("Vary", "Accept-Encoding")
		switch r.URL.Path {
		case "/api/tags":
			fmt.Fprint(w, `{"models":[{"name":"tiny-llama:latest","model":"tiny-llama:latest","modified_at":"2026-11-25T00:00:00Z","size":1,"digest":"abc","details":{}}]}`)
		case "/api/ps":
			fmt.Fprint(w, `{"models":[]}`)
		case "/api/chat":
			w.Header().Set("Content-Type", "application/x-ndjson")
			fmt.Fprintln(w, `{"model":"tiny-llama","created_at":"2026-11-25T00:00:00Z","message":{"role":"assistant","content":"hi"},"done":true,"done_reason":"stop","eval_count":1}`)
		case "/api/show":
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"error":"something else not found"}`)
		default:
			fmt.Fprint(w, "Ollama is running")
		}
	}))
	t.Cleanup(srv.Close)
	return srv, seen
}

func TestCORSBackendHeadersAreReplaced(t *testing.T) {
	b, seen := corsBackend(t)
	loadCaddy(t, fmt.Sprintf(`
		cors_origins https://app.example.com
		backend b %s`, b.URL))
	require.Eventually(t, func() bool {
		s := pooled(t, b.URL)
		return s != nil && s.models.Load().known
	}, 10*time.Second, 5*time.Millisecond)

	for _, c := range []struct{ path, body string }{
		{"/api/chat", chatBody},
		{"/api/show", `{"model":"tiny-llama"}`}, // a backend's error passes through
	} {
		res, body := post(t, c.path, c.body, "Origin", "https://app.example.com")
		assertCORS(t, res, "https://app.example.com", c.path+": "+body)
		assert.Empty(t, res.Header.Values("Access-Control-Allow-Credentials"), c.path)
		assert.Equal(t, "Origin, Accept-Encoding", strings.Join(res.Header.Values("Vary"), ", "), c.path)
		assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"), c.path)
	}
	seen.Range(func(k, v any) bool {
		t.Errorf("the backend saw Origin %v on %v", v, k)
		return true
	})

	// The explicit list replaced the default one.
	res, _ := post(t, "/api/chat", chatBody, "Origin", pageOrigin)
	assert.Equal(t, http.StatusForbidden, res.StatusCode)
}

func TestCORSAnyOriginAndOff(t *testing.T) {
	b, _ := corsBackend(t)
	loadCaddy(t, fmt.Sprintf(`
		cors_origins *
		backend b %s`, b.URL))
	require.Eventually(t, func() bool {
		s := pooled(t, b.URL)
		return s != nil && s.models.Load().known
	}, 10*time.Second, 5*time.Millisecond)
	for _, o := range []string{"https://evil.example", "null", "chrome-extension://abc"} {
		res, body := send(t, http.MethodOptions, siteURL+"/api/chat", "", "Origin", o, "Access-Control-Request-Method", "POST")
		assert.Equal(t, http.StatusNoContent, res.StatusCode, body)
		assert.Equal(t, []string{o}, res.Header.Values("Access-Control-Allow-Origin"), "* echoes the origin")
		res, body = post(t, "/api/chat", chatBody, "Origin", o)
		assert.Equal(t, http.StatusOK, res.StatusCode, body)
		assertCORS(t, res, o, "* "+o)
	}

	loadCaddy(t, fmt.Sprintf(`
		cors_origins off
		backend b %s`, b.URL))
	res, body := send(t, http.MethodOptions, siteURL+"/api/chat", "", "Origin", pageOrigin, "Access-Control-Request-Method", "POST")
	assert.Equal(t, http.StatusMethodNotAllowed, res.StatusCode, "off: a preflight is an OPTIONS like any other: %s", body)
	res, body = post(t, "/api/chat", chatBody, "Origin", "https://evil.example")
	assert.Equal(t, http.StatusOK, res.StatusCode, "off: no origin is refused: %s", body)
	for k := range res.Header {
		assert.False(t, strings.HasPrefix(k, "Access-Control-"), "off: no %s, not even the backend's", k)
	}
	assert.Equal(t, []string{"Accept-Encoding"}, res.Header.Values("Vary"))
}

// corsPage is the page a web app would be: it streams a chat from the
// frontend with fetch, showing each token as it arrives, and then what the
// frontend said about itself, or why the fetch failed.
const corsPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>chat</title>
<style>body{font:16px sans-serif;margin:2em} #out{font-size:28px;border:1px solid #888;padding:.5em;min-height:1.5em}</style>
</head><body>
<h1>A page on <span id="origin"></span></h1>
<p>asks <code id="api"></code> for a chat:</p>
<div id="out"></div>
<p>status: <span id="status">pending</span></p>
<script>
const params = new URLSearchParams(location.search);
const api = params.get("api"), barrier = params.get("barrier");
// A fetch that stays pending holds headless Chromium's virtual clock, so
// --dump-dom and --screenshot wait until the page says it is done.
fetch(barrier + "/hold?id=" + params.get("id"), {mode: "no-cors"}).catch(() => {});
document.getElementById("origin").textContent = location.origin;
document.getElementById("api").textContent = api;
const out = document.getElementById("out"), status = document.getElementById("status");
(async () => {
  try {
    const res = await fetch(api + "/api/chat", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer page-token", "X-OllamaFlow-Label": "gpu"},
      body: JSON.stringify({model: "tiny-llama", messages: [{role: "user", content: "hi"}]}),
    });
    const reader = res.body.getReader(), dec = new TextDecoder();
    let buf = "", chunks = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = JSON.parse(buf.slice(0, i)); buf = buf.slice(i + 1);
        if (line.message) { out.textContent += line.message.content; chunks++; }
      }
    }
    status.textContent = "HTTP " + res.status + ", " + chunks + " chunks from backend " + res.headers.get("X-OllamaFlow-Backend");
  } catch (e) {
    status.textContent = "refused: " + e;
  } finally {
    fetch(barrier + "/done?id=" + params.get("id"), {mode: "no-cors"}).catch(() => {});
  }
})();
</script></body></html>`

// pageBarrier serves /hold?id=N, which answers once /done?id=N has been
// asked for (or after 30 s), and returns its URL. A page holds a fetch of
// /hold open until it has finished: headless Chromium's virtual clock does
// not run while a fetch waits for its headers, but does while a streamed
// body arrives, so without it the DOM may be dumped mid-stream.
func pageBarrier(t *testing.T) string {
	var mu sync.Mutex
	done := map[string]chan struct{}{}
	get := func(id string) chan struct{} {
		mu.Lock()
		defer mu.Unlock()
		if done[id] == nil {
			done[id] = make(chan struct{})
		}
		return done[id]
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ch := get(r.URL.Query().Get("id"))
		switch r.URL.Path {
		case "/done":
			mu.Lock()
			select {
			case <-ch:
			default:
				close(ch)
			}
			mu.Unlock()
		case "/hold":
			select {
			case <-ch:
			case <-time.After(30 * time.Second):
			case <-r.Context().Done():
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestCORSInBrowser serves corsPage from a second Caddy site, a different
// origin, and lets headless Chromium run it: from localhost (in Ollama's
// default list) the chat streams; from 127.0.0.2, the same page on the same
// port but another origin, the browser is refused and the chat never runs.
func TestCORSInBrowser(t *testing.T) {
	browser := findBrowser(t)
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 11, TokenGap: 20 * time.Millisecond})
	defer a.Close()
	pagePort := freePort()
	page := fmt.Sprintf(`
:%d {
	header Content-Type "text/html; charset=utf-8"
	respond <<HTML
%s
HTML 200
}
`, pagePort, corsPage)
	loadCaddyfile(t, caddyConfig(fmt.Sprintf(`
		backend a %s {
			labels gpu
		}`, a.URL))+page)
	waitKnown(t, []*fakeollama.Server{a})

	api := fmt.Sprintf("http://127.0.0.1:%d", sitePort)
	barrier, loads := pageBarrier(t), 0
	load := func(host string, args ...string) string {
		loads++
		url := fmt.Sprintf("http://%s:%d/?api=%s&barrier=%s&id=%d", host, pagePort, api, barrier, loads)
		return runBrowser(t, browser, append(args, "--virtual-time-budget=10000", url)...)
	}
	run := func(host string) (dom, shot string) {
		dom = load(host, "--dump-dom")
		shot = filepath.Join(t.TempDir(), host+".png")
		load(host, "--screenshot="+shot, "--window-size=900,500")
		fi, err := os.Stat(shot)
		require.NoError(t, err, "no screenshot")
		require.NotZero(t, fi.Size())
		if dir := os.Getenv("CORS_SCREENSHOTS"); dir != "" { // to look at them after the temp dir is gone
			png, err := os.ReadFile(shot)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(dir, "cors-"+host+".png"), png, 0o644))
		}
		return dom, shot
	}
	text := func(dom, id string) string {
		m := regexp.MustCompile(`id="` + id + `"[^>]*>([^<]*)<`).FindStringSubmatch(dom)
		require.NotNil(t, m, "no #%s in\n%s", id, dom)
		return m[1]
	}

	dom, shot := run("localhost")
	t.Logf("allowed origin: %s", shot)
	assert.Equal(t, fakeollama.Text(11), text(dom, "out"), "every token shows")
	assert.Equal(t, "HTTP 200, 12 chunks from backend a", text(dom, "status"), "the page reads the exposed X-OllamaFlow-Backend")
	chats := 0
	for _, r := range a.Requests() {
		if r.Path == "/api/chat" {
			chats++
			assert.Empty(t, r.Header.Values("Origin"))
			assert.Empty(t, r.Header.Values("Authorization"), "the page's token stays at the frontend")
		}
	}
	assert.Equal(t, 2, chats, "one chat per page load (dump and screenshot)")

	dom, shot = run("127.0.0.2")
	t.Logf("refused origin: %s", shot)
	assert.Empty(t, text(dom, "out"))
	assert.Equal(t, "refused: TypeError: Failed to fetch", text(dom, "status"))
	assert.Equal(t, 2, a.Count("/api/chat"), "the refused page ran no chat")
}

// TestCORSOnTheProxysOwnFailures covers the answers the frontend makes
// when a request cannot be served: too large, a backend too slow or gone,
// and the merged answer of a management fan-out.
func TestCORSOnTheProxysOwnFailures(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		max_request_body 1KiB
		first_byte_timeout 300ms
		allow_model_management
		backend a %s {
			health_interval 1h
			fail_threshold 1000
		}`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	origin := []string{"Origin", pageOrigin}

	res, body := post(t, "/api/copy", `{"source":"tiny-llama","destination":"copied"}`, origin...)
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
	assertCORS(t, res, pageOrigin, "management fan-out")

	res, body = post(t, "/api/chat", `{"model":"tiny-llama","prompt":"`+strings.Repeat("x", 2048)+`"}`, origin...)
	assert.Equal(t, http.StatusRequestEntityTooLarge, res.StatusCode, body)
	assertCORS(t, res, pageOrigin, "413")

	a.SlowFirstByte(2*time.Second, "/api/chat")
	res, body = post(t, "/api/chat", chatBody, origin...)
	assert.Equal(t, http.StatusGatewayTimeout, res.StatusCode, body)
	assertCORS(t, res, pageOrigin, "504")
	a.ClearFaults()

	a.Close() // still healthy for the frontend: its next probe is an hour away
	res, body = post(t, "/v1/chat/completions", chatBody, origin...)
	assert.Equal(t, http.StatusBadGateway, res.StatusCode, body)
	assertCORS(t, res, pageOrigin, "502")
}
