package ollamaflow

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule((*StatusPage)(nil))
}

// StatusPage is the http.handlers.ollamaflow_status handler: the dashboard
// (status.html) and the JSON it reads, served on whatever Caddy site it is
// placed in, so that the site's own basic_auth, forward_auth or mutual TLS
// guard it like any other page. It reads the same live state as the admin
// endpoint (no proxying to it) and lets an operator drain, undrain and
// refresh a backend, each action logged with who did it.
//
// Routes are relative to the page, so the handler works at a site's root,
// under a path matcher or inside handle_path: GET of a path ending in "/"
// is the page; GET of …/backends, …/frontends, …/history, …/usage is that
// JSON document, as on the admin endpoint; POST …/backends/{name}/drain,
// /undrain and /refresh act on a backend. Anything else is 404.
type StatusPage struct {
	// ReadOnly serves the dashboard and its JSON without actions: the page
	// shows no buttons and every action is refused with 403. Default:
	// false (actions allowed).
	ReadOnly bool `json:"read_only,omitempty"`

	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*StatusPage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.ollamaflow_status",
		New: func() caddy.Module { return new(StatusPage) },
	}
}

// Provision sets up the handler.
func (s *StatusPage) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	return nil
}

// statusTokenHeader carries the page's token on every action.
const statusTokenHeader = "X-OllamaFlow-Token"

// statusTokenTTL is how long a served page may act: a dashboard left open
// longer must be reloaded before its buttons work again.
const statusTokenTTL = 24 * time.Hour

// statusKey signs the per-page tokens. It is per process and never leaves
// it: a restart invalidates every open page's token, a config reload does
// not.
var statusKey = sync.OnceValue(func() []byte {
	k := make([]byte, 32)
	_, _ = rand.Read(k) // never fails (crypto/rand crashes the program instead)
	return k
})

// statusToken is a page's token: when it was issued, and an HMAC binding
// that time to the user the page was served to, so a token copied from one
// operator's page does not work with another's credentials.
func statusToken(user string, now time.Time) string {
	ts := strconv.FormatInt(now.Unix(), 10)
	return ts + "." + statusMAC(ts, user)
}

func statusMAC(ts, user string) string {
	m := hmac.New(sha256.New, statusKey())
	m.Write([]byte("ollamaflow_status\x00" + ts + "\x00" + user))
	return hex.EncodeToString(m.Sum(nil))
}

var errStatusToken = errors.New("missing or invalid " + statusTokenHeader + " header: reload the dashboard and try again")

// checkStatusToken accepts a token issued to user within statusTokenTTL.
func checkStatusToken(tok, user string, now time.Time) error {
	ts, mac, ok := strings.Cut(tok, ".")
	if !ok || !hmac.Equal([]byte(mac), []byte(statusMAC(ts, user))) {
		return errStatusToken
	}
	issued, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return errStatusToken
	}
	if age := now.Sub(time.Unix(issued, 0)); age < -time.Minute || age > statusTokenTTL {
		return errors.New("the dashboard's token has expired: reload the page")
	}
	return nil
}

// The served page is status.html with its token meta tag filled in. The
// admin endpoint serves it as is: no token, so the page shows no actions.
var statusTokenMeta = []byte(`<meta name="ollamaflow-token" content="">`)

// statusPageCSP allows the page's one inline script by its hash, its inline
// styles and requests to its own origin, nothing else, and forbids framing
// so that no other site can overlay its buttons (clickjacking).
var statusPageCSP = sync.OnceValue(func() string {
	script := ""
	if _, rest, ok := bytes.Cut(statusPage, []byte("<script>")); ok {
		if body, _, ok := bytes.Cut(rest, []byte("</script>")); ok {
			sum := sha256.Sum256(body)
			script = " 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
		}
	}
	return "default-src 'none'; script-src" + script + "; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
})

// ServeHTTP serves the dashboard, its JSON and its actions. It never calls
// next: every path it is given is its own.
func (s *StatusPage) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	segs := strings.Split(r.URL.EscapedPath(), "/")
	n := len(segs)
	switch {
	case n >= 4 && segs[n-3] == "backends" && slices.Contains(backendActions, segs[n-1]):
		if r.Method != http.MethodPost {
			return statusError(w, http.StatusMethodNotAllowed, "POST", fmt.Errorf("method %s not allowed; use POST", r.Method))
		}
		name, err := url.PathUnescape(segs[n-2])
		if err != nil || name == "" {
			return statusError(w, http.StatusBadRequest, "", fmt.Errorf("bad backend name in path"))
		}
		return s.act(w, r, name, segs[n-1])
	case statusReads[segs[n-1]] != nil:
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return statusError(w, http.StatusMethodNotAllowed, "GET, HEAD", fmt.Errorf("method %s not allowed; use GET", r.Method))
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(statusReads[segs[n-1]]())
	case segs[n-1] == "":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return statusError(w, http.StatusMethodNotAllowed, "GET, HEAD", fmt.Errorf("method %s not allowed; use GET", r.Method))
		}
		return s.page(w, r)
	}
	return statusError(w, http.StatusNotFound, "", fmt.Errorf("not found: the dashboard is at a path ending in /, its data at backends, frontends, history and usage beside it"))
}

// page serves status.html, with a token for the user it is served to
// unless the handler is read-only.
func (s *StatusPage) page(w http.ResponseWriter, r *http.Request) error {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", statusPageCSP())
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	page := statusPage
	if !s.ReadOnly {
		filled := fmt.Appendf(nil, `<meta name="ollamaflow-token" content="%s">`, statusToken(authUser(r), time.Now()))
		page = bytes.Replace(statusPage, statusTokenMeta, filled, 1)
	}
	h.Set("Content-Length", strconv.Itoa(len(page)))
	_, err := w.Write(page)
	return err
}

// act runs one action after the cross-site checks, and logs it with who
// asked.
func (s *StatusPage) act(w http.ResponseWriter, r *http.Request, name, action string) error {
	user := authUser(r)
	frontend := r.URL.Query().Get("frontend")
	who := []zap.Field{
		zap.String("action", action), zap.String("backend", name), zap.String("frontend", frontend),
		zap.String("user", user), zap.String("remote_addr", r.RemoteAddr),
	}
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		who = append(who, zap.String("client_ip", ip))
	}
	refuse := func(status int, err error) error {
		s.logger.Info("dashboard action refused", append(who, zap.Int("status", status), zap.String("reason", err.Error()))...)
		return statusError(w, status, "", err)
	}
	if s.ReadOnly {
		return refuse(http.StatusForbidden, errors.New("this dashboard is read-only (read_only)"))
	}
	// A browser says where a request comes from (Sec-Fetch-Site, or Origin
	// against Host); another site's page may not act through a logged-in
	// operator's browser.
	if err := http.NewCrossOriginProtection().Check(r); err != nil {
		return refuse(http.StatusForbidden, errors.New("cross-origin request refused: act from the dashboard itself"))
	}
	// The token is the second lock, for browsers and proxies that send
	// neither header: only a page this handler served knows it.
	if err := checkStatusToken(r.Header.Get(statusTokenHeader), user, time.Now()); err != nil {
		return refuse(http.StatusForbidden, err)
	}
	st, err := backendAction(r.Context(), name, frontend, action)
	if err != nil {
		status := http.StatusInternalServerError
		var apiErr caddy.APIError
		if errors.As(err, &apiErr) {
			status, err = apiErr.HTTPStatus, apiErr.Err
		}
		s.logger.Info("dashboard action failed", append(who, zap.Int("status", status), zap.Error(err))...)
		return statusError(w, status, "", err)
	}
	s.logger.Info("dashboard action", who...)
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(st)
}

// authUser is the user an authentication handler before this one
// identified ({http.auth.user.id}), or "".
func authUser(r *http.Request) string {
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		return ""
	}
	user, _ := repl.GetString("http.auth.user.id")
	return user
}

// statusError answers {"error": message}, the shape the page reads.
func statusError(w http.ResponseWriter, status int, allow string, err error) error {
	if allow != "" {
		w.Header().Set("Allow", allow)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

// Interface guards
var (
	_ caddy.Provisioner           = (*StatusPage)(nil)
	_ caddyhttp.MiddlewareHandler = (*StatusPage)(nil)
)
