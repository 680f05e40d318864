package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/openai"
)

// capture is a backend on loopback that records every body it is sent and
// answers just enough for the proxy to route to it: it needs no real
// Ollama, since the question is what Ollama would read, not what it says.
type capture struct {
	mu     sync.Mutex
	bodies map[string][][]byte
}

func (c *capture) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	switch r.URL.Path {
	case "/":
		io.WriteString(w, "Ollama is running")
	case "/api/tags":
		io.WriteString(w, `{"models":[{"name":"allowed:latest","model":"allowed:latest"},{"name":"forbidden:latest","model":"forbidden:latest"}]}`)
	case "/api/ps":
		io.WriteString(w, `{"models":[]}`)
	default:
		b, _ := io.ReadAll(r.Body)
		c.mu.Lock()
		c.bodies[r.URL.Path] = append(c.bodies[r.URL.Path], b)
		c.mu.Unlock()
		io.WriteString(w, `{}`)
	}
}

func (c *capture) last(path string) ([]byte, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	list := c.bodies[path]
	if len(list) == 0 {
		return nil, 0
	}
	return list[len(list)-1], len(list)
}

// decodeAsOllama decodes body as gin's ShouldBindJSON does for Ollama's
// handlers and middleware: encoding/json's Decoder into the request type.
func decodeAsOllama(t *testing.T, body []byte, v any) {
	t.Helper()
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(v); err != nil {
		t.Fatalf("Ollama would refuse the forwarded body: %v\n%s", err, body)
	}
}

// jsonOf is v as compact JSON, to compare option values whatever Go type
// Ollama's layer gave them (float32, float64, int).
func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestPolicyAsOllamaReadsIt: hostile bodies on the six inference endpoints
// through a frontend with an allow-list and pins, captured at the backend
// and decoded with Ollama's own request types (api and openai packages),
// the /v1 ones through Ollama's own FromChatRequest/FromCompleteRequest.
// The model that runs is always allowed and every pinned option is its pin.
func TestPolicyAsOllamaReadsIt(t *testing.T) {
	scenario(t)
	c := &capture{bodies: map[string][][]byte{}}
	backend := httptest.NewServer(c)
	defer backend.Close()
	cfg := caddyfile("") + fmt.Sprintf(`%s {
	ollamaflow {
		name policy
		models allowed
		pin_completions {
			options.temperature 0.25
			options.top_p 0.5
			options.seed 7
			options.stop ["END"]
			options.num_predict 64
		}
		pin_embeddings {
			dimensions 128
		}
		backend capture %s
	}
}
`, env.extraURL, strings.TrimPrefix(backend.URL, "http://"))
	if err := loadCaddy(cfg); err != nil {
		t.Fatalf("caddy: %v", err)
	}
	t.Cleanup(func() {
		if err := loadCaddy(caddyfile("")); err != nil {
			t.Errorf("caddy: restoring the base config: %v", err)
		}
	})
	if !eventually(20*time.Second, func() bool {
		res, _, err := postJSON(env.extraURL, "/api/embed", `{"model":"allowed","input":"x"}`)
		return err == nil && res.StatusCode == http.StatusOK
	}) {
		t.Fatal("the policy frontend never routed to the capturing backend")
	}

	wantOpts := map[string]string{"temperature": "0.25", "top_p": "0.5", "seed": "7", "stop": `["END"]`, "num_predict": "64"}
	models := []string{
		`"model":"allowed"`,
		`"model":"allowed","MODEL":"forbidden"`,
		`"model":"forbidden","mod\u0065l":"allowed"`,
		`"MODEL":"allowed","model":null`,
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
				_, before := c.last(path)
				res, answer, err := postJSON(env.extraURL, path, body)
				if err != nil {
					t.Fatalf("%s: %v", path, err)
				}
				got, after := c.last(path)
				if res.StatusCode != http.StatusOK {
					if res.StatusCode != http.StatusForbidden || after != before {
						t.Errorf("%s %s: status %d (%s), backend requests %d -> %d", path, body, res.StatusCode, answer, before, after)
					}
					refused++
					continue
				}
				ran++
				if after != before+1 {
					t.Fatalf("%s %s: the backend got %d requests, want 1", path, body, after-before)
				}
				var model string
				opts := map[string]any{}
				dims := 0
				switch path {
				case "/api/chat":
					var req api.ChatRequest
					decodeAsOllama(t, got, &req)
					model, opts = req.Model, req.Options
				case "/api/generate":
					var req api.GenerateRequest
					decodeAsOllama(t, got, &req)
					model, opts = req.Model, req.Options
				case "/v1/chat/completions":
					var req openai.ChatCompletionRequest
					decodeAsOllama(t, got, &req)
					chat, err := openai.FromChatRequest(req)
					if err != nil {
						t.Fatalf("%s: Ollama's OpenAI layer refuses %s: %v", path, got, err)
					}
					model, opts = chat.Model, chat.Options
				case "/v1/completions":
					var req openai.CompletionRequest
					decodeAsOllama(t, got, &req)
					gen, err := openai.FromCompleteRequest(req)
					if err != nil {
						t.Fatalf("%s: Ollama's OpenAI layer refuses %s: %v", path, got, err)
					}
					model, opts = gen.Model, gen.Options
				case "/api/embed":
					var req api.EmbedRequest
					decodeAsOllama(t, got, &req)
					model, dims = req.Model, req.Dimensions
				case "/v1/embeddings":
					var req openai.EmbedRequest
					decodeAsOllama(t, got, &req)
					model, dims = req.Model, req.Dimensions
				}
				if model != "allowed" {
					t.Errorf("%s %s: Ollama runs %q\n%s", path, body, model, got)
				}
				if strings.Contains(path, "embed") {
					if dims != 128 {
						t.Errorf("%s %s: dimensions %d, want the pinned 128\n%s", path, body, dims, got)
					}
					continue
				}
				for k, want := range wantOpts {
					if g := jsonOf(opts[k]); g != want {
						t.Errorf("%s %s: options.%s = %s, want the pinned %s\n%s", path, body, k, g, want, got)
					}
				}
			}
		}
	}
	if ran != 6*3*3 || refused != 6*3*1 {
		t.Errorf("%d bodies ran and %d were refused; want %d and %d", ran, refused, 6*3*3, 6*3)
	}
}
