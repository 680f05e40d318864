package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// lastBody decodes the last body a fake received.
func lastBody(t *testing.T, f *fakeollama.Server) map[string]any {
	t.Helper()
	r, ok := f.LastRequest()
	require.True(t, ok, "the fake got no request")
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
	got := lastBody(t, a)
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
	got = lastBody(t, b)
	opts = got["options"].(map[string]any)
	assert.Equal(t, 2048.0, opts["num_ctx"], "b's num_ctx, not a's")
	assert.Equal(t, 7.0, opts["seed"])
	assert.Equal(t, 0.2, opts["temperature"])
	a.ClearFaults()
	pooled(t, a.URL).busyUntil.Store(0) // a sits out a second after its 503; not for this test

	// Embeddings get no completion pins.
	res, body = post(t, "/api/embed", `{"model":"tiny-llama","input":"x","options":{"num_ctx":5}}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	got = lastBody(t, a)
	assert.Equal(t, "tiny-llama", got["model"])
	assert.Equal(t, 5.0, got["options"].(map[string]any)["num_ctx"])

	// A body that is not a JSON object: 400.
	res, _ = post(t, "/api/chat", `["model","x"]`)
	assert.Equal(t, http.StatusBadRequest, res.StatusCode)
}
