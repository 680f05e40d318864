package ollamaflow

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Backend is one Ollama server as this frontend sees it: its address and the
// frontend's properties for it. Its live state is shared (see health.go).
type Backend struct {
	// Name identifies the backend in logs, metrics, the admin API and the
	// X-OllamaFlow-Backend response header. Required, unique per frontend.
	Name string `json:"name,omitempty"`

	// URL is the server's base URL. A bare host or host:port means
	// http://host:11434; a URL with a scheme and no port uses the scheme's
	// port. Credentials, query and fragment are not allowed in it.
	URL string `json:"url,omitempty"`

	// Labels are matched, exactly and case-insensitively, against the labels
	// a request requires.
	Labels []string `json:"labels,omitempty"`

	// MaxParallel caps the requests in flight on this server for this
	// frontend, counted on the server's shared state. 0 means no cap.
	MaxParallel int `json:"max_parallel,omitempty"`

	// RequestsPerMinute caps the inference requests started on this server
	// in any 60-second window, counted on the server's shared state (every
	// frontend's requests count, and the count survives reloads), against
	// this frontend's limit. A server at its rate is skipped like one at its
	// max_parallel; when every candidate is, requests wait in the queue and
	// are handed a slot when the window admits again. 0 means no limit; at
	// most 100000.
	RequestsPerMinute int `json:"requests_per_minute,omitempty"`

	// Weight biases round_robin, random, sticky hashing, least_delay and
	// least_conn ties; at most 1000000. Default: 1.
	Weight int `json:"weight,omitempty"`

	// AllowEmbeddings lets this backend serve embedding requests. Default: true.
	AllowEmbeddings *bool `json:"allow_embeddings,omitempty"`

	// AllowCompletions lets this backend serve generate and chat requests.
	// Default: true.
	AllowCompletions *bool `json:"allow_completions,omitempty"`

	// PinCompletions is merged into completion requests sent to this
	// backend, after the frontend's pins (so it may override them), on each
	// attempt: a retry on another backend gets that backend's pins instead.
	// Same rules as the frontend's. Default: none.
	PinCompletions json.RawMessage `json:"pin_completions,omitempty"`

	// PinEmbeddings is PinCompletions for embedding requests. Default: none.
	PinEmbeddings json.RawMessage `json:"pin_embeddings,omitempty"`

	// BearerToken is sent as "Authorization: Bearer TOKEN" on every call to
	// this backend, health probes included. Never logged or shown.
	BearerToken string `json:"bearer_token,omitempty"`

	// Headers are set on every call to this backend.
	Headers http.Header `json:"headers,omitempty"`

	// Query is appended to every backend URL (for example "token=abc").
	Query string `json:"query,omitempty"`

	// Disabled keeps the backend in the config but sends it nothing.
	Disabled bool `json:"disabled,omitempty"`

	// HealthURI is the path probed by the active health checker. Default: /.
	HealthURI string `json:"health_uri,omitempty"`

	// HealthMethod is GET or HEAD. Default: GET.
	HealthMethod string `json:"health_method,omitempty"`

	// HealthStatus is the status a healthy server answers: a full code such
	// as 200, or a single digit for a class (2 means any 2xx). Default: 2.
	HealthStatus int `json:"health_status,omitempty"`

	// HealthInterval is the time between probes. Default: 5s.
	HealthInterval caddy.Duration `json:"health_interval,omitempty"`

	// HealthTimeout bounds one probe. Default: 2s.
	HealthTimeout caddy.Duration `json:"health_timeout,omitempty"`

	// HealthPasses is the number of consecutive passing probes that make an
	// unhealthy server healthy. Default: 2.
	HealthPasses int `json:"health_passes,omitempty"`

	// HealthFails is the number of consecutive failing probes that make a
	// healthy server unhealthy. Default: 2.
	HealthFails int `json:"health_fails,omitempty"`

	// FailThreshold is the number of consecutive proxy failures (connection
	// errors, broken or stalled streams, first-byte timeouts and answers in
	// FailStatus) that mark the server unhealthy at once. Default: 3.
	FailThreshold int `json:"fail_threshold,omitempty"`

	// FailStatus are the answer statuses that count as the server's
	// failures for FailThreshold: full codes (502) or class digits (5 means
	// any 5xx). Default: 502 and 504. A 500 is left out because clients can
	// provoke it (a num_ctx the server has no memory for), and a 503 "server
	// busy" is back-pressure: the request moves on and the server is skipped
	// until it has room (a second at most), but the breaker does not count
	// it unless listed here.
	FailStatus []int `json:"fail_status,omitempty"`

	// ModelRefresh is how often the server's model lists (/api/tags and
	// /api/ps) are read while it is healthy. Default: 15s.
	ModelRefresh caddy.Duration `json:"model_refresh,omitempty"`

	// PullConcurrency is how many required models are pulled onto this
	// server at once. Default: 1.
	PullConcurrency int `json:"pull_concurrency,omitempty"`

	pinCompl    pinTrees
	pinEmbed    pinTrees
	pinWarnings []string // pins an API has no field for, logged by the frontend
}

// provision applies the backend's defaults and validates its options.
func (b *Backend) provision() error {
	if strings.TrimSpace(b.Name) == "" {
		return errors.New("name: required")
	}
	if !validName(b.Name) {
		return fmt.Errorf("name: %q may only contain letters, digits, '.', '_' and '-' (it appears in headers and admin URLs)", b.Name)
	}
	// Secrets usually come from the environment: {env.GPU1_TOKEN}.
	var err error
	if b.URL, err = resolvePlaceholders("url", b.URL); err != nil {
		return err
	}
	if b.BearerToken, err = resolvePlaceholders("bearer_token", b.BearerToken); err != nil {
		return err
	}
	if b.Query, err = resolvePlaceholders("query", b.Query); err != nil {
		return err
	}
	for k, vs := range b.Headers {
		if !validHeaderName(k) {
			return fmt.Errorf("header: invalid header name %q", k)
		}
		for i, v := range vs {
			if vs[i], err = resolvePlaceholders("header "+k, v); err != nil {
				return err
			}
		}
	}
	if b.BearerToken != "" && b.Headers.Get("Authorization") != "" {
		return errors.New("bearer_token and an Authorization header are both set; keep one")
	}
	if strings.TrimSpace(b.URL) == "" {
		return errors.New("url: required")
	}
	if b.pinWarnings, err = b.provisionPins(); err != nil {
		return err
	}
	for opt, n := range map[string]int{
		"max_parallel":        b.MaxParallel,
		"requests_per_minute": b.RequestsPerMinute,
		"weight":              b.Weight,
		"health_passes":       b.HealthPasses,
		"health_fails":        b.HealthFails,
		"fail_threshold":      b.FailThreshold,
		"pull_concurrency":    b.PullConcurrency,
	} {
		if n < 0 {
			return fmt.Errorf("%s: must not be negative, got %d", opt, n)
		}
	}
	for opt, d := range map[string]caddy.Duration{
		"health_interval": b.HealthInterval,
		"health_timeout":  b.HealthTimeout,
		"model_refresh":   b.ModelRefresh,
	} {
		if d < 0 {
			return fmt.Errorf("%s: must not be negative, got %s", opt, time.Duration(d))
		}
	}
	if b.RequestsPerMinute > maxRequestsPerMinute {
		return fmt.Errorf("requests_per_minute: at most %d, got %d", maxRequestsPerMinute, b.RequestsPerMinute)
	}
	if b.Weight == 0 {
		b.Weight = 1
	}
	if b.Weight > maxWeight {
		return fmt.Errorf("weight: at most %d, got %d (weights are relative: divide them all)", maxWeight, b.Weight)
	}
	if b.HealthURI == "" {
		b.HealthURI = defaultHealthURI
	}
	if !strings.HasPrefix(b.HealthURI, "/") {
		return fmt.Errorf("health_uri: must start with /, got %q", b.HealthURI)
	}
	if b.HealthMethod == "" {
		b.HealthMethod = defaultHealthMethod
	}
	b.HealthMethod = strings.ToUpper(b.HealthMethod)
	if b.HealthMethod != http.MethodGet && b.HealthMethod != http.MethodHead {
		return fmt.Errorf("health_method: must be GET or HEAD, got %q", b.HealthMethod)
	}
	if b.HealthStatus == 0 {
		b.HealthStatus = defaultHealthStatus
	}
	if !validStatusExpectation(b.HealthStatus) {
		return fmt.Errorf("health_status: want a status code (100-599) or a class digit (1-5), got %d", b.HealthStatus)
	}
	if b.HealthInterval == 0 {
		b.HealthInterval = caddy.Duration(defaultHealthInterval)
	}
	if b.HealthTimeout == 0 {
		b.HealthTimeout = caddy.Duration(defaultHealthTimeout)
	}
	if b.HealthPasses == 0 {
		b.HealthPasses = defaultHealthPasses
	}
	if b.HealthFails == 0 {
		b.HealthFails = defaultHealthFails
	}
	if b.FailThreshold == 0 {
		b.FailThreshold = defaultFailThreshold
	}
	if len(b.FailStatus) == 0 {
		b.FailStatus = []int{http.StatusBadGateway, http.StatusGatewayTimeout}
	}
	for _, code := range b.FailStatus {
		if !validStatusExpectation(code) {
			return fmt.Errorf("fail_status: want status codes (100-599) or class digits (1-5), got %d", code)
		}
	}
	if b.ModelRefresh == 0 {
		b.ModelRefresh = caddy.Duration(defaultModelRefresh)
	}
	if b.PullConcurrency == 0 {
		b.PullConcurrency = defaultPullConc
	}
	if b.Query != "" {
		if _, err := url.ParseQuery(strings.TrimPrefix(b.Query, "?")); err != nil {
			return fmt.Errorf("query: %v", err)
		}
	}
	return nil
}

// parseBackendURL normalises a backend address: a bare host[:port] gets
// http and Ollama's port 11434; a URL with a scheme but no port gets that
// scheme's port (80 or 443). The host is lowercased and a trailing slash
// dropped. Credentials in the URL are rejected: use bearer_token or header,
// which are never shown.
func parseBackendURL(raw string) (*url.URL, error) {
	s := strings.TrimSpace(raw)
	explicitScheme := strings.Contains(s, "://")
	if !explicitScheme {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("invalid URL %q: %v", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("scheme must be http or https, got %q", u.Scheme)
	}
	if u.User != nil {
		return nil, errors.New("credentials in the URL are not allowed; use bearer_token or header")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("the URL must not carry a query or fragment; use the query option")
	}
	host := u.Hostname()
	if host == "" {
		return nil, fmt.Errorf("missing host in %q", raw)
	}
	port := u.Port()
	if port == "" {
		// A bare address means Ollama's own port; an explicit scheme
		// means what a URL means everywhere else.
		switch {
		case !explicitScheme:
			port = defaultOllamaPort
		case u.Scheme == "https":
			port = "443"
		default:
			port = "80"
		}
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, fmt.Errorf("invalid port %q", port)
	}
	u.Host = net.JoinHostPort(strings.ToLower(host), port)
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// placeholderRE finds Caddy placeholders such as {env.GPU1_TOKEN}.
var placeholderRE = regexp.MustCompile(`\{[^{}\s]+\}`)

// resolvePlaceholders replaces the global placeholders in a backend option.
// A placeholder that resolves to nothing is an error, not an empty value: an
// unset {env.GPU1_TOKEN} would otherwise send no credentials, and the
// mistake would surface only as the backend's 401s. The message names the
// placeholder, never the rest of the value (which may be a secret).
func resolvePlaceholders(opt, v string) (string, error) {
	repl := caddy.NewReplacer()
	for _, loc := range placeholderRE.FindAllStringIndex(v, -1) {
		if loc[0] > 0 && v[loc[0]-1] == '\\' {
			continue // escaped: a literal brace
		}
		ph := v[loc[0]:loc[1]]
		key := ph[1 : len(ph)-1]
		if got, known := repl.Get(key); known && fmt.Sprint(got) == "" {
			if env, ok := strings.CutPrefix(key, "env."); ok {
				return "", fmt.Errorf("%s: %s is empty: the environment variable %s is unset or empty", opt, ph, env)
			}
			return "", fmt.Errorf("%s: %s is empty", opt, ph)
		}
	}
	return repl.ReplaceKnown(v, ""), nil
}

// parseBackendSegment parses the backend line (and its block) under the
// cursor into a new Backend, rejecting a name already used in this handler.
func parseBackendSegment(d *caddyfile.Dispenser, names map[string]bool) (*Backend, error) {
	sub := caddyfile.NewDispenser(d.NextSegment())
	b := new(Backend)
	if err := b.UnmarshalCaddyfile(sub); err != nil {
		if b.Name != "" {
			return nil, fmt.Errorf("backend '%s': %w", b.Name, err)
		}
		return nil, err
	}
	if names[b.Name] {
		// Report at the name, not at the end of the backend's block.
		sub.Reset()
		sub.Next()
		sub.NextArg()
		return nil, sub.Errf("duplicate backend name '%s'", b.Name)
	}
	names[b.Name] = true
	return b, nil
}

// UnmarshalCaddyfile sets up the backend from Caddyfile tokens. Syntax:
//
//	backend <name> <url> {
//		labels            <label...>
//		max_parallel      <count>
//		requests_per_minute <count>
//		weight            <weight>
//		allow_embeddings  [true|false]
//		allow_completions [true|false]
//		pin_completions   <json-object> | { <path> <value> ... }
//		pin_embeddings    <json-object> | { <path> <value> ... }
//		bearer_token      <token>
//		header            <field> <value>
//		query             <query>
//		disabled          [true|false]
//
//		health_uri        <path>
//		health_method     GET|HEAD
//		health_status     <code>|<class>xx
//		health_interval   <duration>
//		health_timeout    <duration>
//		health_passes     <count>
//		health_fails      <count>
//		fail_threshold    <count>
//		fail_status       <code|Nxx...>
//
//		model_refresh     <duration>
//		pull_concurrency  <count>
//	}
//
// The url is host[:port] (http and port 11434 implied) or a full http or
// https URL. labels and header may repeat; every other option may be given
// once. max_parallel and requests_per_minute 0 mean no limit; the other
// counts must be at least 1.
func (b *Backend) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume "backend"
	if !d.Args(&b.Name, &b.URL) {
		return d.ArgErr()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	if _, err := parseBackendURL(b.URL); err != nil {
		return d.Errf("url: %v", err)
	}

	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !repeatableBackendOptions[opt] {
			return d.Errf("duplicate backend option '%s'", opt)
		}
		seen[opt] = true

		if err := b.unmarshalOption(d, opt); err != nil {
			return err
		}
	}
	return nil
}

// unmarshalOption parses one backend option, the cursor on its name. It is
// shared by backend blocks and by backends_from blocks, whose options apply
// to every discovered server.
func (b *Backend) unmarshalOption(d *caddyfile.Dispenser, opt string) error {
	var err error
	switch opt {
	case "labels":
		var labels []string
		labels, err = someArgs(d)
		b.Labels = append(b.Labels, labels...)
	case "max_parallel":
		b.MaxParallel, err = parseInt(d, 0)
	case "requests_per_minute":
		b.RequestsPerMinute, err = parseInt(d, 0)
	case "weight":
		b.Weight, err = parseInt(d, 1)
	case "allow_embeddings":
		b.AllowEmbeddings, err = parseFlagPtr(d)
	case "allow_completions":
		b.AllowCompletions, err = parseFlagPtr(d)
	case "pin_completions":
		b.PinCompletions, err = parsePinOption(d)
	case "pin_embeddings":
		b.PinEmbeddings, err = parsePinOption(d)
	case "bearer_token":
		b.BearerToken, err = oneArg(d)
	case "header":
		err = parseHeader(d, b)
	case "query":
		b.Query, err = parseQuery(d)
	case "disabled":
		b.Disabled, err = parseFlag(d)
	case "health_uri":
		b.HealthURI, err = parseHealthURI(d)
	case "health_method":
		b.HealthMethod, err = parseHealthMethod(d)
	case "health_status":
		b.HealthStatus, err = parseHealthStatus(d)
	case "health_interval":
		b.HealthInterval, err = parseDuration(d)
	case "health_timeout":
		b.HealthTimeout, err = parseDuration(d)
	case "health_passes":
		b.HealthPasses, err = parseInt(d, 1)
	case "health_fails":
		b.HealthFails, err = parseInt(d, 1)
	case "fail_threshold":
		b.FailThreshold, err = parseInt(d, 1)
	case "fail_status":
		b.FailStatus, err = parseStatusList(d)
	case "model_refresh":
		b.ModelRefresh, err = parseDuration(d)
	case "pull_concurrency":
		b.PullConcurrency, err = parseInt(d, 1)
	default:
		return unrecognized(d, "backend")
	}
	return err
}
