package fakeollama_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// TestConformsToRealOllama sends the same requests to a real Ollama and to the fake and compares
// status, Content-Type, Allow, framing (Content-Length or chunked) and the JSON with values that
// legitimately differ (times, sizes, digests, ids, generated text, vectors) masked. It runs when
// FAKEOLLAMA_REAL_URL points to an Ollama serving tiny-llama and tiny-bert (the e2e rig's
// models, testdata/e2e/rig) and nothing else loaded; it loads tiny-llama itself. The e2e suite
// runs it against a server of its own (TestFakeConformanceTests).
func TestConformsToRealOllama(t *testing.T) {
	real := os.Getenv("FAKEOLLAMA_REAL_URL")
	if real == "" {
		t.Skip("FAKEOLLAMA_REAL_URL is not set")
	}
	leaveNoModels(t, real, "")
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

// TestManagementConformsToRealOllama compares copy, create, blob uploads and push with a real
// Ollama the same way, as a sequence of requests that change both servers alike. Names and
// blob contents are new on every run, so it can run again against the same server. Error
// messages that name the real server's registry or model store are masked where they must
// differ (the fake has no network and keeps no files). A GGUF file for create from files is
// taken from FAKEOLLAMA_GGUF, by default the e2e rig's tiny-llama.gguf (under $OLLAMAFLOW_RIG,
// default ~/.cache/ollamaflow-rig); without one those cases are left out. Every model it
// creates on the real server is named with the run's id and deleted when it ends.
func TestManagementConformsToRealOllama(t *testing.T) {
	real := os.Getenv("FAKEOLLAMA_REAL_URL")
	if real == "" {
		t.Skip("FAKEOLLAMA_REAL_URL is not set")
	}
	run := strconv.FormatInt(time.Now().UnixNano(), 36)
	leaveNoModels(t, real, run)
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-bert", "tiny-llama"}})
	text := []byte("a blob of run " + run)
	td := sha256Digest(text)
	zero := "sha256:" + strings.Repeat("0", 64)
	missing := "sha256:" + strings.Repeat("5", 64)

	type step struct {
		method, path, body string
		mask               bool // the error message names the registry or the store: mask it
	}
	steps := []step{
		{"HEAD", "/api/blobs/" + td, "", false},
		{"POST", "/api/blobs/" + td, string(text), false},
		{"HEAD", "/api/blobs/" + td, "", false},
		{"HEAD", "/api/blobs/" + strings.Replace(td, ":", "-", 1), "", false},
		{"POST", "/api/blobs/" + td, string(text), false},
		{"POST", "/api/blobs/" + zero, string(text), false},
		{"POST", "/api/blobs/" + strings.Replace(zero, ":", "-", 1), string(text), false},
		{"POST", "/api/blobs/xyz", string(text), false},
		{"HEAD", "/api/blobs/xyz", "", false},
		{"GET", "/api/blobs/" + td, "", false},
		{"POST", "/api/blobs/", string(text), false},

		{"POST", "/api/copy", `{"source":"tiny-llama","destination":"cf-copy-` + run + `"}`, false},
		{"POST", "/api/copy", `{"source":"nope-` + run + `","destination":"x"}`, false},
		{"POST", "/api/copy", `{"source":"","destination":"x"}`, false},
		{"POST", "/api/copy", `{"source":"tiny-llama","destination":"Bad Name!"}`, false},
		{"POST", "/api/copy", ``, false},
		{"GET", "/api/copy", ``, false},

		{"POST", "/api/create", `{"model":"cf-a-` + run + `","from":"tiny-llama"}`, false},
		{"POST", "/api/create", `{"model":"cf-b-` + run + `","from":"tiny-llama","system":"be brief ` + run + `"}`, false},
		{"POST", "/api/create", `{"model":"cf-c-` + run + `","from":"cf-copy-` + run + `","stream":false}`, false},
		{"POST", "/api/create", `{"model":"cf-d-` + run + `","from":"tiny-llama","license":"L ` + run + `","messages":[{"role":"user","content":"hi ` + run + `"}]}`, false},
		{"POST", "/api/create", `{"model":"cf-e"}`, false},
		{"POST", "/api/create", `{"model":"cf-e","stream":false}`, false},
		{"POST", "/api/create", `{"from":"tiny-llama"}`, false},
		{"POST", "/api/create", `{"model":"cf-e","from":"nope-` + run + `"}`, true},
		{"POST", "/api/create", `{"model":"cf-e","from":"nope-` + run + `","stream":false}`, true},
		{"POST", "/api/create", `{"model":"cf-e","files":{"x.gguf":"` + missing + `"}}`, true},
		{"POST", "/api/create", `{"model":"cf-e","files":{"x.gguf":"` + missing + `"},"stream":false}`, true},
		{"POST", "/api/create", `{"model":"cf-e","files":{"x":"` + missing + `"}}`, false},
		{"POST", "/api/create", `{"model":"cf-e","files":{"x.gguf":"` + td + `"}}`, false},
		{"POST", "/api/create", `{"model":"cf-e","files":{"x.gguf":"bogus"}}`, false},
		{"POST", "/api/create", `{"model":"cf-e","files":{"../x.gguf":"` + td + `"}}`, false},
		{"POST", "/api/create", `{"model":"cf-e","files":{}}`, false},
		{"GET", "/api/create", ``, false},

		{"POST", "/api/pull", `{"model":"nope-` + run + `"}`, true},
		{"POST", "/api/pull", `{"model":"nope-` + run + `","stream":false}`, true},
		{"POST", "/api/pull", `{"model":""}`, false},
		{"DELETE", "/api/delete", `{"model":"cf-a-` + run + `"}`, false},

		{"POST", "/api/push", `{"model":"nope-` + run + `"}`, true},
		{"POST", "/api/push", `{"model":"nope-` + run + `","stream":false}`, true},
		{"POST", "/api/push", `{}`, false},
		{"POST", "/api/push", `{"model":"tiny-llama"}`, true}, // no registry here: it fails
		{"POST", "/api/push", `{"model":"tiny-llama","stream":false}`, true},
	}
	gguf := os.Getenv("FAKEOLLAMA_GGUF")
	if gguf == "" {
		rig := os.Getenv("OLLAMAFLOW_RIG")
		if rig == "" {
			home, _ := os.UserHomeDir()
			rig = filepath.Join(home, ".cache", "ollamaflow-rig")
		}
		gguf = filepath.Join(rig, "models", "tiny-llama.gguf")
	}
	if b, err := os.ReadFile(gguf); err == nil {
		// Upload to each (the real one may have it already: not compared), then create from it.
		d := sha256Digest(b)
		for _, base := range []string{real, f.URL} {
			postQuietly(base+"/api/blobs/"+d, string(b))
		}
		steps = append(steps,
			step{"POST", "/api/create", `{"model":"cf-f-` + run + `","files":{"tiny.gguf":"` + d + `"}}`, false},
			step{"POST", "/api/create", `{"model":"cf-g-` + run + `","files":{"tiny":"` + d + `"},"stream":false}`, false},
			step{"HEAD", "/api/blobs/" + d, "", false},
		)
	}
	f.FailPushes(`Head "https://registry.ollama.ai/v2/library/tiny-llama/blobs/sha256:0": dial tcp: lookup registry.ollama.ai: no such host`)
	f.FailPulls(`pull model manifest: Get "https://registry.ollama.ai/v2/library/nope/manifests/latest": dial tcp: lookup registry.ollama.ai: no such host`)
	for _, s := range steps {
		want := mgmtShape(t, real, s.method, s.path, s.body, s.mask)
		got := mgmtShape(t, f.URL, s.method, s.path, s.body, s.mask)
		assert.Equal(t, want, got, "%s %s %s", s.method, s.path, s.body)
	}
}

var (
	maskDigest = regexp.MustCompile(`sha256[:-][0-9a-fA-F]{64}|pushing [0-9a-f]{12}`)
	maskError  = regexp.MustCompile(`"error":"(\\.|[^"\\])*"`)
)

func mgmtShape(t *testing.T, base, method, path, body string, mask bool) string {
	s := shape(t, base, method, path, body)
	s = maskDigest.ReplaceAllString(s, "D")
	if mask {
		s = maskError.ReplaceAllString(s, `"error":E`)
	}
	return s
}

// leaveNoModels makes the test leave the real server with the models it had: when the test
// ends, it deletes every model that was not there before and is named with run (the models the
// test made; empty run: none), then fails the test if any model that was not there before is
// still listed, whatever its name. Someone else creating a model on the same server meanwhile
// fails it too, which is why these tests want a server of their own. The blobs a test uploads
// stay until Ollama prunes unused blobs at its next start.
func leaveNoModels(t *testing.T, real, run string) {
	t.Helper()
	before, err := realModels(real)
	if err != nil {
		t.Fatalf("listing the models on %s: %v", real, err)
	}
	t.Cleanup(func() {
		now, err := realModels(real)
		if err != nil {
			t.Errorf("listing the models on %s: %v", real, err)
			return
		}
		for m := range now {
			if !before[m] && run != "" && strings.Contains(m, run) {
				req, _ := http.NewRequest("DELETE", real+"/api/delete", strings.NewReader(`{"model":"`+m+`"}`))
				if resp, err := http.DefaultClient.Do(req); err != nil {
					t.Errorf("deleting %s from %s: %v", m, real, err)
				} else {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}
		after, err := realModels(real)
		if err != nil {
			t.Errorf("listing the models on %s: %v", real, err)
			return
		}
		for m := range after {
			if !before[m] {
				t.Errorf("model %s was left behind on %s", m, real)
			}
		}
	})
}

// realModels is the set of model names the server lists in /api/tags.
func realModels(base string) (map[string]bool, error) {
	resp, err := http.Get(base + "/api/tags")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tags struct {
		Models []struct {
			Name string `json:"name"`
		} `json:"models"`
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /api/tags: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&tags); err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, m := range tags.Models {
		names[m.Name] = true
	}
	return names, nil
}

func sha256Digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
