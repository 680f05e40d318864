package ollamaflow

// The API Explorer's page over plain HTTP: where it is served, with what
// headers, and that it changes nothing about the APIs beside it. The page
// at work in a browser is explorer_browser_test.go.

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// noRedirects is a client that shows redirects instead of following them.
var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

func inlineHash(t *testing.T, page, open, close string) string {
	t.Helper()
	i := strings.Index(page, open)
	require.GreaterOrEqual(t, i, 0, "no %s in the page", open)
	j := strings.Index(page[i:], close)
	require.GreaterOrEqual(t, j, 0, "no %s in the page", close)
	require.Equal(t, 1, strings.Count(page, open), "one %s element", open)
	sum := sha256.Sum256([]byte(page[i+len(open) : i+j]))
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

func TestExplorerServesItsPage(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, "backend a "+a.URL+"\nexplorer")

	res, page := send(t, http.MethodGet, siteURL+"/explorer/", "")
	require.Equal(t, http.StatusOK, res.StatusCode, page)
	assert.Equal(t, "text/html; charset=utf-8", res.Header.Get("Content-Type"))
	assert.Equal(t, "nosniff", res.Header.Get("X-Content-Type-Options"))
	assert.True(t, strings.Replace(string(explorerPage), explorerPathMarker, "/explorer/", 1) == page, "the embedded page, for its path")
	assert.Contains(t, page, `<meta name="ollamaflow-explorer-path" content="/explorer/">`)
	assert.Empty(t, res.Header.Get("X-OllamaFlow-Backend"), "the page is the frontend's own, no backend's")

	csp := res.Header.Get("Content-Security-Policy")
	for _, directive := range []string{
		"default-src 'none'",
		"script-src " + inlineHash(t, page, "<script>", "</script>"),
		"style-src " + inlineHash(t, page, "<style>", "</style>"),
		"connect-src 'self'",
		"frame-ancestors 'none'",
		"base-uri 'none'",
		"form-action 'none'",
	} {
		assert.Contains(t, csp, directive, "CSP %q", csp)
	}
	assert.NotContains(t, csp, "unsafe-inline")
	assert.NotContains(t, csp, "unsafe-eval")

	// Self-contained: nothing loaded from anywhere. The one URL in the
	// page is the SVG namespace, a name, not a load.
	style := page[strings.Index(page, "<style>"):strings.Index(page, "</style>")]
	for _, external := range []string{"url(", "@import"} {
		assert.False(t, strings.Contains(style, external), "the style loads nothing: %s", external)
	}
	// An empty icon, so the browser does not ask the API for /favicon.ico.
	assert.Equal(t, 1, strings.Count(page, "<link"))
	assert.Contains(t, page, `<link rel="icon" href="data:,">`)
	for _, external := range []string{"https://", "src=", "<iframe", "<img", "<object", "<embed"} {
		assert.False(t, strings.Contains(page, external), "the page loads nothing: %s", external)
	}
	assert.Equal(t, strings.Count(page, "http://"), strings.Count(page, `"http://www.w3.org/2000/svg"`), "no URL but the SVG namespace")
	assert.False(t, strings.Contains(page, "innerHTML"), "server strings go in as text, never parsed as HTML")
	assert.False(t, strings.Contains(page, "localStorage"), "the API key stays in the tab's session")
	assert.False(t, strings.Contains(page, "eval("), "no eval")

	res, body := send(t, http.MethodHead, siteURL+"/explorer/", "")
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Empty(t, body)
	assert.Equal(t, fmt.Sprint(len(page)), res.Header.Get("Content-Length"))
	assert.Equal(t, csp, res.Header.Get("Content-Security-Policy"))

	res, body = send(t, http.MethodPost, siteURL+"/explorer/", "{}")
	assert.Equal(t, http.StatusMethodNotAllowed, res.StatusCode, body)
	assert.Equal(t, "GET, HEAD", res.Header.Get("Allow"))

	res, err := noRedirects.Get(siteURL + "/explorer?api=openai")
	require.NoError(t, err)
	res.Body.Close()
	assert.Equal(t, http.StatusMovedPermanently, res.StatusCode)
	assert.Equal(t, "explorer/?api=openai", res.Header.Get("Location"), "relative, so a stripped path prefix stays")

	res, body = send(t, http.MethodGet, siteURL+"/explorer/more", "")
	assert.Equal(t, http.StatusNotFound, res.StatusCode, "only the page itself")
	assert.Contains(t, gjson.Get(body, "error").String(), "unknown path /explorer/more")

	res, body = send(t, http.MethodGet, siteURL+"/api/tags", "")
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, `["tiny-llama:latest"]`, gjson.Get(body, "models.#.name").Raw, "the APIs beside it are unchanged")
}

func TestExplorerIsOffByDefaultAndMoves(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, "backend a "+a.URL)
	res, body := send(t, http.MethodGet, siteURL+"/explorer/", "")
	assert.Equal(t, http.StatusNotFound, res.StatusCode)
	assert.Contains(t, gjson.Get(body, "error").String(), "unknown path /explorer/", "off: the path is an unknown API path, in Ollama's format")

	loadCaddy(t, "backend a "+a.URL+"\nexplorer /tools/try")
	res, page := send(t, http.MethodGet, siteURL+"/tools/try/", "")
	require.Equal(t, http.StatusOK, res.StatusCode, page)
	assert.Contains(t, page, `<meta name="ollamaflow-explorer-path" content="/tools/try/">`)
	res, err := noRedirects.Get(siteURL + "/tools/try")
	require.NoError(t, err)
	res.Body.Close()
	assert.Equal(t, http.StatusMovedPermanently, res.StatusCode)
	assert.Equal(t, "try/", res.Header.Get("Location"))
	res, _ = send(t, http.MethodGet, siteURL+"/explorer/", "")
	assert.Equal(t, http.StatusNotFound, res.StatusCode, "only the configured path")
}

func TestExplorerPathValidation(t *testing.T) {
	for in, want := range map[string]string{
		"/explorer":        "/explorer/",
		"/explorer/":       "/explorer/",
		"/tools/try":       "/tools/try/",
		"/Explorer-2_x.y/": "/Explorer-2_x.y/",
	} {
		got, err := normalizeExplorerPath(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for in, want := range map[string]string{
		"":             "must start with /",
		"explorer":     "must start with /",
		"/":            "cannot be /",
		"/api/try":     "under /api/ or /v1/",
		"/API/try":     "under /api/ or /v1/",
		"/v1":          "under /api/ or /v1/",
		"/a b":         "a path without spaces",
		"/a?b":         "a path without spaces",
		"/a%2f":        "a path without spaces",
		"/a\"><script": "a path without spaces",
		"/a//b":        "not a clean path",
		"/a/../api":    "not a clean path",
		"/a/.":         "not a clean path",
	} {
		_, err := normalizeExplorerPath(in)
		require.Error(t, err, "%q", in)
		assert.Contains(t, err.Error(), want, "%q", in)
	}

	h := &Handler{ExplorerPath: "/v1/x", Backends: []*Backend{{Name: "a", URL: "127.0.0.1"}}}
	err := h.provisionExplorer()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "explorer_path:", "provision names the JSON option")
}
