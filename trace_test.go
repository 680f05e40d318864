package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// tracedRequest sends req through h inside a recording span, as Caddy's
// tracing handler would start it, with a replacer in the context as Caddy's
// server puts it there, and returns the ended span, the replacer and the
// answer.
func tracedRequest(t *testing.T, h *Handler, req *http.Request) (sdktrace.ReadOnlySpan, *caddy.Replacer, *httptest.ResponseRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	repl := caddy.NewReplacer()
	ctx := context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl)
	ctx, span := tp.Tracer("test").Start(ctx, "request")
	w := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(w, req.WithContext(ctx), nil))
	span.End()
	ended := rec.Ended()
	require.Len(t, ended, 1)
	return ended[0], repl, w
}

func spanAttrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	m := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value
	}
	return m
}

func TestSpanCarriesModelBackendAttemptsAndTokens(t *testing.T) {
	busy := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer busy.Close()
	ok := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer ok.Close()
	busy.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)
	loadCaddy(t, fmt.Sprintf(`
		lb_policy first
		backend busy %s {
			fail_threshold 1000
		}
		backend ok %s`, busy.URL, ok.URL))
	waitHealthy(t, busy.URL, stateHealthy)
	waitHealthy(t, ok.URL, stateHealthy)
	h := currentHandler(t)

	// Ollama API: busy answers 503, the retry on ok serves it.
	req := httptest.NewRequest(http.MethodPost, "/api/chat", strings.NewReader(`{"model":"Tiny-Llama","messages":[{"role":"user","content":"hi"}],"stream":false}`))
	span, repl, w := tracedRequest(t, h, req)
	require.Equal(t, http.StatusOK, w.Code, w.Body.String())
	body := w.Body.String()
	require.True(t, gjson.Get(body, "eval_count").Exists(), body)
	a := spanAttrs(span)
	assert.Equal(t, "tiny-llama:latest", a["gen_ai.request.model"].AsString())
	assert.Equal(t, "ok", a["ollamaflow.backend"].AsString())
	assert.Equal(t, int64(2), a["ollamaflow.attempts"].AsInt64())
	assert.Equal(t, int64(1), a["ollamaflow.retries"].AsInt64())
	assert.Equal(t, "completion", a["ollamaflow.request_kind"].AsString())
	assert.Equal(t, "ollama", a["ollamaflow.api"].AsString())
	assert.Equal(t, int64(http.StatusOK), a["http.response.status_code"].AsInt64())
	assert.Equal(t, gjson.Get(body, "prompt_eval_count").Int(), a["gen_ai.usage.input_tokens"].AsInt64())
	assert.Equal(t, gjson.Get(body, "eval_count").Int(), a["gen_ai.usage.output_tokens"].AsInt64())
	assert.Greater(t, a["ollamaflow.time_to_first_byte_ms"].AsFloat64(), 0.0)
	_, sticky := a["ollamaflow.sticky"]
	assert.False(t, sticky, "no sticky attribute without sticky")
	// One event per attempt: the failed one says why.
	events := span.Events()
	require.Len(t, events, 2)
	first := map[attribute.Key]string{}
	for _, kv := range events[0].Attributes {
		first[kv.Key] = kv.Value.AsString()
	}
	assert.Equal(t, "busy", first["ollamaflow.backend"])
	assert.Contains(t, first["ollamaflow.failure"], "503")
	// The placeholders: the last attempt's backend, the normalised model.
	assert.Equal(t, "ok", repl.ReplaceAll("{http.ollamaflow.backend}", ""))
	assert.Equal(t, "tiny-llama:latest", repl.ReplaceAll("{http.ollamaflow.model}", ""))

	// OpenAI API: the counts come from usage.
	req = httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(chatBody))
	span, _, w = tracedRequest(t, h, req)
	require.Equal(t, http.StatusOK, w.Code, w.Body.String())
	body = w.Body.String()
	require.True(t, gjson.Get(body, "usage.completion_tokens").Exists(), body)
	a = spanAttrs(span)
	assert.Equal(t, "openai", a["ollamaflow.api"].AsString())
	assert.Equal(t, gjson.Get(body, "usage.prompt_tokens").Int(), a["gen_ai.usage.input_tokens"].AsInt64())
	assert.Equal(t, gjson.Get(body, "usage.completion_tokens").Int(), a["gen_ai.usage.output_tokens"].AsInt64())

	// A refused request: no backend, no tokens, the error status.
	req = httptest.NewRequest(http.MethodPost, "/api/chat", strings.NewReader(`{"messages":[]`))
	span, _, w = tracedRequest(t, h, req)
	require.Equal(t, http.StatusBadRequest, w.Code)
	a = spanAttrs(span)
	assert.Equal(t, int64(http.StatusBadRequest), a["http.response.status_code"].AsInt64())
	for _, k := range []attribute.Key{"ollamaflow.backend", "gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"} {
		_, has := a[k]
		assert.False(t, has, "refused request has %s", k)
	}
}

// TestPlaceholdersInHeadersAndAccessLog uses the placeholders the way a
// user would: a deferred header and a field appended to the access log.
func TestPlaceholdersInHeadersAndAccessLog(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	logFile := filepath.Join(t.TempDir(), "access.log")
	cfg := fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	skip_install_trust
}
:%d {
	log {
		output file %s
		format json
	}
	route {
		header >X-Model {http.ollamaflow.model}
		header >X-Served-By {http.ollamaflow.backend}
		log_append served_by {http.ollamaflow.backend}
		log_append model {http.ollamaflow.model}
		ollamaflow {
			backend gpu1 %s
		}
	}
}
`, adminPort, sitePort, tlsPort, sitePort, logFile, a.URL)
	loadCaddyRaw(t, cfg)
	waitHealthy(t, a.URL, stateHealthy)

	res, body := post(t, "/api/generate", `{"model":"tiny-llama","prompt":"hi","stream":false}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "tiny-llama:latest", res.Header.Get("X-Model"))
	assert.Equal(t, "gpu1", res.Header.Get("X-Served-By"))

	// The access log is written after the response: wait for the line.
	var entry map[string]any
	require.Eventually(t, func() bool {
		data, err := os.ReadFile(logFile)
		if err != nil {
			return false
		}
		for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
			if gjson.Get(line, "request.uri").String() == "/api/generate" {
				return json.Unmarshal([]byte(line), &entry) == nil
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond)
	assert.Equal(t, "gpu1", entry["served_by"])
	assert.Equal(t, "tiny-llama:latest", entry["model"])
}
