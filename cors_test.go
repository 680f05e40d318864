package ollamaflow

import (
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCORSOriginMatching(t *testing.T) {
	cases := []struct {
		name    string
		origins []string // nil: the default
		allowed []string
		refused []string
	}{
		{
			name: "Ollama's default list",
			allowed: []string{
				"http://localhost", "https://localhost", "http://localhost:3000", "https://localhost:8443",
				"http://127.0.0.1:5173", "https://127.0.0.1", "http://0.0.0.0:8080",
				"app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://1a2b3c", "vscode-file://vscode-app",
				"HTTP://LOCALHOST:3000", // scheme and host compare case-insensitively
			},
			refused: []string{
				"https://evil.example", "http://localhost.evil.example", "http://127.0.0.2:3000",
				"http://[::1]:3000", "chrome-extension://abcdef", "null", "moz-extension://x",
				"http://localhost.", "http://127.0.0.1.nip.io",
			},
		},
		{
			name:    "an exact origin replaces the default",
			origins: []string{"https://app.example.com"},
			allowed: []string{"https://app.example.com", "https://APP.example.com"},
			refused: []string{"http://app.example.com", "https://app.example.com:8443", "http://localhost:3000", "https://app.example.com.evil"},
		},
		{
			name:    "default plus additions, as OLLAMA_ORIGINS adds",
			origins: []string{"default", "https://app.example.com,chrome-extension://*"},
			allowed: []string{"http://localhost:3000", "app://x", "https://app.example.com", "chrome-extension://abcdef"},
			refused: []string{"https://evil.example", "moz-extension://abcdef"},
		},
		{
			name:    "a subdomain pattern",
			origins: []string{"https://*.example.com"},
			allowed: []string{"https://a.example.com", "https://a.b.example.com"},
			refused: []string{"https://example.com", "https://evilexample.com", "http://a.example.com", "https://a.example.com.evil.net"},
		},
		{
			name:    "prefix and suffix never overlap",
			origins: []string{"http://a*a"},
			allowed: []string{"http://aa", "http://abca"},
			refused: []string{"http://a"},
		},
		{
			name:    "a bare suffix pattern",
			origins: []string{"*.example.com"},
			allowed: []string{"https://x.example.com", "http://x.example.com"},
			refused: []string{"https://example.com"},
		},
		{
			name:    "any origin",
			origins: []string{"*"},
			allowed: []string{"https://evil.example", "null", "chrome-extension://x", "http://localhost:1"},
		},
		{
			name:    "null only when listed",
			origins: []string{"null"},
			allowed: []string{"null", "NULL"},
			refused: []string{"http://localhost:3000", "file://"},
		},
		{
			name:    "placeholders are replaced and comma lists split",
			origins: []string{"{env.CORS_TEST_ORIGINS}"},
			allowed: []string{"https://a.example", "https://b.example"},
			refused: []string{"http://localhost:3000"},
		},
	}
	t.Setenv("CORS_TEST_ORIGINS", " https://a.example , ,https://b.example ")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := newCORSPolicy(c.origins, nil)
			require.NoError(t, err)
			require.NotNil(t, p)
			for _, o := range c.allowed {
				assert.True(t, p.allows(o), "%q should be allowed by %q", o, c.origins)
			}
			for _, o := range c.refused {
				assert.False(t, p.allows(o), "%q should be refused by %q", o, c.origins)
			}
		})
	}
}

func TestCORSOff(t *testing.T) {
	for _, origins := range [][]string{{}, {"off"}, {"OFF"}, {" off "}} {
		p, err := newCORSPolicy(origins, nil)
		require.NoError(t, err, "%q", origins)
		assert.Nil(t, p, "%q turns CORS off", origins)
	}
	p, err := newCORSPolicy(nil, nil)
	require.NoError(t, err)
	assert.NotNil(t, p, "no option at all is Ollama's default, not off")
}

func TestCORSOriginErrors(t *testing.T) {
	cases := []struct {
		origins []string
		want    string
	}{
		{[]string{"off", "https://a.example"}, "cannot be combined"},
		{[]string{"https://a.example,off"}, "cannot be combined"},
		{[]string{"http://localhost:3000/"}, "an origin has no path"},
		{[]string{"https://a.example/app"}, "an origin has no path"},
		{[]string{"localhost:3000"}, "no scheme"},
		{[]string{"app.example.com"}, "no scheme"},
		{[]string{"http://*.a.*"}, "at most one *"},
		{[]string{"http://"}, "want scheme://host"},
		{[]string{"://host"}, "want scheme://host"},
		{[]string{"http://a b"}, "space or control character"},
		{[]string{"{env.CORS_TEST_UNSET_VARIABLE}"}, "no origin left"},
	}
	for _, c := range cases {
		_, err := newCORSPolicy(c.origins, nil)
		if assert.Error(t, err, "%q", c.origins) {
			assert.Contains(t, err.Error(), c.want, "%q", c.origins)
		}
	}
}

// TestCORSJSONSpellings provisions from JSON as Caddy does: an absent
// option is Ollama's default, [] and ["off"] are off, a bad origin names
// the option.
func TestCORSJSONSpellings(t *testing.T) {
	const backends = `"backends":[{"name":"a","url":"127.0.0.1:1"}]`
	h, err := provisionJSON(t, `{`+backends+`}`)
	require.NoError(t, err)
	require.NotNil(t, h.cors)
	assert.True(t, h.cors.allows("http://localhost:3000"))
	assert.False(t, h.cors.allows("https://evil.example"))

	for _, off := range []string{`[]`, `["off"]`} {
		h, err = provisionJSON(t, `{"cors_origins":`+off+`,`+backends+`}`)
		require.NoError(t, err)
		assert.Nil(t, h.cors, "%s turns CORS off", off)
	}

	_, err = provisionJSON(t, `{"cors_origins":["http://localhost:3000/"],`+backends+`}`)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `cors_origins: origin "http://localhost:3000/"`)
}

func TestCORSAllowHeadersIncludeTheFrontendsOwn(t *testing.T) {
	p, err := newCORSPolicy(nil, []string{"X-OllamaFlow-Label", "x-conversation-id", "authorization"})
	require.NoError(t, err)
	for _, want := range []string{"Authorization", "Content-Type", "Openai-Beta", "X-Stainless-Retry-Count", "X-Ollamaflow-Label", "X-Conversation-Id"} {
		assert.Contains(t, ","+p.allowHeaders+",", ","+want+",")
	}
	assert.Equal(t, 1, countOf(p.allowHeaders, "Authorization"), "each header once: %s", p.allowHeaders)
}

func countOf(list, name string) (n int) {
	for _, f := range splitComma(list) {
		if f == name {
			n++
		}
	}
	return n
}

func splitComma(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != ',' {
			i++
		}
		out = append(out, s[:i])
		if i == len(s) {
			break
		}
		s = s[i+1:]
	}
	return out
}

func TestSameHost(t *testing.T) {
	assert.True(t, sameHost("http://llm.example.com", "llm.example.com"))
	assert.True(t, sameHost("https://llm.example.com:8443", "LLM.example.com:8443"))
	assert.False(t, sameHost("https://llm.example.com", "llm.example.com:8443"))
	assert.False(t, sameHost("app://llm.example.com", "llm.example.com"))
	assert.False(t, sameHost("http://", ""))
}

func TestVaryMerges(t *testing.T) {
	hdr := http.Header{}
	addVary(hdr, "Origin")
	assert.Equal(t, []string{"Origin"}, hdr.Values("Vary"))
	addVary(hdr, "origin, Accept-Encoding", "Accept-Encoding", "")
	assert.Equal(t, []string{"Origin", "Accept-Encoding"}, hdr.Values("Vary"))
	addVary(hdr, "Access-Control-Request-Method", "Access-Control-Request-Headers")
	assert.Equal(t, []string{"Origin", "Accept-Encoding", "Access-Control-Request-Method, Access-Control-Request-Headers"}, hdr.Values("Vary"))
}

func TestCopyBackendHeadersDropsItsCORS(t *testing.T) {
	dst := http.Header{}
	dst.Set("Access-Control-Allow-Origin", "http://localhost:3000")
	dst.Set("Vary", "Origin")
	src := http.Header{}
	src.Set("Access-Control-Allow-Origin", "*")
	src.Set("Access-Control-Allow-Credentials", "true")
	src.Set("Access-Control-Expose-Headers", "X-Secret")
	src.Add("Vary", "Accept-Encoding")
	src.Add("Vary", "Origin")
	src.Set("Content-Type", "application/x-ndjson")
	copyBackendHeaders(dst, src)
	assert.Equal(t, []string{"http://localhost:3000"}, dst.Values("Access-Control-Allow-Origin"))
	assert.Empty(t, dst.Values("Access-Control-Allow-Credentials"))
	assert.Empty(t, dst.Values("Access-Control-Expose-Headers"))
	assert.Equal(t, []string{"Origin", "Accept-Encoding"}, dst.Values("Vary"))
	assert.Equal(t, "application/x-ndjson", dst.Get("Content-Type"))
}

// TestHandleCORS drives the hook directly: what each kind of request gets
// back, before any route logic runs.
func TestHandleCORS(t *testing.T) {
	h := &Handler{labelHeader: defaultLabelHeader}
	var err error
	h.cors, err = newCORSPolicy(nil, h.corsRequestHeaders())
	require.NoError(t, err)

	do := func(method, origin string, hdr ...string) (*httptest.ResponseRecorder, bool) {
		r := httptest.NewRequest(method, "http://llm.example.com/api/chat", nil)
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			r.Header.Set(hdr[i], hdr[i+1])
		}
		w := httptest.NewRecorder()
		return w, h.handleCORS(w, r, apiOllama)
	}

	w, done := do("OPTIONS", "http://localhost:3000", "Access-Control-Request-Method", "POST", "Access-Control-Request-Private-Network", "true")
	assert.True(t, done)
	assert.Equal(t, http.StatusNoContent, w.Code)
	assert.Equal(t, "http://localhost:3000", w.Header().Get("Access-Control-Allow-Origin"))
	assert.Equal(t, corsAllowMethods, w.Header().Get("Access-Control-Allow-Methods"))
	assert.Contains(t, w.Header().Get("Access-Control-Allow-Headers"), "X-Ollamaflow-Label")
	assert.Equal(t, "43200", w.Header().Get("Access-Control-Max-Age"))
	assert.Equal(t, "true", w.Header().Get("Access-Control-Allow-Private-Network"))
	assert.Equal(t, []string{"Origin", "Access-Control-Request-Method, Access-Control-Request-Headers"}, w.Header().Values("Vary"))

	w, done = do("OPTIONS", "http://localhost:3000")
	assert.False(t, done, "an OPTIONS without Access-Control-Request-Method is not a preflight")
	assert.Equal(t, "http://localhost:3000", w.Header().Get("Access-Control-Allow-Origin"))
	assert.Empty(t, w.Header().Get("Access-Control-Allow-Methods"))

	w, done = do("POST", "http://localhost:3000")
	assert.False(t, done)
	assert.Equal(t, "http://localhost:3000", w.Header().Get("Access-Control-Allow-Origin"))
	assert.Equal(t, corsExposeHeaders, w.Header().Get("Access-Control-Expose-Headers"))
	assert.Equal(t, "Origin", w.Header().Get("Vary"))

	w, done = do("POST", "https://evil.example")
	assert.True(t, done)
	assert.Equal(t, http.StatusForbidden, w.Code)
	assert.Empty(t, w.Header().Get("Access-Control-Allow-Origin"))
	assert.Equal(t, "Origin", w.Header().Get("Vary"))
	assert.JSONEq(t, `{"error":"origin \"https://evil.example\" may not call this API from a browser; the frontend's cors_origins does not list it"}`, w.Body.String())

	w, done = do("OPTIONS", "https://evil.example", "Access-Control-Request-Method", "POST")
	assert.True(t, done)
	assert.Equal(t, http.StatusForbidden, w.Code, "a refused preflight is 403, as Ollama's")

	w, done = do("POST", "https://llm.example.com")
	assert.False(t, done, "the site's own pages are not cross-origin")
	assert.Empty(t, w.Header(), "left as Ollama leaves it")

	w, done = do("POST", "")
	assert.False(t, done)
	assert.Empty(t, w.Header(), "a client that is no browser sees what Ollama would send")

	h.cors = nil // off
	w, done = do("OPTIONS", "https://evil.example", "Access-Control-Request-Method", "POST")
	assert.False(t, done)
	assert.Empty(t, w.Header())
}

func BenchmarkCORSAllowsDefault(b *testing.B) {
	p, err := newCORSPolicy(nil, nil)
	require.NoError(b, err)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if !p.allows("vscode-file://vscode-app") || p.allows("https://evil.example") {
			b.Fatal("wrong answer")
		}
	}
}

// FuzzCORSOrigin checks, for any one-entry cors_origins and any Origin a
// client sends, that the matcher agrees with a plain reading of the
// pattern (one * for any run of characters, case-insensitive), and that
// an allowed origin is echoed exactly.
func FuzzCORSOrigin(f *testing.F) {
	for _, s := range [][2]string{
		{"http://localhost:*", "http://localhost:3000"},
		{"http://localhost:*", "http://localhost.evil.example"},
		{"https://*.example.com", "https://a.example.com"},
		{"http://a*a", "http://a"},
		{"app://*", "APP://obsidian.md"},
		{"*", "null"},
		{"null", "null"},
		{"https://app.example.com", "https://app.example.com"},
		{"*.example.com", "https://x.example.com"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, origin string) {
		if strings.ContainsAny(pattern, ",{") || !utf8.ValidString(pattern) || !utf8.ValidString(origin) {
			return // lists and placeholders are split and replaced first; the reference needs UTF-8
		}
		p, err := newCORSPolicy([]string{pattern}, nil)
		if err != nil || p == nil {
			return
		}
		lp := strings.ToLower(strings.TrimSpace(pattern))
		if lp == corsDefault {
			return
		}
		want := lp == "*"
		if !want {
			before, after, _ := strings.Cut(lp, "*")
			re := "(?s)^" + regexp.QuoteMeta(before) + "$"
			if strings.Contains(lp, "*") {
				re = "(?s)^" + regexp.QuoteMeta(before) + ".*" + regexp.QuoteMeta(after) + "$"
			}
			want = regexp.MustCompile(re).MatchString(strings.ToLower(origin))
		}
		if got := p.allows(origin); got != want {
			t.Fatalf("pattern %q, origin %q: allows = %v, want %v", pattern, origin, got, want)
		}

		h := &Handler{cors: p, labelHeader: defaultLabelHeader}
		r := httptest.NewRequest(http.MethodPost, "http://llm.example.com/api/chat", nil)
		r.Header.Set("Origin", origin)
		w := httptest.NewRecorder()
		answered := h.handleCORS(w, r, apiOllama)
		switch {
		case origin == "" || sameHost(origin, r.Host):
			if answered || w.Header().Get("Access-Control-Allow-Origin") != "" {
				t.Fatalf("origin %q is not cross-origin, yet answered %v with %q", origin, answered, w.Header())
			}
		case want:
			if answered || w.Header().Get("Access-Control-Allow-Origin") != origin {
				t.Fatalf("allowed origin %q: answered %v, Access-Control-Allow-Origin %q", origin, answered, w.Header().Get("Access-Control-Allow-Origin"))
			}
		default:
			if !answered || w.Code != http.StatusForbidden || w.Header().Get("Access-Control-Allow-Origin") != "" {
				t.Fatalf("refused origin %q: answered %v, status %d, headers %q", origin, answered, w.Code, w.Header())
			}
		}
	})
}
