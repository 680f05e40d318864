package ollamaflow

// The API Explorer: one self-contained page (explorer.html, embedded) that a
// frontend serves on its own site when explorer_path is set. The page calls
// the frontend's /api/* and /v1/* same-origin with fetch, so every policy the
// frontend enforces (CORS, tenants, models, pins, queue, limits) applies to
// what a person sends from it exactly as to any client.

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"fmt"
	"html"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

//go:embed explorer.html
var explorerPage []byte

// defaultExplorerPath is where `explorer` without an argument serves the page.
const defaultExplorerPath = "/explorer/"

// explorerPathMarker is replaced, in the page's <meta> only, by the path the
// page is served at; its script reads it to find the API beside the page
// when the frontend sits under a path prefix (handle_path /llm/*).
const explorerPathMarker = "{{explorer_path}}"

// explorerCSP is the page's Content-Security-Policy: nothing from anywhere
// but its own inline script and style (allowed by hash, so no injected
// script or style runs), fetches to its own origin only, no frames, forms or
// base changes. Computed once from the embedded page.
var explorerCSP = explorerPolicy(explorerPage)

var (
	inlineScriptRE = regexp.MustCompile(`(?s)<script>(.*?)</script>`)
	inlineStyleRE  = regexp.MustCompile(`(?s)<style>(.*?)</style>`)
)

func explorerPolicy(page []byte) string {
	hashes := func(re *regexp.Regexp) string {
		var out []string
		for _, m := range re.FindAllSubmatch(page, -1) {
			sum := sha256.Sum256(m[1])
			out = append(out, "'sha256-"+base64.StdEncoding.EncodeToString(sum[:])+"'")
		}
		return strings.Join(out, " ")
	}
	return "default-src 'none'; script-src " + hashes(inlineScriptRE) +
		"; style-src " + hashes(inlineStyleRE) +
		"; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
}

// normalizeExplorerPath checks explorer_path and gives it a trailing slash.
// The page may not hide any path the frontend answers: the root, /api/* and
// /v1/* belong to the APIs.
func normalizeExplorerPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("must start with /, got %q", p)
	}
	for _, c := range p {
		if c <= ' ' || c == 0x7f || strings.ContainsRune(`?#%"'<>\`, c) {
			return "", fmt.Errorf("%q: a path without spaces, quotes, ?, #, %%, < or >", p)
		}
	}
	if strings.Contains(p, "//") || strings.Contains(p, "/./") || strings.Contains(p, "/../") || strings.HasSuffix(p, "/..") || strings.HasSuffix(p, "/.") {
		return "", fmt.Errorf("%q: not a clean path", p)
	}
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	if p == "/" {
		return "", fmt.Errorf("cannot be /, which is Ollama's root")
	}
	lower := strings.ToLower(p)
	if strings.HasPrefix(lower, "/api/") || strings.HasPrefix(lower, "/v1/") {
		return "", fmt.Errorf("%q is under /api/ or /v1/, which the APIs serve", p)
	}
	return p, nil
}

// provisionExplorer validates explorer_path and renders the page for it.
func (h *Handler) provisionExplorer() error {
	if h.ExplorerPath == "" {
		return nil
	}
	p, err := normalizeExplorerPath(h.ExplorerPath)
	if err != nil {
		return fmt.Errorf("explorer_path: %v", err)
	}
	h.explorerPath = p
	h.explorerPage = bytes.Replace(explorerPage, []byte(explorerPathMarker), []byte(html.EscapeString(p)), 1)
	return nil
}

// serveExplorer answers the explorer's page and its slashless path; false
// means the request is not for the explorer.
func (h *Handler) serveExplorer(w http.ResponseWriter, r *http.Request) bool {
	if h.explorerPath == "" {
		return false
	}
	bare := h.explorerPath[:len(h.explorerPath)-1]
	if r.URL.Path != h.explorerPath && r.URL.Path != bare {
		return false
	}
	hdr := w.Header()
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		hdr.Set("Allow", "GET, HEAD")
		hdr.Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusMethodNotAllowed)
		_, _ = fmt.Fprintf(w, "method %s is not allowed on the API explorer; use GET\n", r.Method)
		return true
	}
	if r.URL.Path == bare {
		// Relative, so it also lands right behind a path prefix that a
		// handle_path stripped: /llm/explorer -> /llm/explorer/.
		target := bare[strings.LastIndexByte(bare, '/')+1:] + "/"
		if r.URL.RawQuery != "" {
			target += "?" + r.URL.RawQuery
		}
		// Set by hand: http.Redirect would make it absolute.
		hdr.Set("Location", target)
		w.WriteHeader(http.StatusMovedPermanently)
		return true
	}
	hdr.Set("Content-Type", "text/html; charset=utf-8")
	hdr.Set("Content-Length", strconv.Itoa(len(h.explorerPage)))
	hdr.Set("Content-Security-Policy", explorerCSP)
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Referrer-Policy", "no-referrer")
	// The page is in the binary: it changes only with an upgrade, and an old
	// copy in a cache would carry an old script under a new policy.
	hdr.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(h.explorerPage)
	}
	return true
}
