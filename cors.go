package ollamaflow

// CORS the way Ollama answers it, so browser extensions, editor plugins and
// web apps that talk to an Ollama server from a page work through the
// frontend too. Ollama v0.17.4 (server/routes.go) runs gin-contrib/cors with
// its envconfig.AllowedOrigins: a request whose Origin is neither allowed nor
// the server's own host is refused with 403, whatever its method; an allowed
// OPTIONS is answered 204 with the allowed methods and headers; any other
// allowed request carries Access-Control-Allow-Origin and Vary: Origin.
//
// The frontend is the only authority: it never forwards Origin (a backend
// with its own, different list would refuse what the frontend allowed) and
// drops a backend's Access-Control-* headers, so an answer never carries two.

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// ollamaDefaultOrigins is Ollama's envconfig.AllowedOrigins without
// OLLAMA_ORIGINS: what a stock Ollama server lets pages call it from.
var ollamaDefaultOrigins = []string{
	"http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
	"http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
	"http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
	"app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
}

// Keywords of cors_origins.
const (
	corsOff     = "off"     // alone: CORS off
	corsDefault = "default" // Ollama's default list, to add origins to it as OLLAMA_ORIGINS does
)

// What a preflight is told, as Ollama tells it: gin-contrib/cors's default
// methods and max age, and Ollama's request headers (its clients' and the
// OpenAI SDK's). The frontend adds its label and sticky headers.
const (
	corsAllowMethods = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
	corsMaxAge       = "43200" // 12 hours
)

var corsAllowHeaders = []string{
	"Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
	"OpenAI-Beta", "X-Stainless-Arch", "X-Stainless-Async", "X-Stainless-Custom-Poll-Interval",
	"X-Stainless-Helper-Method", "X-Stainless-Lang", "X-Stainless-Os", "X-Stainless-Package-Version",
	"X-Stainless-Poll-Helper", "X-Stainless-Retry-Count", "X-Stainless-Runtime",
	"X-Stainless-Runtime-Version", "X-Stainless-Timeout",
}

// corsExposeHeaders are the frontend's own response headers a page may
// read; Ollama has none, and without this a page could not see why to
// wait (Retry-After) or which server answered.
const corsExposeHeaders = "Retry-After, X-OllamaFlow-Backend, X-OllamaFlow-Sticky, X-OllamaFlow-Route"

// corsPolicy is cors_origins parsed at provision. A nil policy is CORS off.
type corsPolicy struct {
	any          bool
	exact        map[string]struct{}
	patterns     []originPattern
	allowHeaders string // the preflight's Access-Control-Allow-Headers
}

// originPattern is an origin with one *, which stands for any run of
// characters (none included), as in gin-contrib/cors: http://localhost:*
// is the prefix "http://localhost:", app://* the prefix "app://".
type originPattern struct{ prefix, suffix string }

func (p originPattern) matches(origin string) bool {
	return len(origin) >= len(p.prefix)+len(p.suffix) &&
		strings.HasPrefix(origin, p.prefix) && strings.HasSuffix(origin, p.suffix)
}

// newCORSPolicy parses cors_origins. nil origins means Ollama's default
// list; an empty list, or "off" alone, means CORS off (a nil policy).
// Entries may hold placeholders ({env.OLLAMA_ORIGINS}) and comma-separated
// lists, as OLLAMA_ORIGINS does. Origins compare case-insensitively.
func newCORSPolicy(origins, extraHeaders []string) (*corsPolicy, error) {
	if origins == nil {
		origins = []string{corsDefault}
	}
	if len(origins) == 0 {
		return nil, nil
	}
	repl := caddy.NewReplacer()
	var list []string
	for _, entry := range origins {
		for _, o := range strings.Split(repl.ReplaceKnown(entry, ""), ",") {
			if o = strings.ToLower(strings.TrimSpace(o)); o != "" {
				list = append(list, o)
			}
		}
	}
	for _, o := range list {
		if o == corsOff {
			if len(list) > 1 {
				return nil, errors.New("off turns CORS off and cannot be combined with origins")
			}
			return nil, nil
		}
	}
	if len(list) == 0 {
		return nil, errors.New("no origin left once placeholders are replaced; write off to turn CORS off")
	}
	c := &corsPolicy{exact: make(map[string]struct{})}
	for _, o := range list {
		if o == corsDefault {
			for _, d := range ollamaDefaultOrigins {
				c.add(d)
			}
			continue
		}
		if err := checkOrigin(o); err != nil {
			return nil, err
		}
		c.add(o)
	}
	c.allowHeaders = joinHeaderNames(append(append([]string(nil), corsAllowHeaders...), extraHeaders...))
	return c, nil
}

func (c *corsPolicy) add(o string) {
	switch i := strings.IndexByte(o, '*'); {
	case o == "*":
		c.any = true
	case i >= 0:
		p := originPattern{o[:i], o[i+1:]}
		for _, q := range c.patterns {
			if q == p {
				return
			}
		}
		c.patterns = append(c.patterns, p)
	default:
		c.exact[o] = struct{}{}
	}
}

// checkOrigin validates one cors_origins entry (lowercased, not a keyword).
// A path is the usual mistake: browsers send an origin without one, so
// "http://localhost:3000/" would never match.
func checkOrigin(o string) error {
	const want = "want scheme://host[:port] without a path, a pattern with one * (http://localhost:*, app://*), * or null"
	if o == "*" || o == "null" {
		return nil
	}
	if strings.ContainsFunc(o, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return fmt.Errorf("origin %q: contains a space or control character; %s", o, want)
	}
	if strings.Count(o, "*") > 1 {
		return fmt.Errorf("origin %q: at most one * per origin; %s", o, want)
	}
	scheme, rest, ok := strings.Cut(o, "://")
	if !ok {
		if strings.Contains(o, "*") {
			return nil // a bare pattern such as *.example.com
		}
		return fmt.Errorf("origin %q: no scheme; %s", o, want)
	}
	if scheme == "" || (rest == "" && !strings.Contains(o, "*")) {
		return fmt.Errorf("origin %q: %s", o, want)
	}
	if strings.Contains(rest, "/") {
		return fmt.Errorf("origin %q: an origin has no path (drop the trailing /); %s", o, want)
	}
	return nil
}

// allows reports whether a page of origin may call the frontend. Per
// request: at most one lowercase copy, one map lookup and a few prefix
// tests.
func (c *corsPolicy) allows(origin string) bool {
	if c.any {
		return true
	}
	origin = strings.ToLower(origin)
	if _, ok := c.exact[origin]; ok {
		return true
	}
	for _, p := range c.patterns {
		if p.matches(origin) {
			return true
		}
	}
	return false
}

// corsRequestHeaders are the frontend's own request headers a page may
// send besides Ollama's: the label header, the sticky session headers and
// the headers that carry tenants' keys.
func (h *Handler) corsRequestHeaders() []string {
	hdrs := []string{h.labelHeader}
	if h.Sticky != nil {
		hdrs = append(hdrs, h.Sticky.Headers...)
	}
	if h.Tenants != nil {
		hdrs = append(hdrs, h.Tenants.keyHeaders()...)
	}
	return hdrs
}

// handleCORS applies the frontend's CORS policy before anything else looks
// at the request. It reports whether it has answered: a preflight (204) or
// a refused origin (403, in the API's error format, as Ollama refuses it
// with 403). Otherwise it has set the headers every answer carries, proxied
// or the frontend's own, errors included.
func (h *Handler) handleCORS(w http.ResponseWriter, r *http.Request, api apiFormat) bool {
	c := h.cors
	if c == nil {
		return false
	}
	origin := r.Header.Get("Origin")
	if origin == "" || sameHost(origin, r.Host) {
		// Not a cross-origin request: untouched, as Ollama leaves it, so a
		// client that is not a browser cannot tell the frontend from Ollama.
		return false
	}
	hdr := w.Header()
	addVary(hdr, "Origin")
	if !c.allows(origin) {
		shown := origin
		if len(shown) > 100 {
			shown = shown[:100] + "…"
		}
		_ = h.fail(w, api, http.StatusForbidden, fmt.Sprintf("origin %q may not call this API from a browser; the frontend's cors_origins does not list it", shown))
		return true
	}
	hdr.Set("Access-Control-Allow-Origin", origin)
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		addVary(hdr, "Access-Control-Request-Method", "Access-Control-Request-Headers")
		hdr.Set("Access-Control-Allow-Methods", corsAllowMethods)
		hdr.Set("Access-Control-Allow-Headers", c.allowHeaders)
		hdr.Set("Access-Control-Max-Age", corsMaxAge)
		// Chrome asks before a public page reaches a private address; an
		// origin the operator allowed may.
		if strings.EqualFold(r.Header.Get("Access-Control-Request-Private-Network"), "true") {
			hdr.Set("Access-Control-Allow-Private-Network", "true")
		}
		w.WriteHeader(http.StatusNoContent)
		return true
	}
	hdr.Set("Access-Control-Expose-Headers", corsExposeHeaders)
	return false
}

// sameHost reports whether origin is the request's own host over http or
// https: a page of the same site, which needs no CORS.
func sameHost(origin, host string) bool {
	rest, ok := strings.CutPrefix(origin, "http://")
	if !ok {
		rest, ok = strings.CutPrefix(origin, "https://")
	}
	return ok && host != "" && strings.EqualFold(rest, host)
}

// copyBackendHeaders copies a backend's response headers onto the client's
// answer. The backend's Access-Control-* headers are dropped: the
// frontend's (set by handleCORS, or none when CORS is off) stand alone. Its
// Vary is merged with the frontend's rather than replacing it.
func copyBackendHeaders(dst, src http.Header) {
	for k, v := range src {
		switch {
		case strings.HasPrefix(k, "Access-Control-"):
		case k == "Vary":
			addVary(dst, v...)
		default:
			dst[k] = v
		}
	}
}

// addVary adds each field name (or comma-separated list of them) to the
// Vary header, once, whatever its case.
func addVary(hdr http.Header, values ...string) {
	if len(hdr["Vary"]) == 0 {
		// The usual case, a fresh answer: no joining and splitting.
		hdr["Vary"] = []string{strings.Join(values, ", ")}
		return
	}
	have := strings.Join(hdr["Vary"], ",")
	var add []string
	for _, v := range values {
		for _, name := range strings.Split(v, ",") {
			name = strings.TrimSpace(name)
			if name == "" || varyHas(have, name) {
				continue
			}
			have += "," + name
			add = append(add, name)
		}
	}
	if len(add) > 0 {
		hdr["Vary"] = append(hdr["Vary"], strings.Join(add, ", "))
	}
}

func varyHas(list, name string) bool {
	for _, f := range strings.Split(list, ",") {
		if strings.EqualFold(strings.TrimSpace(f), name) {
			return true
		}
	}
	return false
}

// joinHeaderNames is a header list value: canonical names, each once.
func joinHeaderNames(names []string) string {
	seen := make(map[string]bool, len(names))
	out := make([]string, 0, len(names))
	for _, n := range names {
		n = http.CanonicalHeaderKey(strings.TrimSpace(n))
		if n != "" && !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return strings.Join(out, ",")
}
