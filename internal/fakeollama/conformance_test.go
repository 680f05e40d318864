package fakeollama_test

import (
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// TestConformsToRealOllama sends the same requests to a real Ollama and to the fake and compares
// status, Content-Type, Allow, framing (Content-Length or chunked) and the JSON with values that
// legitimately differ (times, sizes, digests, ids, generated text, vectors) masked. It runs when
// FAKEOLLAMA_REAL_URL points to an Ollama serving tiny-llama and tiny-bert with tiny-llama
// loaded (see /work/shared/ollama-rig: start.sh NAME PORT).
func TestConformsToRealOllama(t *testing.T) {
	real := os.Getenv("FAKEOLLAMA_REAL_URL")
	if real == "" {
		t.Skip("FAKEOLLAMA_REAL_URL is not set")
	}
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-bert", "tiny-llama"}, Loaded: []string{"tiny-llama"}})
	postQuietly(real+"/api/chat", `{"model":"tiny-llama","messages":[]}`) // load it

	for _, r := range []struct{ method, path, body string }{
		{"GET", "/", ""}, {"HEAD", "/", ""}, {"GET", "/api/version", ""}, {"GET", "/api/nope", ""},
		{"GET", "/api/chat", ""}, {"POST", "/api/tags", ""},
		{"POST", "/api/chat", `{"model":"x","messages":[{"role":"user","content":"p"}]}`},
		{"POST", "/api/chat", `{"messages":[{"role":"user","content":"p"}]}`},
		{"POST", "/api/generate", `{"model":"x","prompt":"p"}`},
		{"POST", "/api/generate", `{"prompt":"p"}`},
		{"POST", "/api/show", `{"model":"x"}`},
		{"POST", "/api/show", `{}`},
		{"POST", "/api/embed", `{"model":"x","input":"p"}`},
		{"POST", "/api/embed", `{"input":"p"}`},
		{"POST", "/api/embed", `{"model":"tiny-bert","input":[1]}`},
		{"POST", "/api/embeddings", `{"model":"x","prompt":"p"}`},
		{"POST", "/api/embeddings", `{"prompt":"p"}`},
		{"POST", "/api/chat", `{"model":`},
		{"POST", "/api/chat", ``},
		{"POST", "/v1/chat/completions", `{"model":"x","messages":[{"role":"user","content":"p"}]}`},
		{"POST", "/v1/chat/completions", `{"messages":[{"role":"user","content":"p"}]}`},
		{"POST", "/v1/chat/completions", `{"model":"tiny-llama","messages":[]}`},
		{"POST", "/v1/chat/completions", `nope`},
		{"POST", "/v1/completions", `{"model":"x","prompt":"p"}`},
		{"POST", "/v1/embeddings", `{"model":"x","input":"p"}`},
		{"POST", "/v1/embeddings", `{"input":"p"}`},
		{"POST", "/v1/embeddings", `{"model":"tiny-bert","input":[]}`},
		{"POST", "/v1/embeddings", `{"model":"tiny-bert","input":"a","encoding_format":"x"}`},
		{"GET", "/v1/models/x", ""},
		{"DELETE", "/api/delete", `{"model":"x"}`},
		{"GET", "/api/ps", ""},
		{"POST", "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":3}}`},
		{"POST", "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":3}}`},
		{"POST", "/api/chat", `{"model":"tiny-llama","messages":[]}`},
		{"POST", "/api/generate", `{"model":"tiny-llama","prompt":"hi","options":{"num_predict":3}}`},
		{"POST", "/api/generate", `{"model":"tiny-llama","prompt":"hi","stream":false,"options":{"num_predict":3}}`},
		{"POST", "/api/generate", `{"model":"tiny-llama"}`},
		{"POST", "/api/embed", `{"model":"tiny-bert","input":["a","b"]}`},
		{"POST", "/api/embed", `{"model":"tiny-bert","input":""}`},
		{"POST", "/api/embeddings", `{"model":"tiny-bert","prompt":"a"}`},
		{"POST", "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}`},
		{"POST", "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3}`},
		{"POST", "/v1/completions", `{"model":"tiny-llama","prompt":"hi","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}`},
		{"POST", "/v1/completions", `{"model":"tiny-llama","prompt":"hi","max_tokens":3}`},
		{"POST", "/v1/embeddings", `{"model":"tiny-bert","input":["a"]}`},
		{"GET", "/v1/models/tiny-llama", ""},
	} {
		want := shape(t, real, r.method, r.path, r.body)
		got := shape(t, f.URL, r.method, r.path, r.body)
		assert.Equal(t, want, got, "%s %s %s", r.method, r.path, r.body)
	}
}

var (
	maskStr  = regexp.MustCompile(`"(created_at|modified_at|expires_at|digest|id|content|response|text|owned_by)":"(\\.|[^"\\])*"`)
	maskNum  = regexp.MustCompile(`"(created|size|size_vram|total_duration|load_duration|prompt_eval_duration|eval_duration|prompt_eval_count|eval_count|prompt_tokens|completion_tokens|total_tokens|context_length)":[0-9]+`)
	maskArr  = regexp.MustCompile(`"(context|embedding|embeddings|details)":(\[[^\]]*\]|\[\[.*?\]\]|\{[^}]*\})`)
	maskReal = regexp.MustCompile(`-?[0-9]+\.[0-9e+-]+`)
)

func shape(t *testing.T, base, method, path, body string) string {
	t.Helper()
	req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "error: " + err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	framing := "chunked"
	if resp.ContentLength >= 0 {
		framing = "length"
	}
	s := maskStr.ReplaceAllString(string(b), `"$1":S`)
	s = maskNum.ReplaceAllString(s, `"$1":N`)
	s = maskArr.ReplaceAllString(s, `"$1":X`)
	s = maskReal.ReplaceAllString(s, `F`)
	return strings.Join([]string{resp.Status, resp.Header.Get("Content-Type"), resp.Header.Get("Allow"), framing, s}, " | ")
}

func postQuietly(url, body string) {
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
