package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func adminGet(t *testing.T, path string) (int, []byte) {
	t.Helper()
	res, err := adminRequest(http.MethodGet, path, "", "")
	require.NoError(t, err)
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, b
}

func adminPost(t *testing.T, path string) (int, []byte) {
	t.Helper()
	res, err := adminRequest(http.MethodPost, path, "application/json", "")
	require.NoError(t, err)
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, b
}

func TestAdminBackendsAndNoSecrets(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "tiny-bert"}, Loaded: []string{"tiny-llama"}})
	defer a.Close()
	dead := fakeollama.New(fakeollama.Config{})
	dead.Close()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	cfg := strings.Replace(caddyConfig(fmt.Sprintf(`
		name admin-test
		backend a %s {
			bearer_token sekrit-token
			header X-Api-Key sekrit-header
			query token=sekrit-query
			max_parallel 3
			labels gpu
		}
		backend gone %s`, a.URL, "http://"+dead.HostPort())),
		"skip_install_trust", "skip_install_trust\n\tlog {\n\t\toutput file "+logFile+"\n\t\tlevel DEBUG\n\t}", 1)
	loadCaddyRaw(t, cfg)
	waitHealthy(t, a.URL, stateHealthy)
	waitHealthy(t, "http://"+dead.HostPort(), stateUnhealthy)
	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)

	var everything []string
	status, raw := adminGet(t, "/ollamaflow/backends")
	require.Equal(t, http.StatusOK, status, string(raw))
	everything = append(everything, string(raw))
	var list []backendJSON
	require.NoError(t, json.Unmarshal(raw, &list))
	require.Len(t, list, 2)
	byName := map[string]backendJSON{}
	for _, b := range list {
		byName[b.Names[0]] = b
	}
	ba := byName["a"]
	assert.Equal(t, "healthy", ba.State)
	assert.Equal(t, a.URL, ba.URL)
	assert.Equal(t, []string{"tiny-bert:latest", "tiny-llama:latest"}, ba.Models)
	assert.Contains(t, ba.LoadedModels, "tiny-llama:latest")
	assert.Equal(t, map[string]int{"admin-test": 3}, ba.Caps)
	assert.Equal(t, []string{"gpu"}, ba.Labels)
	assert.True(t, ba.Credentials["admin-test"].BearerToken, "says a token is sent, not which")
	assert.Equal(t, []string{"X-Api-Key"}, ba.Credentials["admin-test"].Headers)
	assert.False(t, ba.LastProbe.IsZero())
	assert.Equal(t, "unhealthy", byName["gone"].State)
	assert.NotEmpty(t, byName["gone"].LastError)

	for _, p := range []string{"/ollamaflow/backends/a", "/ollamaflow/frontends", "/ollamaflow/backends/gone"} {
		status, raw := adminGet(t, p)
		require.Equal(t, http.StatusOK, status, p)
		everything = append(everything, string(raw))
	}
	status, raw = adminPost(t, "/ollamaflow/backends/a/refresh")
	require.Equal(t, http.StatusOK, status, string(raw))
	everything = append(everything, string(raw))
	status, raw = adminGet(t, "/ollamaflow/backends/nope")
	assert.Equal(t, http.StatusNotFound, status)
	everything = append(everything, string(raw))
	status, _ = adminPost(t, "/ollamaflow/backends/a")
	assert.Equal(t, http.StatusMethodNotAllowed, status)

	logs, err := os.ReadFile(logFile)
	require.NoError(t, err)
	require.Contains(t, string(logs), "backend down", "the log file is the one Caddy writes")
	everything = append(everything, string(logs))
	for _, s := range everything {
		assert.NotContains(t, s, "sekrit")
	}
	// The fake did get them: they are configured, only never shown.
	last, _ := a.LastRequest()
	assert.Equal(t, "Bearer sekrit-token", last.Header.Get("Authorization"))
}

func TestAdminDrain(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}}, "")
	loadCaddy(t, "lb_policy first\n"+lines) // a takes everything until drained
	waitKnown(t, fs)

	// A request in flight on a when it is drained: it finishes; new
	// requests go to b only.
	fs[0].Hold("/api/chat")
	held := make(chan int, 1)
	go func() {
		res, _ := post(t, "/api/chat", chatFor("tiny-llama"), "X-Test", "held")
		held <- res.StatusCode
	}()
	sa := pooled(t, fs[0].URL)
	require.Eventually(t, func() bool { return sa.inFlight.Load() == 1 }, 5*time.Second, time.Millisecond)
	var status int
	var raw []byte
	status, raw = adminPost(t, "/ollamaflow/backends/a/drain")
	require.Equal(t, http.StatusOK, status, string(raw))
	var st backendJSON
	require.NoError(t, json.Unmarshal(raw, &st))
	assert.True(t, st.Draining)
	assert.False(t, st.Idle, "its request is still in flight")

	for i := 0; i < 5; i++ {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"), "a drained server takes nothing new")
	}
	fs[0].Release()
	assert.Equal(t, http.StatusOK, <-held, "in-flight work finishes")
	// The slot is given back just after the answer's last byte went out.
	require.Eventually(t, func() bool { return sa.inFlight.Load() == 0 }, 5*time.Second, time.Millisecond)
	_, raw = adminGet(t, "/ollamaflow/backends/a")
	require.NoError(t, json.Unmarshal(raw, &st))
	assert.True(t, st.Draining)
	assert.True(t, st.Idle, "drained and idle: safe to stop")

	// The drain survives a reload that keeps the server.
	loadCaddy(t, "name reloaded\nlb_policy first\n"+lines)
	_, raw = adminGet(t, "/ollamaflow/backends/a")
	require.NoError(t, json.Unmarshal(raw, &st))
	assert.True(t, st.Draining)
	res, _ := post(t, "/api/chat", chatFor("tiny-llama"))
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	status, _ = adminPost(t, "/ollamaflow/backends/a/undrain")
	require.Equal(t, http.StatusOK, status)
}

// scrape returns the value of one sample line of /metrics, or -1.
func scrape(t *testing.T, metric string) float64 {
	t.Helper()
	status, raw := adminGet(t, "/metrics")
	require.Equal(t, http.StatusOK, status)
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, metric+" ") {
			var v float64
			_, err := fmt.Sscan(strings.TrimPrefix(line, metric+" "), &v)
			require.NoError(t, err)
			return v
		}
	}
	return -1
}

func TestMetricsAfterKnownTraffic(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "tiny-bert"}, Tokens: 4})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf("name metrics-test\nmodels tiny-llama tiny-bert\nbackend a %s {\nmax_parallel 2\n}", a.URL))
	waitKnown(t, []*fakeollama.Server{a})

	const l = `{backend="a",frontend="metrics-test",model="tiny-llama:latest",type="completion",code="200"}`
	counters := []string{
		`ollamaflow_requests_total` + sortLabels(l),
		`ollamaflow_requests_total{backend="a",code="200",frontend="metrics-test",model="tiny-bert:latest",type="embedding"}`,
		`ollamaflow_requests_total{backend="none",code="403",frontend="metrics-test",model="",type="completion"}`,
		`ollamaflow_tokens_total{backend="a",direction="completion",frontend="metrics-test",model="tiny-llama:latest"}`,
		`ollamaflow_tokens_total{backend="a",direction="prompt",frontend="metrics-test",model="tiny-llama:latest"}`,
		`ollamaflow_time_to_first_byte_seconds_count{backend="a",frontend="metrics-test",model="tiny-llama:latest"}`,
	}
	// Counters are kept across reloads that keep the frontend's name (an
	// earlier run of this test in the process, with -count): count from here.
	before := map[string]float64{}
	for _, c := range counters {
		before[c] = max(scrape(t, c), 0)
	}
	added := func(c string) float64 { return scrape(t, c) - before[c] }

	for i := 0; i < 3; i++ {
		res, body := post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"one two three"}]}`)
		require.Equal(t, http.StatusOK, res.StatusCode, body)
	}
	res, body := post(t, "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	res, body = post(t, "/api/embed", `{"model":"tiny-bert","input":"x"}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	res, _ = post(t, "/api/chat", `{"model":"made-up","messages":[]}`)
	require.Equal(t, http.StatusForbidden, res.StatusCode)

	assert.Equal(t, 4.0, added(counters[0]))
	assert.Equal(t, 1.0, added(counters[1]))
	assert.Equal(t, 1.0, added(counters[2]), "a made-up model name never becomes a label value")
	// 3 native chats of 4 tokens and one OpenAI stream with usage.
	assert.Equal(t, 16.0, added(counters[3]))
	assert.Positive(t, added(counters[4]))
	assert.Equal(t, 4.0, added(counters[5]))
	assert.Equal(t, 1.0, scrape(t, `ollamaflow_backend_healthy{backend="a",frontend="metrics-test"}`))
	assert.Equal(t, 0.0, scrape(t, `ollamaflow_backend_in_flight{backend="a",frontend="metrics-test"}`))
	assert.Equal(t, 0.0, scrape(t, `ollamaflow_queue_length{frontend="metrics-test"}`))
}

// sortLabels puts a label set in the order Prometheus prints it.
func sortLabels(set string) string {
	inner := strings.Split(strings.Trim(set, "{}"), ",")
	for i := range inner {
		for j := i + 1; j < len(inner); j++ {
			if inner[j] < inner[i] {
				inner[i], inner[j] = inner[j], inner[i]
			}
		}
	}
	return "{" + strings.Join(inner, ",") + "}"
}

// eventRecorder is an events handler module for tests: it keeps every
// event it is given.
type eventRecorder struct{}

var recorded = struct {
	sync.Mutex
	events []caddy.Event
}{}

func init() { caddy.RegisterModule(eventRecorder{}) }

func (eventRecorder) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "events.handlers.ollamaflow_test_recorder", New: func() caddy.Module { return new(eventRecorder) }}
}

func (eventRecorder) UnmarshalCaddyfile(d *caddyfile.Dispenser) error { return nil }

func (eventRecorder) Handle(_ context.Context, e caddy.Event) error {
	recorded.Lock()
	recorded.events = append(recorded.events, e)
	recorded.Unlock()
	return nil
}

func eventsNamed(name, url string) []caddy.Event {
	recorded.Lock()
	defer recorded.Unlock()
	var out []caddy.Event
	for _, e := range recorded.events {
		if e.Name() == name && e.Data["url"] == url {
			out = append(out, e)
		}
	}
	return out
}

func TestEventsBackendDownAndUp(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	cfg := strings.Replace(caddyConfig(fmt.Sprintf("backend evt %s {\nhealth_interval 50ms\nhealth_passes 1\nhealth_fails 1\n}", a.URL)),
		"skip_install_trust", "skip_install_trust\n\tevents {\n\t\ton ollamaflow.backend_up ollamaflow_test_recorder\n\t\ton ollamaflow.backend_down ollamaflow_test_recorder\n\t}", 1)
	loadCaddyRaw(t, cfg)
	require.Eventually(t, func() bool { return len(eventsNamed("ollamaflow.backend_up", a.URL)) == 1 }, 10*time.Second, 5*time.Millisecond)
	a.Close()
	require.Eventually(t, func() bool { return len(eventsNamed("ollamaflow.backend_down", a.URL)) == 1 }, 10*time.Second, 5*time.Millisecond)
	down := eventsNamed("ollamaflow.backend_down", a.URL)[0]
	assert.Equal(t, "evt", down.Data["backend"])
	assert.NotEmpty(t, down.Data["reason"])
	require.NoError(t, a.Restart())
	require.Eventually(t, func() bool { return len(eventsNamed("ollamaflow.backend_up", a.URL)) == 2 }, 10*time.Second, 5*time.Millisecond)
}

// adminDo sends a config-API request, as the README's curl examples do.
func adminDo(t *testing.T, method, path, body string) {
	t.Helper()
	res, err := adminRequest(method, path, "application/json", body)
	require.NoError(t, err)
	msg, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode, "%s %s: %s", method, path, msg)
	// A change through the admin API is a reload, which closes the old
	// server's kept-alive connections: as after loadCaddy, the next request
	// must not go out on one (a POST on it would fail with EOF).
	dropIdleConnections()
}

func TestLiveReconfigurationByID(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
	defer b.Close()
	cfg := fmt.Sprintf(`{
		"admin": {"listen": "localhost:%d"},
		"apps": {"http": {"servers": {"llm": {
			"listen": [":%d"],
			"routes": [{"handle": [{
				"handler": "ollamaflow", "@id": "llm", "name": "llm", "lb_policy": "first",
				"backends": [{"name": "a", "url": %q}]
			}]}]
		}}}}
	}`, adminPort, sitePort, a.URL)
	loadCaddyRaw(t, caddyConfig(fmt.Sprintf("backend a %s", a.URL))) // starts Caddy if need be
	adminDo(t, http.MethodPost, "/load", cfg)
	backendOf := func() string {
		res, body := postAfterReload(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		return res.Header.Get("X-OllamaFlow-Backend")
	}
	assert.Equal(t, "a", backendOf())

	// Add a backend in front of a: "first" now picks it.
	adminDo(t, http.MethodPut, "/id/llm/backends/0", fmt.Sprintf(`{"name":"b","url":%q}`, b.URL))
	assert.Equal(t, "b", backendOf())
	// Append one, change one, remove one, change the policy.
	adminDo(t, http.MethodPost, "/id/llm/backends", fmt.Sprintf(`{"name":"c","url":%q,"disabled":true}`, "127.0.0.1:1"))
	adminDo(t, http.MethodPost, "/id/llm/backends/0/disabled", `true`)
	assert.Equal(t, "a", backendOf(), "b is disabled")
	adminDo(t, http.MethodDelete, "/id/llm/backends/0", "")
	adminDo(t, http.MethodPatch, "/id/llm/lb_policy", `"least_conn"`)
	// As the README does it: POST sets the field even where the config
	// lacks it (a Caddyfile without lb_policy adapts to JSON without it).
	adminDo(t, http.MethodDelete, "/id/llm/lb_policy", "")
	adminDo(t, http.MethodPost, "/id/llm/lb_policy", `"round_robin"`)
	_, raw := adminGet(t, "/ollamaflow/frontends")
	var fr []frontendJSON
	require.NoError(t, json.Unmarshal(raw, &fr))
	require.Len(t, fr, 1)
	assert.Equal(t, "round_robin", fr[0].Policy)
	assert.Equal(t, []string{"a", "c"}, fr[0].Backends)
	assert.Nil(t, pooled(t, b.URL), "the removed backend's server is gone")
	assert.Equal(t, "a", backendOf())
}
