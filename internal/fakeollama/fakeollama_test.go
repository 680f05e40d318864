package fakeollama_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func newFake(t *testing.T, cfg fakeollama.Config) *fakeollama.Server {
	t.Helper()
	if cfg.Models == nil {
		cfg.Models = []string{"tiny-llama", "tiny-bert:latest"}
	}
	f := fakeollama.New(cfg)
	t.Cleanup(f.Close)
	return f
}

func do(t *testing.T, method, url, body string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

func post(t *testing.T, url, body string) (*http.Response, string) {
	t.Helper()
	return do(t, http.MethodPost, url, body)
}

func decode(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(s), &m), s)
	return m
}

func lines(t *testing.T, body string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		out = append(out, decode(t, l))
	}
	return out
}

// events splits an SSE body into its data payloads.
func events(t *testing.T, body string) []string {
	t.Helper()
	require.True(t, strings.HasSuffix(body, "\n\n"), body)
	var out []string
	for _, e := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		data, ok := strings.CutPrefix(e, "data: ")
		require.True(t, ok, e)
		out = append(out, data)
	}
	return out
}

var finalMetrics = []string{"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}

func TestRootVersionAndRouting(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Version: "9.9.9"})

	resp, body := do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "Ollama is running", body)
	assert.Equal(t, "text/plain; charset=utf-8", resp.Header.Get("Content-Type"))

	resp, body = do(t, http.MethodHead, f.URL+"/", "")
	assert.Equal(t, 200, resp.StatusCode)
	assert.Empty(t, body)

	resp, body = do(t, http.MethodGet, f.URL+"/api/version", "")
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, `{"version":"9.9.9"}`, body)
	assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))

	resp, body = do(t, http.MethodGet, f.URL+"/api/nope", "")
	assert.Equal(t, 404, resp.StatusCode)
	assert.Equal(t, "404 page not found", body)
	assert.Equal(t, "text/plain", resp.Header.Get("Content-Type"))

	resp, body = do(t, http.MethodGet, f.URL+"/api/chat", "")
	assert.Equal(t, 405, resp.StatusCode)
	assert.Equal(t, "405 method not allowed", body)
	assert.Equal(t, "POST", resp.Header.Get("Allow"))
	resp, _ = do(t, http.MethodPost, f.URL+"/api/tags", "")
	assert.Equal(t, "HEAD, GET", resp.Header.Get("Allow"))
}

func TestTagsPsShow(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama", "registry.ollama.ai/library/tiny-bert", "example.com:5000/team/x:1b"}, Loaded: []string{"tiny-bert"}})

	resp, body := do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Equal(t, 200, resp.StatusCode)
	var tags struct {
		Models []struct {
			Name, Model, Digest string
			ModifiedAt          time.Time `json:"modified_at"`
			Size                int64
			Details             map[string]any
		}
	}
	require.NoError(t, json.Unmarshal([]byte(body), &tags))
	require.Len(t, tags.Models, 3)
	var names []string
	for _, m := range tags.Models {
		names = append(names, m.Name)
		assert.Equal(t, m.Name, m.Model)
		assert.Len(t, m.Digest, 64)
		assert.Positive(t, m.Size)
		assert.False(t, m.ModifiedAt.IsZero())
		for _, k := range []string{"parent_model", "format", "family", "families", "parameter_size", "quantization_level"} {
			assert.Contains(t, m.Details, k)
		}
	}
	assert.Equal(t, []string{"tiny-llama:latest", "tiny-bert:latest", "example.com:5000/team/x:1b"}, names)

	_, body = do(t, http.MethodGet, f.URL+"/api/ps", "")
	ps := decode(t, body)["models"].([]any)
	require.Len(t, ps, 1)
	m := ps[0].(map[string]any)
	assert.Equal(t, "tiny-bert:latest", m["name"])
	for _, k := range []string{"model", "size", "digest", "details", "expires_at", "size_vram", "context_length"} {
		assert.Contains(t, m, k)
	}

	// A completion loads its model; names match case-insensitively and without the tag.
	resp, _ = post(t, f.URL+"/api/generate", `{"model":"TINY-LLAMA","prompt":"hi","stream":false}`)
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, []string{"tiny-bert:latest", "tiny-llama:latest"}, f.Loaded())

	resp, body = post(t, f.URL+"/api/show", `{"model":"tiny-llama"}`)
	assert.Equal(t, 200, resp.StatusCode)
	show := decode(t, body)
	for _, k := range []string{"modelfile", "parameters", "template", "details", "model_info", "capabilities", "modified_at"} {
		assert.Contains(t, show, k)
	}
	resp, body = post(t, f.URL+"/api/show", `{"name":"nope"}`)
	assert.Equal(t, 404, resp.StatusCode)
	assert.Equal(t, `{"error":"model 'nope' not found"}`, body)

	f.SetModels()
	_, body = do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Equal(t, `{"models":[]}`, body)
}

// readLines reads an NDJSON stream line by line, noting when each line arrived.
func readLines(t *testing.T, resp *http.Response) (out []map[string]any, arrived []time.Time) {
	t.Helper()
	r := bufio.NewReader(resp.Body)
	for {
		l, err := r.ReadBytes('\n')
		if len(l) > 0 {
			arrived = append(arrived, time.Now())
			out = append(out, decode(t, string(l)))
		}
		if errors.Is(err, io.EOF) {
			return out, arrived
		}
		require.NoError(t, err)
	}
}

func TestChatStreamsOneFlushedLinePerToken(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 4, TokenGap: 30 * time.Millisecond})

	resp, err := http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"why is the sky blue"}]}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))

	ls, arrived := readLines(t, resp)
	require.Len(t, ls, 5)
	var text strings.Builder
	for _, l := range ls[:4] {
		assert.Equal(t, false, l["done"])
		assert.Equal(t, "tiny-llama", l["model"], "the model is echoed as the client wrote it")
		msg := l["message"].(map[string]any)
		assert.Equal(t, "assistant", msg["role"])
		text.WriteString(msg["content"].(string))
		for _, k := range finalMetrics {
			assert.NotContains(t, l, k)
		}
	}
	assert.Equal(t, fakeollama.Text(4), text.String())

	final := ls[4]
	assert.Equal(t, true, final["done"])
	assert.Equal(t, "stop", final["done_reason"])
	assert.Equal(t, "", final["message"].(map[string]any)["content"])
	for _, k := range finalMetrics {
		assert.Contains(t, final, k)
	}
	assert.EqualValues(t, 4, final["eval_count"])
	assert.EqualValues(t, 5, final["prompt_eval_count"])

	// The client had the first line before the server even produced the last one.
	lastWritten, err := time.Parse(time.RFC3339Nano, final["created_at"].(string))
	require.NoError(t, err)
	assert.True(t, arrived[0].Before(lastWritten), "first line read at %v, last written at %v", arrived[0], lastWritten)
	assert.GreaterOrEqual(t, arrived[4].Sub(arrived[0]), 3*30*time.Millisecond)
}

func TestGenerateStreamAndNot(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})

	resp, body := post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"hello there"}`)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	ls := lines(t, body)
	require.Len(t, ls, 6, "5 tokens by default and the final line")
	var text strings.Builder
	for _, l := range ls[:5] {
		text.WriteString(l["response"].(string))
		assert.NotContains(t, l, "context")
	}
	assert.Equal(t, fakeollama.Text(5), text.String())
	final := ls[5]
	assert.Equal(t, true, final["done"])
	assert.Equal(t, "stop", final["done_reason"])
	assert.Equal(t, "", final["response"])
	assert.Contains(t, final, "context")
	for _, k := range finalMetrics {
		assert.Contains(t, final, k)
	}

	resp, body = post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"hello","stream":false,"options":{"num_predict":3}}`)
	assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	assert.NotEmpty(t, resp.Header.Get("Content-Length"), "a non-streamed answer is not chunked")
	one := decode(t, body)
	assert.Equal(t, fakeollama.Text(3), one["response"])
	assert.Equal(t, true, one["done"])
	assert.Equal(t, "length", one["done_reason"], "num_predict ends with length")
	assert.EqualValues(t, 3, one["eval_count"])

	// An empty prompt loads the model and answers one object even when streaming.
	resp, body = post(t, f.URL+"/api/generate", `{"model":"tiny-llama"}`)
	assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	assert.Equal(t, "load", decode(t, body)["done_reason"])

	resp, body = post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":false}`)
	assert.Equal(t, 200, resp.StatusCode)
	chat := decode(t, body)
	assert.Equal(t, fakeollama.Text(5), chat["message"].(map[string]any)["content"])
	for _, k := range finalMetrics {
		assert.Contains(t, chat, k)
	}
}

func TestEmbeddings(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{EmbedDim: 8})

	resp, body := post(t, f.URL+"/api/embed", `{"model":"tiny-bert","input":["a","b c"]}`)
	assert.Equal(t, 200, resp.StatusCode)
	var embed struct {
		Model           string
		Embeddings      [][]float64
		TotalDuration   int64 `json:"total_duration"`
		LoadDuration    int64 `json:"load_duration"`
		PromptEvalCount int   `json:"prompt_eval_count"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &embed))
	assert.Equal(t, "tiny-bert", embed.Model)
	require.Len(t, embed.Embeddings, 2)
	assert.Len(t, embed.Embeddings[0], 8)
	assert.NotEqual(t, embed.Embeddings[0], embed.Embeddings[1])
	assert.Positive(t, embed.TotalDuration)
	assert.Positive(t, embed.LoadDuration)
	assert.Equal(t, 3, embed.PromptEvalCount)

	_, body = post(t, f.URL+"/api/embed", `{"model":"tiny-bert","input":"a"}`)
	var again struct{ Embeddings [][]float64 }
	require.NoError(t, json.Unmarshal([]byte(body), &again))
	assert.Equal(t, embed.Embeddings[0], again.Embeddings[0], "vectors are deterministic")

	resp, body = post(t, f.URL+"/api/embed", `{"model":"tiny-bert","input":[1]}`)
	assert.Equal(t, 400, resp.StatusCode)
	assert.Equal(t, `{"error":"invalid input type"}`, body)

	_, body = post(t, f.URL+"/api/embeddings", `{"model":"tiny-bert","prompt":"a"}`)
	var legacy struct{ Embedding []float64 }
	require.NoError(t, json.Unmarshal([]byte(body), &legacy))
	assert.InDeltaSlice(t, embed.Embeddings[0], legacy.Embedding, 1e-6)

	resp, body = post(t, f.URL+"/v1/embeddings", `{"model":"tiny-bert","input":["a","b"],"dimensions":4}`)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	var list struct {
		Object string
		Data   []struct {
			Object    string
			Embedding []float64
			Index     int
		}
		Model string
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
			TotalTokens  int `json:"total_tokens"`
		}
	}
	require.NoError(t, json.Unmarshal([]byte(body), &list))
	assert.Equal(t, "list", list.Object)
	require.Len(t, list.Data, 2)
	assert.Equal(t, "embedding", list.Data[1].Object)
	assert.Equal(t, 1, list.Data[1].Index)
	assert.Len(t, list.Data[0].Embedding, 4)
	assert.Equal(t, 2, list.Usage.TotalTokens)

	resp, body = post(t, f.URL+"/v1/embeddings", `{"model":"tiny-bert","input":[]}`)
	assert.Equal(t, 400, resp.StatusCode)
	assert.Equal(t, `{"error":{"message":"invalid input","type":"invalid_request_error","param":null,"code":null}}`, body)
}

func TestModelNotFoundIsWhatOllamaAnswers(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	for _, tc := range []struct {
		path, body string
		status     int
		want       string
		ctype      string
	}{
		{"/api/generate", `{"model":"x","prompt":"p"}`, 404, `{"error":"model 'x' not found"}`, "application/json; charset=utf-8"},
		{"/api/chat", `{"model":"x","messages":[{"role":"user","content":"p"}]}`, 404, `{"error":"model 'x' not found"}`, "application/json; charset=utf-8"},
		{"/api/chat", `{"messages":[]}`, 400, `{"error":"model is required"}`, "application/json; charset=utf-8"},
		{"/api/show", `{"model":"x"}`, 404, `{"error":"model 'x' not found"}`, "application/json; charset=utf-8"},
		{"/api/embed", `{"model":"x","input":"p"}`, 404, `{"error":"model \"x\" not found, try pulling it first"}`, "application/json; charset=utf-8"},
		{"/api/embeddings", `{"model":"x","prompt":"p"}`, 404, `{"error":"model \"x\" not found, try pulling it first"}`, "application/json; charset=utf-8"},
		{"/v1/chat/completions", `{"model":"x","messages":[{"role":"user","content":"p"}]}`, 404,
			`{"error":{"message":"model 'x' not found","type":"api_error","param":null,"code":null}}` + "\n", "application/json"},
		{"/v1/completions", `{"model":"x","prompt":"p"}`, 404,
			`{"error":{"message":"model 'x' not found","type":"api_error","param":null,"code":null}}` + "\n", "application/json"},
		{"/v1/embeddings", `{"model":"x","input":"p"}`, 404,
			`{"error":{"message":"model \"x\" not found, try pulling it first","type":"api_error","param":null,"code":null}}` + "\n", "application/json"},
	} {
		resp, body := post(t, f.URL+tc.path, tc.body)
		assert.Equal(t, tc.status, resp.StatusCode, tc.path)
		assert.Equal(t, tc.want, body, tc.path)
		assert.Equal(t, tc.ctype, resp.Header.Get("Content-Type"), tc.path)
	}
	resp, body := do(t, http.MethodGet, f.URL+"/v1/models/x", "")
	assert.Equal(t, 404, resp.StatusCode)
	assert.Equal(t, `{"error":{"message":"model 'x' not found","type":"api_error","param":null,"code":null}}`+"\n", body)
}

func TestBadJSON(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	for _, path := range []string{"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/api/pull"} {
		resp, body := post(t, f.URL+path, `{"model":`)
		assert.Equal(t, 400, resp.StatusCode, path)
		assert.Equal(t, `{"error":"unexpected EOF"}`, body, path)

		resp, body = post(t, f.URL+path, ``)
		assert.Equal(t, 400, resp.StatusCode, path)
		assert.Equal(t, `{"error":"missing request body"}`, body, path)
	}
	for _, path := range []string{"/v1/chat/completions", "/v1/completions", "/v1/embeddings"} {
		resp, body := post(t, f.URL+path, `nope`)
		assert.Equal(t, 400, resp.StatusCode, path)
		assert.Equal(t, `{"error":{"message":"invalid character 'o' in literal null (expecting 'u')","type":"invalid_request_error","param":null,"code":null}}`, body, path)
		assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	}
	resp, body := post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","messages":[]}`)
	assert.Equal(t, 400, resp.StatusCode)
	assert.Equal(t, `{"error":{"message":"[] is too short - 'messages'","type":"invalid_request_error","param":null,"code":null}}`, body)
}

func TestOpenAIChat(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 3})

	resp, body := post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi you"}],"stream":true,"stream_options":{"include_usage":true}}`)
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	ev := events(t, body)
	require.Len(t, ev, 6, "3 tokens, the finish chunk, the usage chunk, [DONE]")
	var text strings.Builder
	id := ""
	for i, e := range ev[:4] {
		c := decode(t, e)
		assert.Equal(t, "chat.completion.chunk", c["object"])
		assert.Equal(t, "tiny-llama", c["model"])
		assert.Equal(t, "fp_ollama", c["system_fingerprint"])
		assert.NotContains(t, c, "usage")
		assert.True(t, strings.HasPrefix(c["id"].(string), "chatcmpl-"))
		if id == "" {
			id = c["id"].(string)
		}
		assert.Equal(t, id, c["id"], "one id per completion")
		choice := c["choices"].([]any)[0].(map[string]any)
		delta := choice["delta"].(map[string]any)
		assert.Equal(t, "assistant", delta["role"])
		text.WriteString(delta["content"].(string))
		if i < 3 {
			assert.Nil(t, choice["finish_reason"])
			assert.Contains(t, choice, "finish_reason", "finish_reason is null, not absent")
		} else {
			assert.Equal(t, "stop", choice["finish_reason"])
		}
	}
	assert.Equal(t, fakeollama.Text(3), text.String())
	u := decode(t, ev[4])
	assert.Empty(t, u["choices"])
	assert.Equal(t, map[string]any{"prompt_tokens": 2.0, "completion_tokens": 3.0, "total_tokens": 5.0}, u["usage"])
	assert.Equal(t, "[DONE]", ev[5])

	resp, body = post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":2}`)
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	c := decode(t, body)
	assert.Equal(t, "chat.completion", c["object"])
	choice := c["choices"].([]any)[0].(map[string]any)
	assert.Equal(t, map[string]any{"role": "assistant", "content": fakeollama.Text(2)}, choice["message"])
	assert.Equal(t, "length", choice["finish_reason"])
	assert.Equal(t, map[string]any{"prompt_tokens": 1.0, "completion_tokens": 2.0, "total_tokens": 3.0}, c["usage"])
}

func TestOpenAICompletionsAndModels(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 2})

	_, body := post(t, f.URL+"/v1/completions", `{"model":"tiny-llama","prompt":"hi","stream":true}`)
	ev := events(t, body)
	require.Len(t, ev, 4)
	c := decode(t, ev[0])
	assert.Equal(t, "text_completion", c["object"])
	assert.Equal(t, "Hello", c["choices"].([]any)[0].(map[string]any)["text"])
	assert.Equal(t, "stop", decode(t, ev[2])["choices"].([]any)[0].(map[string]any)["finish_reason"])
	assert.Equal(t, "[DONE]", ev[3])

	_, body = post(t, f.URL+"/v1/completions", `{"model":"tiny-llama","prompt":"hi"}`)
	c = decode(t, body)
	assert.Equal(t, "text_completion", c["object"])
	assert.Equal(t, fakeollama.Text(2), c["choices"].([]any)[0].(map[string]any)["text"])
	assert.Contains(t, c, "usage")

	_, body = do(t, http.MethodGet, f.URL+"/v1/models", "")
	var list struct {
		Object string
		Data   []struct {
			ID      string
			Object  string
			Created int64
			OwnedBy string `json:"owned_by"`
		}
	}
	require.NoError(t, json.Unmarshal([]byte(body), &list))
	assert.Equal(t, "list", list.Object)
	require.Len(t, list.Data, 2)
	assert.Equal(t, "tiny-llama:latest", list.Data[0].ID)
	assert.Equal(t, "library", list.Data[0].OwnedBy)
	assert.Equal(t, "model", list.Data[0].Object)

	resp, body := do(t, http.MethodGet, f.URL+"/v1/models/tiny-bert", "")
	assert.Equal(t, 200, resp.StatusCode)
	m := decode(t, body)
	assert.Equal(t, "tiny-bert", m["id"], "the id is echoed as asked")
	assert.Equal(t, "library", m["owned_by"])

	f.SetModels()
	_, body = do(t, http.MethodGet, f.URL+"/v1/models", "")
	assert.Equal(t, `{"object":"list","data":null}`+"\n", body, "Ollama lists no models as null")
}

func TestPullAndDelete(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{}})

	resp, body := post(t, f.URL+"/api/pull", `{"model":"llama3.2:1b"}`)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	ls := lines(t, body)
	assert.Equal(t, "pulling manifest", ls[0]["status"])
	assert.Equal(t, "success", ls[len(ls)-1]["status"])
	assert.Equal(t, []string{"llama3.2:1b"}, f.Models())

	resp, _ = do(t, http.MethodDelete, f.URL+"/api/delete", `{"model":"llama3.2:1b"}`)
	assert.Equal(t, 200, resp.StatusCode)
	assert.Empty(t, f.Models())
	resp, body = do(t, http.MethodDelete, f.URL+"/api/delete", `{"model":"llama3.2:1b"}`)
	assert.Equal(t, 404, resp.StatusCode)
	assert.Equal(t, `{"error":"model 'llama3.2:1b' not found"}`, body)

	f.FailPulls("pull model manifest: file does not exist")
	resp, body = post(t, f.URL+"/api/pull", `{"model":"nope"}`)
	assert.Equal(t, 200, resp.StatusCode, "a failed pull still answers 200 when streaming")
	assert.Equal(t, `{"status":"pulling manifest"}`+"\n"+`{"error":"pull model manifest: file does not exist"}`+"\n", body)
	resp, body = post(t, f.URL+"/api/pull", `{"model":"nope","stream":false}`)
	assert.Equal(t, 500, resp.StatusCode)
	assert.Equal(t, `{"error":"pull model manifest: file does not exist"}`, body)
	assert.Empty(t, f.Models())
}

func TestLoadDelayIsAColdLoad(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{LoadDelay: 100 * time.Millisecond})
	var first, second struct {
		LoadDuration time.Duration `json:"load_duration"`
	}
	_, body := post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":false}`)
	require.NoError(t, json.Unmarshal([]byte(body), &first))
	_, body = post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":false}`)
	require.NoError(t, json.Unmarshal([]byte(body), &second))
	assert.GreaterOrEqual(t, first.LoadDuration, 100*time.Millisecond)
	assert.Less(t, second.LoadDuration, 50*time.Millisecond)
}

func TestRecordsRequests(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{History: 2})
	req, _ := http.NewRequest(http.MethodPost, f.URL+"/api/chat?token=abc", strings.NewReader(`{"model":"tiny-llama","messages":[],"stream":false}`))
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	do(t, http.MethodGet, f.URL+"/", "")
	do(t, http.MethodGet, f.URL+"/", "")

	assert.Equal(t, 2, f.Count("/"))
	assert.Equal(t, map[string]int{"/": 2, "/api/chat": 1}, f.Counts())
	rs := f.Requests()
	require.Len(t, rs, 2, "History bounds what is kept")
	assert.Equal(t, "/", rs[0].Path)

	f.ResetStats()
	req, _ = http.NewRequest(http.MethodPost, f.URL+"/api/chat?token=abc", strings.NewReader(`{"model":"tiny-llama","messages":[]}`))
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	last, ok := f.LastRequest()
	require.True(t, ok)
	assert.Equal(t, http.MethodPost, last.Method)
	assert.Equal(t, "/api/chat", last.Path)
	assert.Equal(t, "token=abc", last.RawQuery)
	assert.Equal(t, "Bearer s3cret", last.Header.Get("Authorization"))
	assert.JSONEq(t, `{"model":"tiny-llama","messages":[]}`, string(last.Body))
	assert.Equal(t, map[string]int{"/api/chat": 1}, f.Counts())
}

func TestHoldCountsInFlight(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	f.Hold(fakeollama.Completions...)

	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			resp, body := post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`)
			assert.Equal(t, 200, resp.StatusCode)
			assert.Contains(t, body, `"done":true`)
		})
	}
	require.Eventually(t, func() bool { return f.InFlight() == 3 }, 5*time.Second, 5*time.Millisecond)
	resp, _ := do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Equal(t, 200, resp.StatusCode, "other paths are not held")
	f.Release()
	wg.Wait()
	assert.Equal(t, 0, f.InFlight())
	assert.GreaterOrEqual(t, f.MaxInFlight(), 3)
}

func TestFailWith(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	f.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)

	resp, body := post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`)
	assert.Equal(t, 503, resp.StatusCode)
	assert.Equal(t, fakeollama.ServerBusy, body)
	assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	resp, _ = do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, 200, resp.StatusCode, "the health probe path still passes")

	f.FailWith(http.StatusBadGateway, "bad gateway")
	resp, body = do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, 502, resp.StatusCode)
	assert.Equal(t, "bad gateway", body)
	assert.Equal(t, 2, f.Count("/"), "failed requests are counted too")

	f.ClearFaults()
	resp, _ = do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, 200, resp.StatusCode)
}

func TestHangAfterHeadersAndCancellation(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	f.HangAfterHeaders("/api/chat")

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.URL+"/api/chat", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err, "the headers arrive")
	defer resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))

	read := make(chan error, 1)
	go func() {
		_, err := resp.Body.Read(make([]byte, 1))
		read <- err
	}()
	select {
	case err := <-read:
		t.Fatalf("the body should hang, read returned %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	assert.Equal(t, 1, f.InFlight())

	cancelled := time.Now()
	cancel()
	require.Error(t, <-read)
	require.Eventually(t, func() bool { return len(f.Cancellations()) == 1 }, 5*time.Second, 5*time.Millisecond)
	c := f.Cancellations()[0]
	assert.Equal(t, "/api/chat", c.Path)
	assert.Equal(t, http.MethodPost, c.Method)
	assert.False(t, c.NoticedAt.Before(c.CancelledAt))
	assert.Less(t, c.NoticedAt.Sub(cancelled), time.Second)
	assert.Less(t, c.Lag, 100*time.Millisecond)
	require.Eventually(t, func() bool { return f.InFlight() == 0 }, 5*time.Second, 5*time.Millisecond)
}

func TestCancelMidStream(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 100, TokenGap: 20 * time.Millisecond})

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"tiny-llama","stream":true,"messages":[{"role":"user","content":"x"}]}`))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	_, err = r.ReadString('\n')
	require.NoError(t, err)
	cancel()

	require.Eventually(t, func() bool { return len(f.Cancellations()) == 1 }, 5*time.Second, 5*time.Millisecond)
	c := f.Cancellations()[0]
	assert.Equal(t, "/v1/chat/completions", c.Path)
	assert.GreaterOrEqual(t, c.Chunks, 1)
	assert.Less(t, c.Chunks, 100)
	assert.Less(t, c.Lag, 100*time.Millisecond, "the fake notices at its next token at the latest")
}

func TestDieMidStream(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 10})
	f.DieMidStream(2, fakeollama.Completions...)

	resp, err := http.Post(f.URL+"/api/generate", "application/json", strings.NewReader(`{"model":"tiny-llama","prompt":"x"}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "the chunked body ends without its last chunk")
	assert.Equal(t, 2, strings.Count(string(body), "\n"), "two whole lines arrived: %q", body)

	f.DieMidStream(0, "/api/chat")
	resp, err = http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":false}`))
	require.NoError(t, err, "the headers arrive")
	assert.Equal(t, 200, resp.StatusCode)
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "a non-streamed answer (one chunk) dies before its body")

	resp, body2 := do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Equal(t, 200, resp.StatusCode, "other paths answer")
	assert.Contains(t, body2, "tiny-llama")
}

func TestSlowFirstByte(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	f.SlowFirstByte(150*time.Millisecond, "/api/version")
	start := time.Now()
	resp, _ := do(t, http.MethodGet, f.URL+"/api/version", "")
	assert.Equal(t, 200, resp.StatusCode)
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond)
	start = time.Now()
	do(t, http.MethodGet, f.URL+"/", "")
	assert.Less(t, time.Since(start), 100*time.Millisecond)
}

func TestFirstByteDelay(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{FirstByteDelay: 150 * time.Millisecond})
	start := time.Now()
	resp, err := http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond, "no headers before the first token, as in Ollama")
}

func TestCloseIsADeadBoxAndRestartRevivesIt(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 1000, TokenGap: 10 * time.Millisecond})
	url := f.URL

	resp, err := http.Post(url+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	_, err = bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)

	done := make(chan struct{})
	go func() { f.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	_, err = io.ReadAll(resp.Body)
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "the stream is cut, not ended")
	_, err = http.Get(url + "/")
	assert.Error(t, err, "connections are refused")
	f.Close() // idempotent

	require.NoError(t, f.Restart())
	assert.Equal(t, url, f.URL)
	r, body := do(t, http.MethodGet, url+"/", "")
	assert.Equal(t, 200, r.StatusCode)
	assert.Equal(t, "Ollama is running", body)
	assert.Error(t, f.Restart(), "a running fake cannot restart")
}

func TestConcurrentUseWithFaultsToggling(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 3})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			f.FailWith(503, fakeollama.ServerBusy, "/api/chat")
			f.SlowFirstByte(time.Millisecond)
			f.SetModels("tiny-llama", "other")
			f.ClearFaults()
			f.Counts()
			f.Requests()
			f.Cancellations()
		}
	})
	var clients sync.WaitGroup
	for range 8 {
		clients.Go(func() {
			for range 20 {
				resp, err := http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
				if !assert.NoError(t, err) {
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				assert.Contains(t, []int{200, 503}, resp.StatusCode)
			}
		})
	}
	clients.Wait()
	close(stop)
	wg.Wait()
	assert.Equal(t, 160, f.Count("/api/chat"))
	assert.Equal(t, 0, f.InFlight())
}

func TestErrorMidStreamIsARunnerDying(t *testing.T) {
	t.Parallel()
	const msg = "an error was encountered while running the model: unexpected EOF"
	f := newFake(t, fakeollama.Config{Tokens: 5})
	f.ErrorMidStream(2, msg)

	resp, body := post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`)
	assert.Equal(t, 200, resp.StatusCode)
	ls := lines(t, body)
	require.Len(t, ls, 3, "two tokens, then the error line; the body ends cleanly")
	assert.Equal(t, map[string]any{"error": msg}, ls[2])

	resp, body = post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","stream":true,"messages":[{"role":"user","content":"x"}]}`)
	assert.Equal(t, 200, resp.StatusCode)
	ev := events(t, body)
	assert.Len(t, ev, 2, "two tokens and no [DONE]")

	resp, body = post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"x","stream":false}`)
	assert.Equal(t, 500, resp.StatusCode)
	assert.Equal(t, `{"error":"`+msg+`"}`, body)

	f.ErrorMidStream(0, msg)
	resp, body = post(t, f.URL+"/v1/completions", `{"model":"tiny-llama","prompt":"x","stream":true}`)
	assert.Equal(t, 500, resp.StatusCode, "nothing streamed yet: a plain error")
	assert.Equal(t, `{"error":{"message":"`+msg+`","type":"api_error","param":null,"code":null}}`+"\n", body)

	resp, _ = post(t, f.URL+"/api/embed", `{"model":"tiny-bert","input":"x"}`)
	assert.Equal(t, 200, resp.StatusCode, "embeddings have no stream to break")
}

func TestEmbeddingModelsDoNotComplete(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama", "tiny-bert", "all-minilm"}, Embedding: []string{"all-minilm:latest"}, Parallel: 1})

	for _, c := range []struct{ path, body, want string }{
		{"/api/chat", `{"model":"tiny-bert","messages":[{"role":"user","content":"hi"}]}`, `{"error":"\"tiny-bert\" does not support chat"}`},
		{"/api/chat", `{"model":"TINY-BERT"}`, `{"error":"\"TINY-BERT\" does not support chat"}`},
		{"/api/generate", `{"model":"all-minilm","prompt":"hi"}`, `{"error":"\"all-minilm\" does not support generate"}`},
		{"/api/generate", `{"model":"tiny-bert"}`, `{"error":"\"tiny-bert\" does not support generate"}`},
		{"/v1/chat/completions", `{"model":"tiny-bert","messages":[{"role":"user","content":"hi"}],"stream":true}`,
			`{"error":{"message":"\"tiny-bert\" does not support chat","type":"api_error","param":null,"code":null}}` + "\n"},
		{"/v1/completions", `{"model":"tiny-bert","prompt":"hi"}`,
			`{"error":{"message":"\"tiny-bert\" does not support generate","type":"api_error","param":null,"code":null}}` + "\n"},
	} {
		resp, body := post(t, f.URL+c.path, c.body)
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, c.body)
		assert.Equal(t, c.want, body, c.body)
	}
	assert.Empty(t, f.Loaded(), "refused before the model is scheduled")

	// A completion model embeds too, as in Ollama.
	resp, _ := post(t, f.URL+"/api/embed", `{"model":"tiny-llama","input":"a"}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)

	for model, want := range map[string]string{"tiny-llama": "completion", "tiny-bert": "embedding", "all-minilm": "embedding"} {
		_, body := post(t, f.URL+"/api/show", `{"model":"`+model+`"}`)
		assert.Equal(t, []any{want}, decode(t, body)["capabilities"], model)
	}
	// A model created from an embedding model embeds only.
	post(t, f.URL+"/api/create", `{"model":"mini2","from":"all-minilm","stream":false}`)
	resp, _ = post(t, f.URL+"/api/generate", `{"model":"mini2","prompt":"hi"}`)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
}

func TestShowDescribesTheGGUF(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama", "tiny-bert"}, EmbedDim: 16})

	resp, body := post(t, f.URL+"/api/show", `{"model":"tiny-llama"}`)
	assert.Equal(t, []string{"chunked"}, resp.TransferEncoding, "over 2 KB, as Ollama's")
	show := decode(t, body)
	info := show["model_info"].(map[string]any)
	assert.Equal(t, "llama", info["general.architecture"])
	assert.EqualValues(t, 16, info["llama.embedding_length"])
	for _, k := range []string{"general.file_type", "llama.block_count", "llama.vocab_size", "llama.rope.freq_base", "tokenizer.ggml.bos_token_id"} {
		assert.Contains(t, info, k)
	}
	for _, k := range []string{"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"} {
		assert.Contains(t, info, k)
		assert.Nil(t, info[k], "without verbose")
	}
	assert.NotContains(t, info, "general.quantization_version")
	tensors := show["tensors"].([]any)
	require.NotEmpty(t, tensors)
	first := tensors[0].(map[string]any)
	assert.Equal(t, "blk.0.attn_k.weight", first["name"])
	assert.Contains(t, first, "type")
	assert.Contains(t, first, "shape")
	assert.Equal(t, []any{"completion"}, show["capabilities"])

	_, body = post(t, f.URL+"/api/show", `{"model":"tiny-bert"}`)
	info = decode(t, body)["model_info"].(map[string]any)
	assert.Equal(t, "bert", info["general.architecture"])
	assert.EqualValues(t, 16, info["bert.embedding_length"], "the length of its vectors")
	assert.Contains(t, info, "bert.pooling_type")
}

func TestMaxContextIsAnOutOfMemoryLoad(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{MaxContext: 8192})
	resp, body := post(t, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"OPTIONS":{"num_ctx":1000000}}`)
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	assert.Equal(t, `{"error":"model requires more system memory (61.0 GiB) than is available (0.5 GiB)"}`, body)
	assert.Empty(t, f.Loaded(), "nothing was loaded")

	resp, body = post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the OpenAI layer passes no num_ctx: %s", body)
	resp, body = post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"hi","stream":false,"options":{"num_ctx":8192}}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode, body)
}

func TestStepTokensReleasesOneTokenPerStep(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Tokens: 3})
	f.StepTokens("/api/chat")

	// Headers go out with the first chunk: its step is given ahead, and kept.
	f.Step()
	resp, err := http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	var text strings.Builder
	for i := range 3 {
		line, err := rd.ReadString('\n')
		require.NoError(t, err, "token %d", i)
		l := decode(t, line)
		assert.Equal(t, false, l["done"], "token %d", i)
		text.WriteString(l["message"].(map[string]any)["content"].(string))
		assert.Equal(t, fakeollama.Text(i+1), text.String(), "exactly one more token per step")
		f.Step()
	}
	line, err := rd.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, true, decode(t, line)["done"], "the final chunk takes its own step")
	_, err = rd.ReadString('\n')
	assert.ErrorIs(t, err, io.EOF)

	_, body := post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"x","stream":false}`)
	assert.Contains(t, body, `"done":true`, "paths not stepped answer at once")
}
