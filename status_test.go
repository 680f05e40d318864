package ollamaflow

// Status page tests: the embedded page over plain HTTP, and the page as a
// real browser renders it, against a live Caddy and against a fake admin
// API that serves hostile strings and then fails.
//
// Caddy's admin endpoint refuses a browser's own navigation: a browser sends
// Sec-Fetch-Mode (localhost is a secure context) without an Origin on a
// top-level GET, and Caddy answers 403 "client is not allowed to access from
// origin ''" whatever the admin origins say. So a browser reaches the page
// through a site that proxies it (statusSite below, the recipe in the
// README), and that is what the browser test loads.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// statusSite is a Caddyfile site on port that proxies the status page and
// its two read-only JSON routes to the admin endpoint. It sets the Host the
// admin endpoint expects and drops the browser headers that make Caddy
// demand an Origin. Only GET and HEAD of those three paths pass, so the
// admin API's other routes, and every POST, stay out of the browser's reach.
func statusSite(port int) string {
	return fmt.Sprintf(`
:%d {
	@status {
		method GET HEAD
		path /ollamaflow/ /ollamaflow/backends /ollamaflow/frontends
	}
	handle @status {
		reverse_proxy localhost:%d {
			header_up Host {upstream_hostport}
			header_up -Origin
			header_up -Sec-Fetch-Mode
		}
	}
	respond 404
}
`, port, adminPort)
}

// loadCaddyfile (re)loads the in-process Caddy with a whole Caddyfile.
func loadCaddyfile(t *testing.T, cfg string) {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: adminPort, LoadRequestTimeout: 30 * time.Second})
	tester.InitServer(cfg, "caddyfile")
	require.False(t, t.Failed(), "caddy did not load the config")
}

func TestStatusPageIsSelfContained(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	statusPort := freePort()
	loadCaddyfile(t, caddyConfig("backend a "+a.URL)+statusSite(statusPort))

	get := func(url string, hdr ...string) (*http.Response, string) {
		t.Helper()
		return send(t, http.MethodGet, url, "", hdr...)
	}

	res, page := get(fmt.Sprintf("http://localhost:%d/ollamaflow/", adminPort))
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.True(t, strings.HasPrefix(res.Header.Get("Content-Type"), "text/html"), res.Header.Get("Content-Type"))
	assert.Equal(t, string(statusPage), page)
	// The SVG namespace is a name the script creates elements in, not an
	// address anything is loaded from; it appears once.
	assert.Equal(t, 1, strings.Count(page, `"http://www.w3.org/2000/svg"`))
	local := strings.Replace(page, `"http://www.w3.org/2000/svg"`, "", 1)
	for _, external := range []string{"http://", "https://", "<link", "src=", "@import", "url("} {
		assert.NotContains(t, local, external, "the page loads nothing from elsewhere")
	}
	assert.NotContains(t, page, "innerHTML", "API strings go in as text, never parsed as HTML")

	// What a browser's navigation looks like to the admin endpoint, and why
	// statusSite exists.
	res, _ = get(fmt.Sprintf("http://localhost:%d/ollamaflow/", adminPort), "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Site", "none")
	assert.Equal(t, http.StatusForbidden, res.StatusCode, "Caddy's admin endpoint refuses a browser navigation without Origin")
	res, body := get(fmt.Sprintf("http://localhost:%d/ollamaflow/", statusPort), "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Site", "none")
	assert.Equal(t, http.StatusOK, res.StatusCode, "through the proxying site it loads")
	assert.Equal(t, string(statusPage), body)
	res, _ = get(fmt.Sprintf("http://localhost:%d/config/", statusPort))
	assert.Equal(t, http.StatusNotFound, res.StatusCode, "the site exposes nothing else of the admin API")
}

// pullingBackend is a fake Ollama whose /api/pull reports 40 % of the
// download and then stalls until the test ends, so the page always finds a
// pull in progress.
func pullingBackend(t *testing.T, cfg fakeollama.Config) *httptest.Server {
	t.Helper()
	f := fakeollama.NewUnstarted(cfg)
	stop := make(chan struct{})
	mux := http.NewServeMux()
	mux.Handle("/", f.Handler())
	mux.HandleFunc("/api/pull", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		fmt.Fprintln(w, `{"status":"pulling manifest"}`)
		fmt.Fprintln(w, `{"status":"pulling 6a0746a1ec1a","digest":"sha256:6a0746a1ec1a","total":4683087332,"completed":1873234933}`)
		w.(http.Flusher).Flush()
		select {
		case <-stop:
		case <-r.Context().Done():
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		close(stop)
		srv.Close()
	})
	return srv
}

func TestStatusPageInBrowser(t *testing.T) {
	browser := findBrowser(t)

	alive := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "qwen3:8b", "nomic-embed-text"}, Loaded: []string{"tiny-llama"}})
	defer alive.Close()
	dead := fakeollama.New(fakeollama.Config{})
	dead.Close() // nothing listens there: its first probe fails
	puller := pullingBackend(t, fakeollama.Config{Models: []string{"nomic-embed-text"}})

	statusPort := freePort()
	loadCaddyfile(t, caddyConfig(fmt.Sprintf(`
		name chat
		required_models tiny-llama
		backend alive %s {
			max_parallel 4
			labels gpu
		}
		backend dead http://%s
		backend puller %s`, alive.URL, dead.HostPort(), puller.URL))+statusSite(statusPort))

	sa := waitHealthy(t, alive.URL, stateHealthy)
	waitHealthy(t, "http://"+dead.HostPort(), stateUnhealthy)
	sp := waitHealthy(t, puller.URL, stateHealthy)
	require.Eventually(t, func() bool {
		for _, p := range sp.pullSnapshot() {
			if p.Active && p.Completed > 0 {
				return true
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond, "puller never reported pull progress")

	// One request held in flight on alive.
	alive.Hold("/api/chat")
	done := make(chan struct{})
	go func() {
		defer close(done)
		res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":false}`))
		if err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}()
	defer func() {
		alive.Release()
		<-done
	}()
	require.Eventually(t, func() bool { return sa.inFlight.Load() == 1 }, 5*time.Second, 5*time.Millisecond)

	url := fmt.Sprintf("http://localhost:%d/ollamaflow/", statusPort)
	dom := runBrowser(t, browser, "--dump-dom", "--virtual-time-budget=5000", url)

	assert.Regexp(t, `<div id="banner"[^>]*\bhidden\b`, dom, "no fetch failed")
	assert.Regexp(t, `id="updated">Updated `, dom)
	rows := renderedBackends(dom)
	require.Len(t, rows, 3, "one row per backend, filled by the script:\n%s", dom)
	assert.Equal(t, "healthy", rows["alive"].state)
	assert.Equal(t, "unhealthy", rows["dead"].state)
	assert.Equal(t, "healthy", rows["puller"].state)
	assert.Equal(t, "1", rows["alive"].inFlight)
	assert.Contains(t, rows["alive"].html, `<div class="name">alive</div>`)
	assert.Regexp(t, `<span class="chip loaded"[^>]*>tiny-llama:latest</span>`, rows["alive"].html, "the loaded model is marked")
	assert.Regexp(t, `<span class="chip">qwen3:8b</span>`, rows["alive"].html, "a model not loaded is not")
	assert.Contains(t, rows["dead"].html, `class="err"`, "the dead backend shows its last error")
	assert.Regexp(t, `role="progressbar"[^>]*aria-valuenow="40"`, rows["puller"].html, "the pull shows its progress")
	assert.Contains(t, rows["puller"].html, "1.87 GB of 4.68 GB")
	assert.Regexp(t, `(?s)<tr data-frontend="chat">.*least_delay.*0 / 256`, dom, "the frontends summary")

	shot := filepath.Join(t.TempDir(), "status.png")
	runBrowser(t, browser, "--screenshot="+shot, "--window-size=1400,900", "--virtual-time-budget=5000", url)
	fi, err := os.Stat(shot)
	require.NoError(t, err, "no screenshot")
	require.NotZero(t, fi.Size(), "empty screenshot")
	t.Logf("screenshot: %s (%d bytes)", shot, fi.Size())
	if keep := os.Getenv("STATUS_SCREENSHOT"); keep != "" { // to look at it after the temp dir is gone
		png, err := os.ReadFile(shot)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(keep, png, 0o644))
		t.Logf("screenshot copied to %s", keep)
	}
}

func TestStatusPageEscapesAndShowsFetchErrors(t *testing.T) {
	browser := findBrowser(t)
	const hostile = `<img src=x onerror=alert(1)>`
	var calls atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/ollamaflow/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(statusPage)
	})
	mux.HandleFunc("/ollamaflow/backends", func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) > 1 { // the first answer renders; every later one fails
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintf(w, `{"error":%q}`, "boom "+hostile)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `[{"url":"http://x","names":[%q],"frontends":[{"frontend":"f","name":%[1]q}],"state":"healthy",
			"since":"2026-01-01T00:00:00Z","last_error":%[1]q,"fail_streak":2,"in_flight":0,"queued":0,"draining":true,"idle":true,
			"models":[%[1]q],"loaded_models":[],"pulls":[{"model":%[1]q,"status":%[1]q,"completed":0,"total":0,"error":%[1]q,
			"started":"2026-01-01T00:00:00Z","attempts":3,"active":false}],"labels":[%[1]q],"max_parallel":{"f":0}}]`, hostile)
	})
	mux.HandleFunc("/ollamaflow/frontends", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `[{"name":%q,"lb_policy":%[1]q,"backends":[%[1]q],"queued":0,"max_queue":8,"queue_timeout":"30s","retries":1,"labels":[]}]`, hostile)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	dom := runBrowser(t, browser, "--dump-dom", "--virtual-time-budget=5000", srv.URL+"/ollamaflow/")

	assert.NotContains(t, dom, "<img", "no API string became markup")
	assert.Contains(t, dom, `<div class="name">&lt;img src=x onerror=alert(1)&gt;</div>`, "the hostile name shows as text")
	assert.Contains(t, dom, `<td class="name">&lt;img src=x onerror=alert(1)&gt;</td>`, "and so does the frontend's")
	assert.Contains(t, dom, "badge-draining")
	require.Regexp(t, `<div id="banner" class="banner" role="alert">Cannot update: GET backends: HTTP 500 \(boom &lt;img`, dom, "the banner names the failure")
	assert.Contains(t, dom, "Showing data from")
	assert.Contains(t, dom, `<main id="main" class="stale">`, "stale data is dimmed")
	assert.GreaterOrEqual(t, calls.Load(), int32(2), "the page polled again")
}

// findBrowser returns a Chromium or Chrome binary. Without one the browser
// tests skip, except in CI, where .ci/run installs Chromium and a missing
// browser is a broken setup.
func findBrowser(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no browser (chromium, chromium-browser, google-chrome) found, and CI must run the status page tests: .ci/run installs Debian's chromium")
	}
	t.Skip("no browser (chromium, chromium-browser, google-chrome) found")
	return ""
}

// runBrowser runs headless Chromium once, with its own profile, and returns
// what it printed on stdout.
func runBrowser(t *testing.T, browser string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args = append([]string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(),
	}, args...)
	cmd := exec.CommandContext(ctx, browser, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	require.NoError(t, err, "%s %s\n%s", browser, strings.Join(args, " "), stderr.String())
	return stdout.String()
}

type renderedBackend struct {
	state, inFlight, html string
}

var (
	backendBodyRE = regexp.MustCompile(`(?s)<tbody class="backend" data-backend="([^"]*)"[^>]*>(.*?)</tbody>`)
	stateRE       = regexp.MustCompile(`<span class="pill state state-\w+">([^<]*)</span>`)
	inFlightRE    = regexp.MustCompile(`<td class="num in-flight">([^<]*)</td>`)
)

// renderedBackends reads the backend rows the page's script built, by name.
func renderedBackends(dom string) map[string]renderedBackend {
	out := map[string]renderedBackend{}
	for _, m := range backendBodyRE.FindAllStringSubmatch(dom, -1) {
		r := renderedBackend{html: m[2]}
		if s := stateRE.FindStringSubmatch(m[2]); s != nil {
			r.state = s[1]
		}
		if s := inFlightRE.FindStringSubmatch(m[2]); s != nil {
			r.inFlight = s[1]
		}
		out[m[1]] = r
	}
	return out
}

// A server that recovered keeps its last error on record, but not in red:
// red means "failing now".
func TestStatusPageShowsRecoveredErrorsAsPast(t *testing.T) {
	browser := findBrowser(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/ollamaflow/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(statusPage)
	})
	row := func(name, state string) string {
		return fmt.Sprintf(`{"url":"http://%[1]s","names":[%[1]q],"frontends":[{"frontend":"f","name":%[1]q}],"state":%[2]q,
			"since":"2026-01-01T00:00:00Z","last_error":"dial tcp: connection refused","fail_streak":0,"in_flight":0,"queued":0,
			"draining":false,"idle":true,"models":[],"loaded_models":[],"pulls":[],"labels":[],"max_parallel":{"f":0}}`, name, state)
	}
	mux.HandleFunc("/ollamaflow/backends", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, "[%s,%s]", row("down", "unhealthy"), row("back", "healthy"))
	})
	mux.HandleFunc("/ollamaflow/frontends", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `[{"name":"f","lb_policy":"first","backends":["down","back"],"queued":0,"max_queue":8,"queue_timeout":"30s","retries":1,"labels":[]}]`)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	rows := renderedBackends(runBrowser(t, browser, "--dump-dom", "--virtual-time-budget=3000", srv.URL+"/ollamaflow/"))
	require.Len(t, rows, 2)
	assert.Contains(t, rows["down"].html, `<div class="err">dial tcp: connection refused</div>`, "a failing server's error is current")
	assert.NotContains(t, rows["back"].html, `class="err"`, "a recovered server's error is not shown as current")
	assert.Contains(t, rows["back"].html, "last error (recovered): dial tcp: connection refused")
}

// Dashboard accounts for the ollamaflow_status tests: bcrypt at cost 4, so
// that basic_auth stays quick.
const (
	opsHash    = "$2a$04$kDnz8nBrA4cszPbg.CAtC.itEp10gjBfAspCw5uqcd6U3.ym5St8." // ops-password
	viewerHash = "$2a$04$cnY/0403HbSfNNAZ0QGDhevK3WqrZ6wz27imYRSoJ2OAomAghK9PS" // viewer-password
)

var (
	opsAuth    = "Basic " + base64.StdEncoding.EncodeToString([]byte("ops:ops-password"))
	viewerAuth = "Basic " + base64.StdEncoding.EncodeToString([]byte("viewer:viewer-password"))
)

// dashboardConfig is caddyConfig(body) with JSON logs to logFile, plus a
// dashboard site on port behind basic_auth: at the root, under handle_path
// /ops/, and read-only under /ro/.
func dashboardConfig(port int, logFile, body string) string {
	cfg := strings.Replace(caddyConfig(body), "skip_install_trust",
		"skip_install_trust\n\tlog {\n\t\toutput file "+logFile+"\n\t\tformat json\n\t}", 1)
	return cfg + fmt.Sprintf(`
:%d {
	basic_auth {
		ops %s
		viewer %s
	}
	handle_path /ops/* {
		ollamaflow_status
	}
	ollamaflow_status /ro/* {
		read_only
	}
	ollamaflow_status
}
`, port, opsHash, viewerHash)
}

var tokenMetaRE = regexp.MustCompile(`<meta name="ollamaflow-token" content="([^"]*)">`)

// pageToken loads the dashboard page at url as auth and returns its token.
func pageToken(t *testing.T, url, auth string) string {
	t.Helper()
	res, page := send(t, http.MethodGet, url, "", "Authorization", auth)
	require.Equal(t, http.StatusOK, res.StatusCode, page)
	m := tokenMetaRE.FindStringSubmatch(page)
	require.NotNil(t, m, "no token meta tag in the page")
	return m[1]
}

// logLines returns the JSON log lines whose msg is msg.
func logLines(t *testing.T, file, msg string) []map[string]any {
	t.Helper()
	raw, err := os.ReadFile(file)
	require.NoError(t, err)
	var out []map[string]any
	for _, line := range strings.Split(string(raw), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

func TestStatusHandlerServesAndActs(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	port := freePort()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	loadCaddyfile(t, dashboardConfig(port, logFile, "name dash\nbackend a "+a.URL))
	sa := waitHealthy(t, a.URL, stateHealthy)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	origin := base
	req := func(method, path string, hdr ...string) (*http.Response, string) {
		t.Helper()
		return send(t, method, base+path, "", hdr...)
	}

	// Caddy's own authentication guards everything, the page included.
	res, _ := req(http.MethodGet, "/")
	assert.Equal(t, http.StatusUnauthorized, res.StatusCode)
	res, _ = req(http.MethodGet, "/backends")
	assert.Equal(t, http.StatusUnauthorized, res.StatusCode)

	res, page := req(http.MethodGet, "/", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.True(t, strings.HasPrefix(res.Header.Get("Content-Type"), "text/html"))
	assert.Equal(t, "DENY", res.Header.Get("X-Frame-Options"), "no other site may frame the buttons")
	assert.Contains(t, res.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'")
	assert.Regexp(t, `script-src 'sha256-[A-Za-z0-9+/]+=*';`, res.Header.Get("Content-Security-Policy"))
	token := tokenMetaRE.FindStringSubmatch(page)
	require.NotNil(t, token)
	require.NotEmpty(t, token[1], "a page that may act carries a token")
	assert.Equal(t, string(statusPage), strings.Replace(page, token[0], string(statusTokenMeta), 1), "the page is status.html with its token")
	assert.NotEqual(t, token[1], pageToken(t, base+"/", viewerAuth), "a token is bound to its user")

	for _, path := range []string{"/backends", "/ops/backends", "/ro/backends"} {
		res, body := req(http.MethodGet, path, "Authorization", opsAuth)
		require.Equal(t, http.StatusOK, res.StatusCode, path)
		assert.Equal(t, "application/json", res.Header.Get("Content-Type"))
		var list []backendJSON
		require.NoError(t, json.Unmarshal([]byte(body), &list), path)
		require.Len(t, list, 1, path)
		assert.Equal(t, a.URL, list[0].URL, path)
	}
	res, body := req(http.MethodGet, "/frontends", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, body, `"name": "dash"`)
	res, body = req(http.MethodGet, "/ops/history", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, body, `"interval_seconds": 5`)
	assert.Equal(t, token[1] != "", pageToken(t, base+"/ops/", opsAuth) != "", "under handle_path the page acts too")
	assert.Empty(t, pageToken(t, base+"/ro/", opsAuth), "a read-only page has no token, so no buttons")

	res, body = req(http.MethodGet, "/nothing-here", "Authorization", opsAuth)
	assert.Equal(t, http.StatusNotFound, res.StatusCode)
	assert.Contains(t, body, `"error"`)
	res, _ = req(http.MethodPost, "/backends", "Authorization", opsAuth)
	assert.Equal(t, http.StatusMethodNotAllowed, res.StatusCode)
	assert.Equal(t, "GET, HEAD", res.Header.Get("Allow"))
	res, _ = req(http.MethodGet, "/backends/a/drain", "Authorization", opsAuth)
	assert.Equal(t, http.StatusMethodNotAllowed, res.StatusCode)
	assert.Equal(t, "POST", res.Header.Get("Allow"))

	// Refusals: none of these drains.
	refused := []struct {
		name   string
		path   string
		status int
		want   string
		hdr    []string
	}{
		{"no token", "/backends/a/drain", 403, "X-OllamaFlow-Token", []string{"Authorization", opsAuth, "Sec-Fetch-Site", "same-origin", "Origin", origin}},
		{"forged token", "/backends/a/drain", 403, "X-OllamaFlow-Token", []string{"Authorization", opsAuth, "X-OllamaFlow-Token", "1." + strings.Repeat("0", 64)}},
		{"another user's token", "/backends/a/drain", 403, "X-OllamaFlow-Token", []string{"Authorization", viewerAuth, "X-OllamaFlow-Token", token[1]}},
		{"cross-site browser request", "/backends/a/drain", 403, "cross-origin", []string{"Authorization", opsAuth, "X-OllamaFlow-Token", token[1], "Sec-Fetch-Site", "cross-site"}},
		{"same-site browser request", "/backends/a/drain", 403, "cross-origin", []string{"Authorization", opsAuth, "X-OllamaFlow-Token", token[1], "Sec-Fetch-Site", "same-site"}},
		{"foreign Origin", "/backends/a/drain", 403, "cross-origin", []string{"Authorization", opsAuth, "X-OllamaFlow-Token", token[1], "Origin", "http://evil.example"}},
		{"read-only dashboard", "/ro/backends/a/drain", 403, "read-only", []string{"Authorization", opsAuth, "X-OllamaFlow-Token", token[1]}},
		{"no credentials", "/backends/a/drain", 401, "", []string{"X-OllamaFlow-Token", token[1]}},
	}
	for _, tc := range refused {
		res, body := req(http.MethodPost, tc.path, tc.hdr...)
		assert.Equal(t, tc.status, res.StatusCode, "%s: %s", tc.name, body)
		assert.Contains(t, body, tc.want, tc.name)
		assert.False(t, sa.draining.Load(), "%s: drained anyway", tc.name)
	}

	// The page's own request: same origin, its token, its user.
	act := func(path string) (*http.Response, string) {
		return req(http.MethodPost, path, "Authorization", opsAuth, "X-OllamaFlow-Token", token[1], "Sec-Fetch-Site", "same-origin", "Origin", origin)
	}
	res, body = act("/backends/a/drain?frontend=dash")
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	var st backendJSON
	require.NoError(t, json.Unmarshal([]byte(body), &st))
	assert.True(t, st.Draining)
	_, raw := adminGet(t, "/ollamaflow/backends/a")
	require.NoError(t, json.Unmarshal(raw, &st))
	assert.True(t, st.Draining, "the admin API sees the drain")

	res, body = act("/backends/nobody/drain")
	assert.Equal(t, http.StatusNotFound, res.StatusCode)
	assert.Contains(t, body, `no backend named \"nobody\"`)
	res, body = act("/backends/a/undrain")
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.False(t, sa.draining.Load())
	res, body = act("/backends/a/refresh")
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	// Without Sec-Fetch-Site or Origin (curl, a script) the token is enough.
	res, body = req(http.MethodPost, "/ops/backends/a/drain", "Authorization", opsAuth, "X-OllamaFlow-Token", token[1])
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.True(t, sa.draining.Load())
	sa.setDraining(false)

	// Every action and every refusal is logged with who asked.
	require.Eventually(t, func() bool { return len(logLines(t, logFile, "dashboard action")) == 4 }, 5*time.Second, 10*time.Millisecond)
	done := logLines(t, logFile, "dashboard action")
	assert.Equal(t, "drain", done[0]["action"])
	assert.Equal(t, "a", done[0]["backend"])
	assert.Equal(t, "dash", done[0]["frontend"])
	assert.Equal(t, "ops", done[0]["user"])
	assert.Contains(t, done[0]["remote_addr"], "127.0.0.1:")
	assert.Equal(t, "http.handlers.ollamaflow_status", done[0]["logger"])
	assert.Equal(t, []any{"drain", "undrain", "refresh", "drain"}, []any{done[0]["action"], done[1]["action"], done[2]["action"], done[3]["action"]})
	refusals := logLines(t, logFile, "dashboard action refused")
	require.Len(t, refusals, len(refused)-1, "every refusal after authentication is logged")
	assert.Equal(t, "viewer", refusals[2]["user"])
	assert.Contains(t, refusals[3]["reason"], "cross-origin")
	raw, err := os.ReadFile(logFile)
	require.NoError(t, err)
	assert.NotContains(t, string(raw), token[1], "tokens are not logged")
}

func TestStatusToken(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tok := statusToken("ops", now)
	assert.NoError(t, checkStatusToken(tok, "ops", now))
	assert.NoError(t, checkStatusToken(tok, "ops", now.Add(statusTokenTTL-time.Second)))
	assert.ErrorContains(t, checkStatusToken(tok, "ops", now.Add(statusTokenTTL+time.Second)), "expired")
	assert.ErrorContains(t, checkStatusToken(tok, "ops", now.Add(-2*time.Minute)), "expired", "issued in the future")
	assert.ErrorIs(t, checkStatusToken(tok, "viewer", now), errStatusToken)
	assert.ErrorIs(t, checkStatusToken(tok, "", now), errStatusToken)
	ts, mac, _ := strings.Cut(tok, ".")
	assert.ErrorIs(t, checkStatusToken(fmt.Sprint(now.Unix()+60)+"."+mac, "ops", now), errStatusToken, "a changed time breaks the MAC")
	for _, bad := range []string{"", ".", ts, ts + ".", "x." + mac, tok + "0"} {
		assert.ErrorIs(t, checkStatusToken(bad, "ops", now), errStatusToken, bad)
	}
	assert.NoError(t, checkStatusToken(statusToken("", now), "", now), "no authentication: a token for nobody")
}

// TestStatusPageContrast checks the page's colours in both themes against
// WCAG 2: text at least 4.5:1 on the surfaces it sits on, the chart series
// too (their names and values are written in their colour).
func TestStatusPageContrast(t *testing.T) {
	page := string(statusPage)
	light, dark := cssVars(t, page, ":root {"), cssVars(t, page, "@media (prefers-color-scheme: dark) {")
	pairs := [][2]string{
		{"fg", "card"}, {"fg", "bg"}, {"fg", "head"}, {"muted", "card"}, {"muted", "head"},
		{"ok", "ok-bg"}, {"bad", "bad-bg"}, {"warn", "warn-bg"}, {"unk", "unk-bg"}, {"accent", "accent-bg"},
		{"bad", "card"}, {"warn", "card"}, {"ok", "card"},
	}
	for _, c := range []string{"c-req", "c-tok", "c-p50", "c-p99", "c-inflight", "c-queued", "c-err", "c-cold"} {
		pairs = append(pairs, [2]string{c, "card"})
	}
	for theme, vars := range map[string]map[string]string{"light": light, "dark": dark} {
		for _, p := range pairs {
			fg, bg := vars[p[0]], vars[p[1]]
			require.NotEmpty(t, fg, "%s: --%s", theme, p[0])
			require.NotEmpty(t, bg, "%s: --%s", theme, p[1])
			ratio := contrast(t, fg, bg)
			assert.GreaterOrEqual(t, ratio, 4.5, "%s theme: --%s %s on --%s %s is %.2f:1", theme, p[0], fg, p[1], bg, ratio)
		}
	}
}

var cssVarRE = regexp.MustCompile(`--([a-z0-9-]+):\s*(#[0-9a-fA-F]{3,6})`)

// cssVars reads the custom properties of the first block after marker,
// up to its closing brace.
func cssVars(t *testing.T, page, marker string) map[string]string {
	t.Helper()
	_, rest, ok := strings.Cut(page, marker)
	require.True(t, ok, "no %q in the page", marker)
	if strings.HasPrefix(marker, "@media") {
		_, rest, ok = strings.Cut(rest, ":root {")
		require.True(t, ok)
	}
	block, _, _ := strings.Cut(rest, "}")
	out := map[string]string{}
	for _, m := range cssVarRE.FindAllStringSubmatch(block, -1) {
		out[m[1]] = m[2]
	}
	return out
}

// contrast is the WCAG 2 contrast ratio of two #rrggbb or #rgb colours.
func contrast(t *testing.T, a, b string) float64 {
	t.Helper()
	lum := func(hex string) float64 {
		if len(hex) == 4 { // #abc is #aabbcc
			hex = string([]byte{'#', hex[1], hex[1], hex[2], hex[2], hex[3], hex[3]})
		}
		require.Len(t, hex, 7, hex)
		var rgb [3]float64
		for i := range rgb {
			v, err := strconv.ParseUint(hex[1+2*i:3+2*i], 16, 8)
			require.NoError(t, err)
			c := float64(v) / 255
			if c <= 0.03928 {
				rgb[i] = c / 12.92
			} else {
				rgb[i] = math.Pow((c+0.055)/1.055, 2.4)
			}
		}
		return 0.2126*rgb[0] + 0.7152*rgb[1] + 0.0722*rgb[2]
	}
	la, lb := lum(a), lum(b)
	if la < lb {
		la, lb = lb, la
	}
	return (la + 0.05) / (lb + 0.05)
}

// The README's shared site: the dashboard and its authentication under a
// path, the frontend on every other path, with no order line.
func TestStatusBesideFrontend(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	cfg := strings.Replace(caddyConfig("backend a "+a.URL), "\tollamaflow {", fmt.Sprintf("\tbasic_auth /ops/* {\n\t\tops %s\n\t}\n\tollamaflow_status /ops/*\n\tollamaflow {", opsHash), 1)
	loadCaddyfile(t, cfg)
	waitHealthy(t, a.URL, stateHealthy)

	res, _ := send(t, http.MethodGet, siteURL+"/ops/", "")
	assert.Equal(t, http.StatusUnauthorized, res.StatusCode, "the dashboard needs the password")
	res, page := send(t, http.MethodGet, siteURL+"/ops/", "", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, page, "<title>ollamaflow status</title>")
	res, body := send(t, http.MethodGet, siteURL+"/ops/backends", "", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, body, a.URL)

	res, body = send(t, http.MethodGet, siteURL+"/api/tags", "")
	require.Equal(t, http.StatusOK, res.StatusCode, "the API needs no password: %s", body)
	assert.Contains(t, body, "tiny-llama")
	res, body = send(t, http.MethodGet, siteURL+"/", "")
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Equal(t, "Ollama is running", body, "the frontend keeps /")
}
