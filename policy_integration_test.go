package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// lastBody decodes the last body a fake received at path.
func lastBody(t *testing.T, f *fakeollama.Server, path string) map[string]any {
	t.Helper()
	r, ok := f.LastRequestTo(path)
	require.True(t, ok, "the fake got no request at %s", path)
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.Body, &m), string(r.Body))
	return m
}

func TestPinsThroughTheProxy(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "pinned"}, Tokens: 1})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "pinned"}, Tokens: 1})
	defer b.Close()
	loadCaddy(t, fmt.Sprintf(`
		lb_policy first
		pin_completions {
			model pinned
			options.temperature 0.2
		}
		backend a %s {
			fail_threshold 1000
			pin_completions {
				options.num_ctx 8192
			}
		}
		backend b %s {
			pin_completions {
				options.num_ctx 2048
				options.seed 7
			}
		}`, a.URL, b.URL))
	waitKnown(t, []*fakeollama.Server{a, b})

	// The client asks for another model, in another case, with a duplicate:
	// the frontend's pinned model wins, and routes.
	res, body := post(t, "/api/chat", `{"model":"tiny-llama","MODEL":"x","options":{"temperature":1.5,"num_ctx":99},"messages":[{"role":"user","content":"hi"}],"stream":false}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
	got := lastBody(t, a, "/api/chat")
	assert.Equal(t, "pinned", got["model"])
	assert.NotContains(t, got, "MODEL")
	opts := got["options"].(map[string]any)
	assert.Equal(t, 0.2, opts["temperature"])
	assert.Equal(t, 8192.0, opts["num_ctx"], "a's own pin")
	assert.NotContains(t, opts, "seed", "b's pins never reach a")

	// a fails before the first byte: the retry on b carries b's pins only.
	a.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)
	res, body = post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	got = lastBody(t, b, "/api/chat")
	opts = got["options"].(map[string]any)
	assert.Equal(t, 2048.0, opts["num_ctx"], "b's num_ctx, not a's")
	assert.Equal(t, 7.0, opts["seed"])
	assert.Equal(t, 0.2, opts["temperature"])
	a.ClearFaults()
	pooled(t, a.URL).busyUntil.Store(0) // a sits out a second after its 503; not for this test

	// Embeddings get no completion pins.
	res, body = post(t, "/api/embed", `{"model":"tiny-llama","input":"x","options":{"num_ctx":5}}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	got = lastBody(t, a, "/api/embed")
	assert.Equal(t, "tiny-llama", got["model"])
	assert.Equal(t, 5.0, got["options"].(map[string]any)["num_ctx"])

	// A body that is not a JSON object: 400.
	res, _ = post(t, "/api/chat", `["model","x"]`)
	assert.Equal(t, http.StatusBadRequest, res.StatusCode)
}

// TestAllowListReadsTheModelOllamaRuns: a model hidden behind a case
// variant, an escaped key or a duplicate is the model the allow-list sees,
// on both APIs, and the backend gets one spelling of it.
func TestAllowListReadsTheModelOllamaRuns(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "forbidden"}, Tokens: 1})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		models tiny-llama
		backend a %s`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})

	for _, tc := range []struct{ path, body string }{
		{"/api/chat", `{"model":"tiny-llama","MODEL":"forbidden","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{"/api/generate", `{"model":"tiny-llama","mod\u0065l":"forbidden","prompt":"hi","stream":false}`},
		{"/api/embed", `{"model":"tiny-llama","input":"x","Model":"forbidden"}`},
		{"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"\u004dODEL":"forbidden"}`},
		{"/v1/completions", `{"model":"tiny-llama","prompt":"hi","model":"forbidden"}`},
		{"/v1/embeddings", `{"model":"tiny-llama","input":"x","MoDeL":"forbidden"}`},
		{"/api/show", `{"model":"","name":"forbidden"}`},
	} {
		before := len(posted(a))
		res, body := post(t, tc.path, tc.body)
		assert.Equal(t, http.StatusForbidden, res.StatusCode, "%s %s: %s", tc.path, tc.body, body)
		assert.Contains(t, body, `forbidden`)
		assert.Len(t, posted(a), before, "%s: nothing reached the backend", tc.path)
	}

	// The other way round the allowed model is the one that runs, and the
	// backend reads it from the only spelling left.
	for _, tc := range []struct{ path, body string }{
		{"/api/chat", `{"model":"forbidden","MODEL":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{"/v1/chat/completions", `{"model":"forbidden","messages":[{"role":"user","content":"hi"}],"mod\u0065l":"tiny-llama"}`},
		{"/v1/embeddings", `{"MODEL":"forbidden","input":"x","model":"tiny-llama"}`},
		{"/api/show", `{"model":"tiny-llama","name":"forbidden","NAME":"forbidden"}`},
	} {
		res, body := post(t, tc.path, tc.body)
		require.Equal(t, http.StatusOK, res.StatusCode, "%s: %s", tc.path, body)
		r, ok := a.LastRequestTo(tc.path)
		require.True(t, ok)
		var req struct {
			Model string `json:"model"`
			Name  string `json:"name"`
		}
		require.NoError(t, json.Unmarshal(r.Body, &req))
		assert.Equal(t, "tiny-llama", req.Model, "%s: %s", tc.path, r.Body)
		assert.Empty(t, req.Name, "%s: %s", tc.path, r.Body)
		assert.Equal(t, 1, countFold(topLevelKeys(t, r.Body), "model", "name"), "%s: %s", tc.path, r.Body)
	}
}

// TestModelNotFoundRefreshesInsteadOfRemoving: a backend whose lists say
// it has the model answers "model not found". The request moves on to
// another backend, the first one's lists are read again, and the model is
// not struck off them on the strength of that answer alone.
func TestModelNotFoundRefreshesInsteadOfRemoving(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
	defer b.Close()
	loadCaddy(t, fmt.Sprintf(`
		lb_policy first
		backend a %s {
			fail_threshold 1000
		}
		backend b %s`, a.URL, b.URL))
	waitKnown(t, []*fakeollama.Server{a, b})

	a.FailWith(http.StatusNotFound, `{"error":"model 'tiny-llama' not found"}`, "/api/chat")
	a.Hold("/api/tags") // the refresh the answer asks for stays in flight
	defer a.Release()
	tagsBefore := a.Count("/api/tags")
	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	has, _ := pooled(t, a.URL).models.Load().has("tiny-llama:latest")
	assert.True(t, has, "one not-found answer must not remove the model from a's lists")
	require.Eventually(t, func() bool { return a.Count("/api/tags") > tagsBefore }, 10*time.Second, 5*time.Millisecond,
		"a's lists are read again")
}

// TestPolicyHoldsOnBothAPIs: hostile bodies on the six inference
// endpoints, through a frontend with an allow-list and pins. Whatever the
// client sends, every body the backend gets, decoded the way Ollama's own
// request types decode it, runs an allowed model with every pinned field
// at its pin, on the native and the OpenAI-compatible API alike.
func TestPolicyHoldsOnBothAPIs(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "forbidden"}, Tokens: 1})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		models tiny-llama
		pin_completions {
			options.temperature 0.25
			options.top_p 0.5
			options.seed 7
			options.stop ["END"]
			max_tokens 64
		}
		pin_embeddings {
			dimensions 128
		}
		backend a %s`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})

	wantOpts := map[string]any{"temperature": 0.25, "top_p": 0.5, "seed": 7.0, "stop": []any{"END"}, "num_predict": 64.0}
	models := []string{
		`"model":"tiny-llama"`,
		`"model":"tiny-llama","MODEL":"forbidden"`,
		`"model":"forbidden","mod\u0065l":"tiny-llama"`,
		`"MODEL":"tiny-llama","model":null`,
		`"model":"tiny-llama","\u004dODEL":"forbidden","model":"tiny-llama"`,
	}
	completion := []string{
		`"temperature":2,"TEMPERATURE":1.5,"top_p":0.99,"seed":1,"stop":"x","max_tokens":100000,"MAX_TOKENS":5`,
		`"options":{"temperature":2,"Temperature":3,"num_predict":-1,"seed":9},"OPTIONS":{"stop":["y"]}`,
		`"t\u0065mperature":2,"Top_P":1,"options":null,"max_tokens":null,"SEED":null`,
	}
	embedding := []string{`"dimensions":4096`, `"Dimensions":1,"dimensions":null`, `"d\u0069mensions":2`}

	ran, refused := 0, 0
	for _, path := range []string{"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions", "/api/embed", "/v1/embeddings"} {
		extras, payload := completion, `"messages":[{"role":"user","content":"hi"}],"prompt":"hi","stream":false`
		if strings.Contains(path, "embed") {
			extras, payload = embedding, `"input":"x"`
		}
		for _, m := range models {
			for _, x := range extras {
				body := "{" + m + "," + payload + "," + x + "}"
				before := len(posted(a))
				res, answer := post(t, path, body)
				reqs := posted(a)
				if res.StatusCode != http.StatusOK {
					assert.Equal(t, http.StatusForbidden, res.StatusCode, "%s %s: %s", path, body, answer)
					assert.Len(t, reqs, before, "%s %s: refused, yet it reached the backend", path, body)
					refused++
					continue
				}
				ran++
				require.Len(t, reqs, before+1, "%s %s", path, body)
				got := reqs[len(reqs)-1].Body
				switch path {
				case "/api/chat", "/api/generate":
					var req struct {
						Model   string         `json:"model"`
						Options map[string]any `json:"options"`
					}
					decodeLikeOllama(t, got, &req)
					assert.Equal(t, "tiny-llama", req.Model, "%s %s\n%s", path, body, got)
					for k, v := range wantOpts {
						assert.Equal(t, v, req.Options[k], "%s options.%s\n%s\n%s", path, k, body, got)
					}
				case "/v1/chat/completions":
					var req oaChatRequest
					decodeLikeOllama(t, got, &req)
					e := effectiveChat(t, req)
					assert.Equal(t, "tiny-llama", e.Model, "%s %s\n%s", path, body, got)
					for k, v := range wantOpts {
						assert.Equal(t, v, e.Options[k], "%s %s\n%s\n%s", path, k, body, got)
					}
				case "/v1/completions":
					var req oaCompletionRequest
					decodeLikeOllama(t, got, &req)
					assert.Equal(t, "tiny-llama", req.Model, "%s %s\n%s", path, body, got)
					if assert.NotNil(t, req.Temperature) && assert.NotNil(t, req.Seed) && assert.NotNil(t, req.MaxTokens) {
						assert.Equal(t, float32(0.25), *req.Temperature)
						assert.Equal(t, 7, *req.Seed)
						assert.Equal(t, 64, *req.MaxTokens)
					}
					assert.Equal(t, float32(0.5), req.TopP)
					assert.Equal(t, []any{"END"}, req.Stop, "%s\n%s", body, got)
				case "/api/embed":
					var req struct {
						Model      string `json:"model"`
						Dimensions int    `json:"dimensions"`
					}
					decodeLikeOllama(t, got, &req)
					assert.Equal(t, "tiny-llama", req.Model, "%s %s\n%s", path, body, got)
					assert.Equal(t, 128, req.Dimensions, "%s %s\n%s", path, body, got)
				case "/v1/embeddings":
					var req oaEmbedRequest
					decodeLikeOllama(t, got, &req)
					assert.Equal(t, "tiny-llama", req.Model, "%s %s\n%s", path, body, got)
					assert.Equal(t, 128, req.Dimensions, "%s %s\n%s", path, body, got)
				}
			}
		}
	}
	// Both ways round were tried: the allowed model hidden behind the
	// forbidden one ran, the forbidden one hidden behind the allowed one
	// was refused.
	assert.Equal(t, 6*3*4, ran)
	assert.Equal(t, 6*3*1, refused)
}

// posted is what the fake was sent with POST: the proxied requests, not
// the health probes and list reads that run beside them (a probe's phase
// may fall within a test).
func posted(f *fakeollama.Server) []fakeollama.Request {
	var out []fakeollama.Request
	for _, r := range f.Requests() {
		if r.Method == http.MethodPost {
			out = append(out, r)
		}
	}
	return out
}
