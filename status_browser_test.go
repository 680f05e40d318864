package ollamaflow

// The dashboard in a real browser, driven through the DevTools protocol
// (internal/browser, through testbrowser_test.go) as a person would use it: charts read from the history,
// a drain clicked and confirmed, and the requests another site or a page
// without the token makes refused. Screenshots go to $STATUS_SCREENSHOTS
// when set (a directory), else to the test's temporary directory.

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// screenshotPath is where a test's screenshot goes.
func screenshotPath(t *testing.T, name string) string {
	dir := os.Getenv("STATUS_SCREENSHOTS")
	if dir == "" {
		dir = t.TempDir()
	}
	require.NoError(t, os.MkdirAll(dir, 0o755))
	return filepath.Join(dir, name)
}

func shoot(t *testing.T, p *testPage, scheme, name string) {
	t.Helper()
	p.colorScheme(scheme)
	path := screenshotPath(t, name)
	p.screenshot(path, 1400)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Greater(t, fi.Size(), int64(10_000), "a blank screenshot")
	t.Logf("screenshot (%s): %s", scheme, path)
	p.viewport(1400, 900)
}

// pathPoints reads the x, y pairs of a chart line's d attribute ("M x y L
// x y … h0.6"); the y of the baseline is 64, the top of the scale 0.
func pathPoints(t *testing.T, d string) [][2]float64 {
	t.Helper()
	var out [][2]float64
	for _, seg := range regexp.MustCompile(`[ML]([-0-9.]+) ([-0-9.]+)`).FindAllStringSubmatch(d, -1) {
		x, err := strconv.ParseFloat(seg[1], 64)
		require.NoError(t, err)
		y, err := strconv.ParseFloat(seg[2], 64)
		require.NoError(t, err)
		out = append(out, [2]float64{x, y})
	}
	return out
}

type drawnSeries struct {
	D      string  `json:"d"`
	Points int     `json:"points"`
	Peak   float64 `json:"peak"`
}

// series reads one drawn series of an entity's chart.
func series(t *testing.T, p *testPage, entity, key string) drawnSeries {
	t.Helper()
	var s drawnSeries
	p.eval(fmt.Sprintf(`(() => {
		const e = document.querySelector('[data-entity=%q] path[data-series=%q]');
		if (!e) return null;
		return {d: e.getAttribute("d"), points: +e.getAttribute("data-points"), peak: +e.getAttribute("data-peak")};
	})()`, entity, key), &s)
	return s
}

func TestDashboardInBrowser(t *testing.T) {
	alive := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Loaded: []string{"tiny-llama"}, Tokens: 6, FirstByteDelay: 30 * time.Millisecond})
	defer alive.Close()
	idle := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer idle.Close()
	port := freePort()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	loadCaddyfile(t, dashboardConfig(port, logFile, fmt.Sprintf("name dash-browser\nlb_policy first\nbackend alive %s\nbackend idle %s", alive.URL, idle.URL)))
	sa := waitHealthy(t, alive.URL, stateHealthy)
	waitHealthy(t, idle.URL, stateHealthy)
	waitKnown(t, []*fakeollama.Server{alive, idle})

	// Known traffic: twelve chats, all on alive (lb_policy first), then a
	// sample now rather than at the sampler's next tick.
	const chats = 12
	for range chats {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		require.Equal(t, "alive", res.Header.Get("X-OllamaFlow-Backend"))
	}
	sampleHistory(time.Now())

	// What the history says, to compare the drawing with.
	res, raw := send(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/history", port), "", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode, raw)
	var h historyJSON
	require.NoError(t, json.Unmarshal([]byte(raw), &h))
	peak := func(samples []historyPoint, f func(historyPoint) float64) float64 {
		m := 0.0
		for _, s := range samples {
			m = math.Max(m, f(s))
		}
		return m
	}
	var aliveReqPeak, feTokPeak float64
	for _, b := range h.Backends {
		if b.URL == alive.URL {
			aliveReqPeak = peak(b.Samples, func(p historyPoint) float64 { return p.Requests })
		}
	}
	require.Len(t, h.Frontends, 1)
	feTokPeak = peak(h.Frontends[0].Samples, func(p historyPoint) float64 { return p.Tokens })
	require.Positive(t, aliveReqPeak)
	require.Positive(t, feTokPeak)

	b := startBrowser(t)
	p := b.newPage(1400, 900)
	p.headers(map[string]string{"Authorization": opsAuth}) // what the browser sends once the operator has logged in
	url := fmt.Sprintf("http://localhost:%d/", port)
	p.navigate(url)
	p.waitFor(`document.querySelector('[data-entity="backend:alive"] path[data-series="requests_per_second"]')`, "the charts")
	p.waitFor(`document.querySelector('tbody.backend[data-backend="alive"] button[data-slot="drain"]')`, "the action buttons")

	// The charts are drawn from the history: alive's requests and the
	// frontend's tokens rise above the baseline to the history's peak;
	// idle's stay flat at zero.
	req := series(t, p, "backend:alive", "requests_per_second")
	assert.GreaterOrEqual(t, req.Points, 1)
	assert.InDelta(t, aliveReqPeak, req.Peak, 1e-6, "the drawn peak is the history's")
	pts := pathPoints(t, req.D)
	require.NotEmpty(t, pts, req.D)
	minY := 64.0
	for _, pt := range pts {
		minY = math.Min(minY, pt[1])
	}
	assert.Less(t, minY, 42.0, "the peak is drawn high in its chart: %s", req.D)
	assert.Greater(t, pts[len(pts)-1][0], 290.0, "the newest sample is at the right edge")
	tok := series(t, p, "frontend:dash-browser", "tokens_per_second")
	assert.InDelta(t, feTokPeak, tok.Peak, 1e-6)
	still := series(t, p, "backend:idle", "requests_per_second")
	assert.GreaterOrEqual(t, still.Points, 1, "an idle backend has samples too")
	assert.Zero(t, still.Peak)
	for _, pt := range pathPoints(t, still.D) {
		assert.Equal(t, 64.0, pt[1], "idle's line lies on the baseline")
	}
	ttfb := series(t, p, "backend:alive", "ttfb_p50_ms")
	assert.GreaterOrEqual(t, ttfb.Points, 1, "first bytes were timed")
	assert.GreaterOrEqual(t, ttfb.Peak, 50.0, "the fake waits 30 ms before its first byte")
	for _, key := range []string{"tokens_per_second", "ttfb_p99_ms", "in_flight", "queued", "errors_per_second", "cold_loads"} {
		assert.NotEmpty(t, series(t, p, "backend:alive", key).D, key)
	}
	var loadCells int
	p.eval(`document.querySelectorAll('[data-entity] figure.chart').length`, &loadCells)
	assert.Equal(t, 3*6, loadCells, "six charts for each backend and the frontend")

	shoot(t, p, "light", "dashboard-light.png")
	shoot(t, p, "dark", "dashboard-dark.png")
	p.colorScheme("light")

	// A drain, as a person does it: click, confirm, see it.
	drain := `tbody.backend[data-backend="alive"] button[data-slot="drain"]`
	p.click(drain)
	p.waitFor(`document.querySelector('`+drain+`').textContent === "Confirm drain"`, "the confirmation")
	assert.False(t, sa.draining.Load(), "one click does not drain")
	p.click(drain)
	p.waitFor(`document.getElementById("notice").textContent === "Drained alive."`, "the notice")
	p.waitFor(`document.querySelector('tbody.backend[data-backend="alive"] .badge-draining') && document.querySelector('`+drain+`').textContent === "Undrain"`, "the drained row")
	status, raw2 := adminGet(t, "/ollamaflow/backends/alive")
	require.Equal(t, http.StatusOK, status)
	var st backendJSON
	require.NoError(t, json.Unmarshal(raw2, &st))
	assert.True(t, st.Draining, "the admin API sees the drain")
	require.Eventually(t, func() bool {
		lines := logLines(t, logFile, "dashboard action")
		return len(lines) == 1 && lines[0]["user"] == "ops" && lines[0]["action"] == "drain" && lines[0]["backend"] == "alive"
	}, 5*time.Second, 10*time.Millisecond, "the drain is logged with who did it")
	shoot(t, p, "light", "dashboard-drained-light.png")

	// The page's own origin without the token: refused.
	var noToken int
	p.eval(`fetch("backends/alive/undrain?frontend=dash-browser", {method: "POST"}).then(r => r.status)`, &noToken)
	assert.Equal(t, http.StatusForbidden, noToken)
	assert.True(t, sa.draining.Load())

	// Another site's page, in the same logged-in browser, posting a form
	// to the dashboard: refused, though the browser sends the credentials.
	attacker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, `<!doctype html><form method="post" action="http://localhost:%d/backends/alive/undrain"></form>
			<script>document.forms[0].submit()</script>`, port)
	}))
	defer attacker.Close()
	p.navigate(attacker.URL) // 127.0.0.1: another site than localhost
	p.waitFor(`location.host === "localhost:`+strconv.Itoa(port)+`" && document.readyState === "complete"`, "the form's answer")
	assert.Equal(t, []int{http.StatusForbidden, http.StatusForbidden}, p.responses("/backends/alive/undrain"), "the page's fetch without a token, then the form")
	assert.Contains(t, p.text(), "cross-origin request refused")
	assert.True(t, sa.draining.Load(), "still drained")

	// And back: undrain from the page.
	p.navigate(url)
	p.waitFor(`document.querySelector('`+drain+`') && document.querySelector('`+drain+`').textContent === "Undrain"`, "the drained row")
	p.click(drain)
	p.waitFor(`document.getElementById("notice").textContent === "Undrained alive."`, "the notice")
	assert.False(t, sa.draining.Load())
}

// A quarter of an hour of traffic, sampled by the real sampling code at
// made-up times: gpu1 carries a steady load with a burst in minutes 5 to
// 10, gpu2 fails for a while and loads cold twice, gpu3 joined five minutes
// ago and stays idle. The page must draw each where it happened.
func syntheticHistory(t0 time.Time) historyJSON {
	gpu1, gpu2, gpu3, fe := new(flowStats), new(flowStats), new(flowStats), new(flowStats)
	for i := range historySize {
		now := t0.Add(time.Duration(i+1) * historyInterval)
		burst := i >= 60 && i < 120
		r1 := int64(10) // per 5 s
		if burst {
			r1 = 40
		}
		r2 := int64(5)
		errs := int64(0)
		if i >= 130 && i < 150 {
			errs = 3
		}
		for range r1 {
			gpu1.requests.Add(1)
			gpu1.tokens.Add(60)
			if burst {
				gpu1.observeTTFB(900 * time.Millisecond)
			} else {
				gpu1.observeTTFB(200 * time.Millisecond)
			}
		}
		gpu1.observeTTFB(2 * time.Second) // the slowest of each interval
		for range r2 {
			gpu2.requests.Add(1)
			gpu2.tokens.Add(40)
			gpu2.observeTTFB(400 * time.Millisecond)
		}
		gpu2.errors.Add(errs)
		gpu2.requests.Add(errs)
		if i == 100 || i == 101 {
			gpu2.coldLoads.Add(1)
		}
		for range r1 + r2 {
			fe.observeTTFB(300 * time.Millisecond)
		}
		fe.requests.Add(r1 + r2 + errs)
		fe.errors.Add(errs)
		fe.tokens.Add(r1*60 + r2*40)
		inFlight1, queued := int64(3), int64(0)
		if burst {
			inFlight1, queued = 8, int64(4+i%5)
		}
		gpu1.sample(now, inFlight1, queued)
		gpu2.sample(now, 2, 0)
		if i >= 120 {
			gpu3.sample(now, 0, 0)
		}
		fe.sample(now, inFlight1+2, queued)
	}
	return historyJSON{
		IntervalSeconds: historyInterval.Seconds(), Size: historySize,
		Backends: []backendHistoryJSON{
			{URL: "http://10.0.0.5:11434", Names: []string{"gpu1"}, Samples: gpu1.points()},
			{URL: "http://10.0.0.6:11434", Names: []string{"gpu2"}, Samples: gpu2.points()},
			{URL: "http://10.0.0.7:11434", Names: []string{"gpu3"}, Samples: gpu3.points()},
		},
		Frontends: []frontendHistoryJSON{{Name: "llm", Samples: fe.points()}},
	}
}

func TestDashboardChartsInBrowser(t *testing.T) {
	t0 := time.Now().Add(-historySize * historyInterval).Truncate(time.Second)
	hist := syntheticHistory(t0)
	backend := func(name, url, state string, inFlight int, draining bool) map[string]any {
		return map[string]any{"url": url, "names": []string{name}, "frontends": []map[string]any{{"frontend": "llm", "name": name}},
			"state": state, "since": t0.Format(time.RFC3339), "last_probe": time.Now().Add(-2 * time.Second).Format(time.RFC3339),
			"in_flight": inFlight, "queued": 0, "draining": draining, "idle": inFlight == 0,
			"models": []string{"llama3.2:1b", "nomic-embed-text:latest"}, "loaded_models": []string{"llama3.2:1b"},
			"pulls": []any{}, "labels": []string{"gpu"}, "max_parallel": map[string]int{"llm": 8}}
	}
	mux := http.NewServeMux()
	page := strings.Replace(string(statusPage), string(statusTokenMeta), `<meta name="ollamaflow-token" content="test">`, 1)
	mux.HandleFunc("/dash/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", statusPageCSP())
		fmt.Fprint(w, page)
	})
	mux.HandleFunc("/dash/backends", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode([]any{
			backend("gpu1", "http://10.0.0.5:11434", "healthy", 3, false),
			backend("gpu2", "http://10.0.0.6:11434", "healthy", 2, false),
			backend("gpu3", "http://10.0.0.7:11434", "healthy", 0, true),
		})
	})
	mux.HandleFunc("/dash/frontends", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `[{"name":"llm","lb_policy":"least_delay","backends":["gpu1","gpu2","gpu3"],"queued":0,"max_queue":256,
			"queue_timeout":"1m0s","retries":2,"labels":[],"allow_completions":true,"allow_embeddings":true}]`)
	})
	mux.HandleFunc("/dash/history", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(hist)
	})
	mux.HandleFunc("/dash/usage", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"frontends":[{"frontend":"llm","unauthorized":{"total":17,"minute":2},"tenants":[
			{"tenant":"chat-app","limits":{"requests_per_minute":60,"tokens_per_minute":20000,"max_parallel":4},"in_flight":4,
			 "remaining":{"requests":12,"tokens":3100},"share":3,"priority":1,"models":["llama3.2:1b"],
			 "minute":{"requests":51,"by_status":{"200":48,"429":3},"prompt_tokens":5200,"completion_tokens":11900,"rejections":{"requests_per_minute":3}},
			 "total":{"requests":48211,"by_status":{"200":48000,"429":211},"prompt_tokens":5120000,"completion_tokens":11930000,"rejections":{"requests_per_minute":180,"max_parallel":31}}},
			{"tenant":"batch","limits":{"requests_per_minute":0,"tokens_per_minute":0,"max_parallel":0},"in_flight":2,"remaining":{},"share":1,"priority":0,
			 "minute":{"requests":9,"prompt_tokens":18000,"completion_tokens":900},
			 "total":{"requests":7310,"by_status":{"200":7310},"prompt_tokens":14600000,"completion_tokens":731000}}]}]}`)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	b := startBrowser(t)
	p := b.newPage(1400, 900)
	p.navigate(srv.URL + "/dash/")
	p.waitFor(`document.querySelectorAll('[data-entity] figure.chart').length === 4 * 6`, "the charts of three backends and a frontend")

	// x of sample i (taken at t0 + i intervals) in the 300-unit-wide chart,
	// whose right edge is the newest sample and which spans 180 intervals.
	x := func(i int) float64 { return float64(i) / historySize * 300 }

	// gpu1's requests: highest exactly over the burst, 8/s against 2/s.
	req := series(t, p, "backend:gpu1", "requests_per_second")
	assert.Equal(t, historySize, req.Points)
	assert.InDelta(t, 8.0, req.Peak, 1e-9)
	pts := pathPoints(t, req.D)
	require.Len(t, pts, historySize)
	for i, pt := range pts {
		high := pt[1] < 32
		assert.Equal(t, i >= 60 && i < 120, high, "sample %d at (%.1f, %.1f): high only in the burst", i, pt[0], pt[1])
		assert.InDelta(t, x(i+1), pt[0], 0.06, "sample %d sits at its time", i)
	}
	ttfb := series(t, p, "backend:gpu1", "ttfb_p50_ms")
	assert.InDelta(t, 1000.0, ttfb.Peak, 1e-9, "p50 in the burst: the 1 s bucket")
	p99 := series(t, p, "backend:gpu1", "ttfb_p99_ms")
	assert.InDelta(t, 2500.0, p99.Peak, 1e-9, "p99: the 2.5 s bucket")
	queued := series(t, p, "backend:gpu1", "queued")
	assert.InDelta(t, 8.0, queued.Peak, 1e-9)

	// gpu2's errors: only in minutes 130 to 150 of the samples; two cold loads, as bars.
	errs := series(t, p, "backend:gpu2", "errors_per_second")
	assert.InDelta(t, 0.6, errs.Peak, 1e-9)
	for i, pt := range pathPoints(t, errs.D) {
		assert.Equal(t, i >= 130 && i < 150, pt[1] < 64, "error sample %d", i)
	}
	cold := series(t, p, "backend:gpu2", "cold_loads")
	assert.Equal(t, 2, strings.Count(cold.D, "M"), "one bar per cold load: %s", cold.D)

	// gpu3 joined five minutes ago: its line starts two thirds along.
	late := series(t, p, "backend:gpu3", "requests_per_second")
	assert.Equal(t, historySize-120, late.Points)
	lp := pathPoints(t, late.D)
	require.NotEmpty(t, lp)
	assert.InDelta(t, x(121), lp[0][0], 0.06)
	var none string
	p.eval(`document.querySelector('[data-entity="backend:gpu3"] [data-chart="ttfb"] .none').textContent`, &none)
	assert.Equal(t, "no first byte", none, "an idle server's latency chart says so")

	// Hovering over the burst reads every chart at that time.
	p.hover(`[data-entity="backend:gpu1"] [data-chart="requests"] svg`, x(90)/300)
	var readout struct{ Req, Fe, At string }
	p.waitFor(`document.querySelector('[data-entity="backend:gpu1"] [data-chart="requests"] .at').textContent !== ""`, "the hover read-out")
	p.eval(`({Req: document.querySelector('[data-entity="backend:gpu1"] [data-chart="requests"] .cval').textContent,
		Fe: document.querySelector('[data-entity="frontend:llm"] [data-chart="requests"] .cval').textContent,
		At: document.querySelector('[data-entity="frontend:llm"] [data-chart="requests"] .at').textContent})`, &readout)
	assert.Equal(t, "8", readout.Req, "gpu1 at the burst")
	assert.Equal(t, "9", readout.Fe, "the frontend at the same time: 8 + 1")
	assert.NotEmpty(t, readout.At)
	// Tenants: a bar turns amber from 70 % of a limit and red at it.
	p.waitFor(`document.querySelector('tr[data-tenant="chat-app"]')`, "the tenants")
	var classes struct{ Req, Tok, Par, Batch string }
	p.eval(`(() => { const c = k => document.querySelector('tr[data-tenant="chat-app"] td[data-meter="' + k + '"]').className;
		return {Req: c("requests"), Tok: c("tokens"), Par: c("parallel"),
			Batch: document.querySelector('tr[data-tenant="batch"] td[data-meter="requests"]').className}; })()`, &classes)
	assert.Equal(t, "meter high", classes.Req, "48 of 60")
	assert.Equal(t, "meter high", classes.Tok, "16.9k of 20k")
	assert.Equal(t, "meter full", classes.Par, "4 of 4")
	assert.Equal(t, "meter", classes.Batch, "no limit, no bar")
	shoot(t, p, "light", "dashboard-15min-light.png")
	shoot(t, p, "dark", "dashboard-15min-dark.png")
}

// Tenants' usage against their limits, from real traffic: a tenant with
// limits spends its request bucket and is refused once, another has none,
// and a request without a key counts as unauthorized.
func TestDashboardTenantsInBrowser(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 6})
	defer f.Close()
	hash := func(key string) string {
		sum := sha256.Sum256([]byte(key))
		return "sha256:" + hex.EncodeToString(sum[:])
	}
	port := freePort()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	loadCaddyfile(t, dashboardConfig(port, logFile, fmt.Sprintf(`
		name dash-tenants
		tenants {
			tenant chat-app {
				key %s
				requests_per_minute 5
				tokens_per_minute 100000
				max_parallel 2
			}
			tenant batch {
				key %s
				priority 0
			}
		}
		backend a %s`, hash("sk-chat-app"), hash("sk-batch"), f.URL)))
	waitKnown(t, []*fakeollama.Server{f})

	codes := map[int]int{}
	for range 6 { // the bucket holds 5: the sixth is refused
		res, body := post(t, "/api/chat", chatFor("tiny-llama"), "Authorization", "Bearer sk-chat-app")
		codes[res.StatusCode]++
		_ = body
	}
	require.Equal(t, map[int]int{200: 5, 429: 1}, codes)
	for range 2 {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"), "Authorization", "Bearer sk-batch")
		require.Equal(t, http.StatusOK, res.StatusCode, body)
	}
	res, _ := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusUnauthorized, res.StatusCode)

	res, raw := send(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/usage", port), "", "Authorization", opsAuth)
	require.Equal(t, http.StatusOK, res.StatusCode, raw)
	var usage usageReport
	require.NoError(t, json.Unmarshal([]byte(raw), &usage))
	require.Len(t, usage.Frontends, 1)
	require.Len(t, usage.Frontends[0].Tenants, 2)
	chat := usage.Frontends[0].Tenants[0]
	require.Equal(t, "chat-app", chat.Tenant)
	assert.NotContains(t, raw, "sk-chat-app", "no key in the usage the dashboard serves")

	b := startBrowser(t)
	p := b.newPage(1400, 900)
	p.headers(map[string]string{"Authorization": opsAuth})
	p.navigate(fmt.Sprintf("http://localhost:%d/", port))
	p.waitFor(`document.querySelector('#tenants:not([hidden]) tr[data-tenant="chat-app"]')`, "the tenants")

	type meterJS struct {
		Used  float64 `json:"used"`
		Limit float64 `json:"limit"`
		Text  string  `json:"text"`
		Class string  `json:"class"`
	}
	meter := func(tenant, kind string) meterJS {
		var m meterJS
		p.eval(fmt.Sprintf(`(() => {
			const td = document.querySelector('tr[data-tenant=%q] td[data-meter=%q]');
			return {used: +td.getAttribute("data-used"), limit: +(td.getAttribute("data-limit") || 0), text: td.innerText, class: td.className};
		})()`, tenant, kind), &m)
		return m
	}
	req := meter("chat-app", "requests")
	assert.Equal(t, 5.0, req.Limit)
	// The bucket refills one request every 12 s: used is 5 when the page
	// read it, less if it read it later.
	assert.True(t, req.Used >= 3 && req.Used <= 5, "used %v of 5", req.Used)
	assert.Contains(t, req.Text, " of 5 per min")
	par := meter("chat-app", "parallel")
	assert.Equal(t, 2.0, par.Limit)
	assert.Zero(t, par.Used)
	tok := meter("chat-app", "tokens")
	assert.Equal(t, 100000.0, tok.Limit)
	assert.Contains(t, tok.Text, " of 100k per min")
	assert.Contains(t, meter("batch", "requests").Text, "no limit")

	var total struct{ Chat, Batch, Unauth string }
	p.eval(`({Chat: document.querySelector('tr[data-tenant="chat-app"] td.total').innerText,
		Batch: document.querySelector('tr[data-tenant="batch"] td.total').innerText,
		Unauth: document.querySelector('[data-usage-frontend="dash-tenants"] [data-unauthorized]').getAttribute("data-unauthorized")})`, &total)
	assert.Contains(t, total.Chat, fmt.Sprintf("%d requests", chat.Total.Requests))
	tokens := chat.Total.PromptTokens + chat.Total.CompletionTokens
	require.Positive(t, tokens, "tokens were charged")
	assert.Contains(t, total.Chat, fmt.Sprintf("%d tokens (%d in, %d out)", tokens, chat.Total.PromptTokens, chat.Total.CompletionTokens))
	assert.Contains(t, total.Chat, "1 refused: 1 over requests/min")
	assert.Contains(t, total.Batch, "2 requests")
	assert.Equal(t, "1", total.Unauth)
	shoot(t, p, "light", "dashboard-tenants-light.png")
	shoot(t, p, "dark", "dashboard-tenants-dark.png")
}
