package ollamaflow

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// fakes starts n fake Ollamas, named a, b, c…, with the given models each,
// and returns them with the Caddyfile backend lines naming them.
func fakes(t *testing.T, models [][]string, backendOpts string) ([]*fakeollama.Server, string) {
	t.Helper()
	var list []*fakeollama.Server
	var lines []string
	for i, m := range models {
		f := fakeollama.New(fakeollama.Config{Models: m, Tokens: 2})
		t.Cleanup(f.Close)
		list = append(list, f)
		name := string(rune('a' + i))
		if backendOpts != "" {
			lines = append(lines, fmt.Sprintf("backend %s %s {\n%s\n}", name, f.URL, backendOpts))
		} else {
			lines = append(lines, fmt.Sprintf("backend %s %s", name, f.URL))
		}
	}
	return list, strings.Join(lines, "\n")
}

// waitKnown waits until the proxy has read every fake's model lists.
func waitKnown(t *testing.T, fs []*fakeollama.Server) {
	t.Helper()
	for _, f := range fs {
		require.Eventually(t, func() bool {
			s := pooled(t, f.URL)
			return s != nil && s.models.Load().known
		}, 10*time.Second, 5*time.Millisecond, "lists of %s never read", f.URL)
	}
}

func chatFor(model string) string {
	return fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hi"}],"stream":false}`, model)
}

func TestModelsRouteOnlyWhereTheModelIs(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"other"}, {"tiny-llama"}, {"other"}}, "")
	loadCaddy(t, lines)
	waitKnown(t, fs)
	for i := 0; i < 50; i++ {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		require.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Zero(t, fs[0].Count("/api/chat")+fs[2].Count("/api/chat"), "no request reached a server without the model")
	assert.Equal(t, 50, fs[1].Count("/api/chat"))
}

func TestModelsMissEverywhere(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}}, "")
	loadCaddy(t, lines)
	waitKnown(t, fs)

	res, body := post(t, "/api/chat", chatFor("nope"))
	assert.Equal(t, http.StatusNotFound, res.StatusCode)
	var oe struct{ Error string }
	require.NoError(t, json.Unmarshal([]byte(body), &oe))
	assert.Contains(t, oe.Error, `model "nope:latest" not found`)

	res, body = post(t, "/v1/chat/completions", `{"model":"nope","messages":[]}`)
	assert.Equal(t, http.StatusNotFound, res.StatusCode)
	var ae struct {
		Error struct{ Message, Type, Code string } `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &ae))
	assert.Equal(t, "model_not_found", ae.Error.Code)

	// A server that gains the model serves it without a reload: a routing
	// miss rereads the lists (at most once a second per server).
	fs[1].SetModels("tiny-llama", "nope")
	start := time.Now()
	var got int
	require.Eventually(t, func() bool {
		res, _ := post(t, "/api/chat", chatFor("nope"))
		got = res.StatusCode
		return got == http.StatusOK
	}, 5*time.Second, 50*time.Millisecond)
	t.Logf("a model added on a backend was served %s later", time.Since(start).Round(time.Millisecond))
	assert.Zero(t, fs[0].Count("/api/chat"), "only b has nope; tiny-llama was never asked for here")
}

func TestModelsLoadedPreferred(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}, {"tiny-llama"}}, "")
	fs[2].SetLoaded("tiny-llama")
	loadCaddy(t, lines)
	for _, f := range fs {
		waitHealthy(t, f.URL, stateHealthy)
	}
	require.Eventually(t, func() bool { return pooled(t, fs[2].URL).models.Load().isLoaded("tiny-llama:latest") }, 5*time.Second, 5*time.Millisecond)
	for i := 0; i < 10; i++ {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "c", res.Header.Get("X-OllamaFlow-Backend"), "the server with the model in memory wins")
	}
}

func TestRequiredModelsConverge(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"other"}, {}}, "model_refresh 1h")
	start := time.Now()
	// round_robin: least_conn would keep to the server where the model got
	// loaded first, and this test wants to see every server serve it.
	loadCaddy(t, "lb_policy round_robin\nrequired_models tiny-llama\n"+lines)
	for _, f := range fs {
		require.Eventually(t, func() bool {
			for _, m := range f.Models() {
				if normalizeModel(m) == "tiny-llama:latest" {
					return true
				}
			}
			return false
		}, 10*time.Second, 5*time.Millisecond)
	}
	converged := time.Since(start)
	// …and the proxy knows without waiting for model_refresh.
	for _, f := range fs {
		s := pooled(t, f.URL)
		require.Eventually(t, func() bool { has, _ := s.models.Load().has("tiny-llama:latest"); return has }, 5*time.Second, 5*time.Millisecond)
	}
	t.Logf("required model on all 3 servers %s after the config load (%s until routable)", converged.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	assert.Zero(t, fs[0].Count("/api/pull"), "a server that has the model is not asked to pull it")
	assert.Equal(t, 1, fs[1].Count("/api/pull"))
	assert.Equal(t, 1, fs[2].Count("/api/pull"))

	served := map[string]int{}
	for i := 0; i < 30; i++ {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		served[res.Header.Get("X-OllamaFlow-Backend")]++
	}
	assert.Len(t, served, 3, "all three serve it: %v", served)
}

func TestRequiredModelPullFailuresRetryWithBackoff(t *testing.T) {
	defer func(b, s time.Duration) { pullBackoffBase, pullStallTimeout = b, s }(pullBackoffBase, pullStallTimeout)
	// A stall is 1 s without progress: at 300 ms a starved fake (-race, a
	// loaded machine) looked stalled before it sent its error line.
	pullBackoffBase, pullStallTimeout = 100*time.Millisecond, time.Second

	cases := []struct {
		name  string
		fault func(f *fakeollama.Server)
		want  string
	}{
		{"error line", func(f *fakeollama.Server) { f.FailPulls("pull model manifest: connection refused") }, "connection refused"},
		{"cut mid-stream", func(f *fakeollama.Server) { f.DieMidStream(2, "/api/pull") }, "progress stream"},
		{"stalled", func(f *fakeollama.Server) { f.HangAfterHeaders("/api/pull") }, "no progress for 1s"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fs, lines := fakes(t, [][]string{{}}, "model_refresh 100ms")
			c.fault(fs[0])
			loadCaddy(t, "required_models tiny-llama\n"+lines)
			s := waitHealthy(t, fs[0].URL, stateHealthy)
			var ps pullState
			require.Eventually(t, func() bool {
				for _, p := range s.pullSnapshot() {
					ps = p
					return p.Attempts >= 2 && !p.Active && p.Error != ""
				}
				return false
			}, 10*time.Second, 5*time.Millisecond, "no failed retry recorded")
			assert.Contains(t, ps.Error, c.want)
			assert.Equal(t, "tiny-llama", ps.Model)
			assert.True(t, ps.NextRetry.After(ps.Started), "a retry is scheduled")

			// While nobody has the model and nothing is pulling it: 404.
			// Once the fault clears, the next retry succeeds.
			fs[0].ClearFaults()
			require.Eventually(t, func() bool { has, _ := s.models.Load().has("tiny-llama:latest"); return has }, 10*time.Second, 5*time.Millisecond)
			res, body := post(t, "/api/chat", chatFor("tiny-llama"))
			assert.Equal(t, http.StatusOK, res.StatusCode, body)
		})
	}
}

func TestModelOnlyBeingPulledAnswers503(t *testing.T) {
	fs, lines := fakes(t, [][]string{{}}, "")
	fs[0].Hold("/api/pull")
	defer fs[0].Release()
	loadCaddy(t, "required_models tiny-llama\n"+lines)
	s := waitHealthy(t, fs[0].URL, stateHealthy)
	require.Eventually(t, func() bool { return s.pulling("tiny-llama:latest") }, 5*time.Second, 5*time.Millisecond)
	res, body := post(t, "/api/generate", `{"model":"tiny-llama","prompt":"hi"}`)
	assert.Equal(t, http.StatusServiceUnavailable, res.StatusCode, body)
	assert.NotEmpty(t, res.Header.Get("Retry-After"))
	assert.Contains(t, body, "being pulled")
}

func TestAggregatedModelLists(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"m1", "m2"}, {"m2", "M3:q4"}, {"m4"}}, "")
	fs[0].SetLoaded("m1")
	fs[1].SetLoaded("m2")
	loadCaddy(t, "models m1 m2 m3:q4\n"+lines)

	r, err := client.Get(siteURL + "/api/tags")
	require.NoError(t, err)
	var tags struct {
		Models []struct {
			Name, Model, Digest string
			Details             map[string]any
		}
	}
	require.NoError(t, json.NewDecoder(r.Body).Decode(&tags))
	r.Body.Close()
	var names []string
	for _, m := range tags.Models {
		names = append(names, normalizeModel(m.Name))
		assert.NotEmpty(t, m.Digest, "entries keep Ollama's shape")
		assert.NotNil(t, m.Details)
	}
	sort.Strings(names)
	assert.Equal(t, []string{"m1:latest", "m2:latest", "m3:q4"}, names, "each model once, m4 filtered by the allow-list")

	r, err = client.Get(siteURL + "/v1/models")
	require.NoError(t, err)
	var list struct {
		Object string
		Data   []struct {
			ID, Object string
			Created    int64
			OwnedBy    string `json:"owned_by"`
		}
	}
	require.NoError(t, json.NewDecoder(r.Body).Decode(&list))
	r.Body.Close()
	assert.Equal(t, "list", list.Object)
	require.Len(t, list.Data, 3)
	for _, m := range list.Data {
		assert.Equal(t, "model", m.Object)
		assert.Equal(t, "library", m.OwnedBy)
		assert.Positive(t, m.Created)
	}

	r, err = client.Get(siteURL + "/api/ps")
	require.NoError(t, err)
	var ps struct {
		Models []struct{ Name, Backend string }
	}
	require.NoError(t, json.NewDecoder(r.Body).Decode(&ps))
	r.Body.Close()
	got := map[string]string{}
	for _, m := range ps.Models {
		got[normalizeModel(m.Name)] = m.Backend
	}
	assert.Equal(t, map[string]string{"m1:latest": "a", "m2:latest": "b"}, got)

	// /api/show and /v1/models/{model} go to a server that has the model.
	res, body := post(t, "/api/show", `{"model":"m3:q4"}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	r, err = client.Get(siteURL + "/v1/models/m1")
	require.NoError(t, err)
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	require.Equal(t, http.StatusOK, r.StatusCode, string(b))
	assert.Equal(t, "a", r.Header.Get("X-OllamaFlow-Backend"))
	r, err = client.Get(siteURL + "/v1/models/m4")
	require.NoError(t, err)
	r.Body.Close()
	assert.Equal(t, http.StatusForbidden, r.StatusCode, "the allow-list holds for single-model reads too")
}

// ndjsonLines reads a whole NDJSON body.
func ndjsonLines(t *testing.T, r io.Reader) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), sc.Text())
		out = append(out, m)
	}
	return out
}

func TestManagementFanOut(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}, {"tiny-llama"}}, "")
	loadCaddy(t, "allow_model_management\n"+lines)

	res, err := client.Post(siteURL+"/api/pull", "application/json", strings.NewReader(`{"model":"fresh"}`))
	require.NoError(t, err)
	assert.Equal(t, "application/x-ndjson", res.Header.Get("Content-Type"))
	got := ndjsonLines(t, res.Body)
	res.Body.Close()
	require.NotEmpty(t, got)
	assert.Equal(t, map[string]any{"status": "success"}, got[len(got)-1], "one success, at the end")
	backends := map[any]bool{}
	for _, l := range got[:len(got)-1] {
		require.Contains(t, l, "backend", "every progress line names its backend: %v", l)
		backends[l["backend"]] = true
		assert.NotEqual(t, "success", l["status"])
		if c, ok := l["completed"].(float64); ok {
			assert.LessOrEqual(t, c, l["total"].(float64), "merged progress never exceeds the layer size")
		}
	}
	assert.Len(t, backends, 3)
	for _, f := range fs {
		assert.Contains(t, f.Models(), "fresh:latest")
	}
	// Routable at once: the fan-out reread the lists before answering.
	r2, body := post(t, "/api/chat", chatFor("fresh"))
	assert.Equal(t, http.StatusOK, r2.StatusCode, body)

	// One server failing: the stream ends with an error naming it.
	fs[1].FailPulls("registry unreachable")
	res, err = client.Post(siteURL+"/api/pull", "application/json", strings.NewReader(`{"model":"other"}`))
	require.NoError(t, err)
	got = ndjsonLines(t, res.Body)
	res.Body.Close()
	last := got[len(got)-1]
	require.Contains(t, last, "error")
	assert.Contains(t, last["error"], "b (registry unreachable)")
	assert.NotContains(t, last["error"], "a (")
	for _, l := range got[:len(got)-1] {
		assert.NotContains(t, l, "error", "only the last line is an error: clients stop at the first")
	}

	// stream:false gets one JSON answer.
	r3, body := post(t, "/api/pull", `{"model":"other2","stream":false}`)
	assert.Equal(t, http.StatusBadGateway, r3.StatusCode)
	assert.Contains(t, body, "registry unreachable")
	fs[1].ClearFaults()
	r3, body = post(t, "/api/pull", `{"model":"other2","stream":false}`)
	assert.Equal(t, http.StatusOK, r3.StatusCode, body)
	assert.JSONEq(t, `{"status":"success"}`, body)

	// Delete goes everywhere; a server that lacks the model is no failure.
	req, _ := http.NewRequest(http.MethodDelete, siteURL+"/api/delete", strings.NewReader(`{"model":"other"}`))
	r4, err := client.Do(req)
	require.NoError(t, err)
	r4.Body.Close()
	assert.Equal(t, http.StatusOK, r4.StatusCode)
	for _, f := range fs {
		assert.NotContains(t, f.Models(), "other:latest")
	}
	req, _ = http.NewRequest(http.MethodDelete, siteURL+"/api/delete", strings.NewReader(`{"model":"other"}`))
	r4, err = client.Do(req)
	require.NoError(t, err)
	r4.Body.Close()
	assert.Equal(t, http.StatusNotFound, r4.StatusCode, "nobody has it any more")
}
