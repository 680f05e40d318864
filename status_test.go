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
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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
	for _, external := range []string{"http://", "https://", "<link", "src=", "@import", "url("} {
		assert.NotContains(t, page, external, "the page loads nothing from elsewhere")
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
