package e2e

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// TestCORSLikeOllama sends the requests a browser sends to a real Ollama
// server and to the proxy's main frontend (default cors_origins, which is
// Ollama's own list) and compares what decides whether the page works: the
// status, the allowed origin, methods and max age, the allowed headers
// (the proxy allows Ollama's and its own label header), and Vary.
func TestCORSLikeOllama(t *testing.T) {
	scenario(t)
	real := env.servers[0].url()
	proxy := env.mainURL
	chat := fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":2}}`, chatModel)

	type request struct {
		name, method, path, body string
		hdr                      []string
	}
	preflight := func(origin string) []string {
		return []string{"Origin", origin, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "content-type,authorization"}
	}
	requests := []request{
		{"preflight from localhost", "OPTIONS", "/api/chat", "", preflight("http://localhost:3000")},
		{"preflight from an Obsidian plugin", "OPTIONS", "/v1/chat/completions", "", preflight("app://obsidian.md")},
		{"preflight from a VS Code webview", "OPTIONS", "/api/tags", "", preflight("vscode-webview://1a2b3c")},
		{"preflight from another site", "OPTIONS", "/api/chat", "", preflight("https://evil.example")},
		{"preflight from a browser extension", "OPTIONS", "/api/chat", "", preflight("chrome-extension://abcdef")},
		{"chat from localhost", "POST", "/api/chat", chat, []string{"Origin", "http://127.0.0.1:5173", "Content-Type", "application/json"}},
		{"tags from localhost", "GET", "/api/tags", "", []string{"Origin", "https://localhost"}},
		{"simple POST from another site", "POST", "/api/chat", chat, []string{"Origin", "https://evil.example", "Content-Type", "text/plain"}},
		{"tags from another site", "GET", "/api/tags", "", []string{"Origin", "http://localhost.evil.example"}},
		{"no Origin", "GET", "/api/tags", "", nil},
	}
	do := func(base string, r request) (*http.Response, string) {
		t.Helper()
		req, err := http.NewRequest(r.method, base+r.path, strings.NewReader(r.body))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i+1 < len(r.hdr); i += 2 {
			req.Header.Set(r.hdr[i], r.hdr[i+1])
		}
		res, err := httpClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", r.method, base+r.path, err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, string(b)
	}
	tokens := func(vs []string) []string {
		var out []string
		for _, v := range vs {
			for _, f := range strings.Split(v, ",") {
				if f = strings.ToLower(strings.TrimSpace(f)); f != "" {
					out = append(out, f)
				}
			}
		}
		slices.Sort(out)
		return out
	}
	for _, r := range requests {
		want, wantBody := do(real, r)
		got, gotBody := do(proxy, r)
		if got.StatusCode != want.StatusCode {
			t.Errorf("%s: status %d through the proxy (%s), Ollama %d (%s)", r.name, got.StatusCode, gotBody, want.StatusCode, wantBody)
		}
		for _, h := range []string{"Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Max-Age", "Access-Control-Allow-Credentials"} {
			if g, w := got.Header.Values(h), want.Header.Values(h); !slices.Equal(g, w) {
				t.Errorf("%s: %s %q through the proxy, Ollama %q", r.name, h, g, w)
			}
		}
		allowed := tokens(got.Header.Values("Access-Control-Allow-Headers"))
		for _, h := range tokens(want.Header.Values("Access-Control-Allow-Headers")) {
			if !slices.Contains(allowed, h) {
				t.Errorf("%s: Ollama allows header %s, the proxy does not (%q)", r.name, h, allowed)
			}
		}
		if want.Header.Get("Access-Control-Allow-Headers") != "" && !slices.Contains(allowed, "x-ollamaflow-label") {
			t.Errorf("%s: the proxy does not allow its label header (%q)", r.name, allowed)
		}
		vary := tokens(got.Header.Values("Vary"))
		for _, v := range tokens(want.Header.Values("Vary")) {
			if !slices.Contains(vary, v) {
				t.Errorf("%s: Ollama varies on %s, the proxy does not (%q)", r.name, v, vary)
			}
		}
		t.Logf("%s: %d, Allow-Origin %q, Vary %q", r.name, want.StatusCode, want.Header.Get("Access-Control-Allow-Origin"), want.Header.Values("Vary"))
	}
}
