package ollamaflow

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"github.com/tidwall/sjson"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("ollamaflow", parseCaddyfile)
	// An ollamaflow site usually answers the Ollama API and hands anything
	// else to a reverse_proxy or file_server, so it runs before them and
	// users need no order line.
	httpcaddyfile.RegisterDirectiveOrder("ollamaflow", httpcaddyfile.Before, "reverse_proxy")

	httpcaddyfile.RegisterHandlerDirective("ollamaflow_status", parseStatusCaddyfile)
	// The dashboard is a page that answers, like Caddy's own metrics: it
	// sits right after metrics, so after respond and basic_auth/forward_auth
	// and before ollamaflow and reverse_proxy. A site sharing the dashboard
	// with a frontend scopes it with a path matcher (ollamaflow_status
	// /ops/*) and the frontend gets every other path, with no order line.
	httpcaddyfile.RegisterDirectiveOrder("ollamaflow_status", httpcaddyfile.After, "metrics")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return handler, nil
}

func parseStatusCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(StatusPage)
	if err := s.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return s, nil
}

// UnmarshalCaddyfile sets up the dashboard handler from Caddyfile tokens.
// Syntax:
//
//	ollamaflow_status [<matcher>] [{
//		read_only [true|false]
//	}]
func (s *StatusPage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("%s given twice", opt)
		}
		seen[opt] = true
		switch opt {
		case "read_only":
			v, err := parseFlag(d)
			if err != nil {
				return err
			}
			s.ReadOnly = v
		default:
			return d.Errf("unknown ollamaflow_status option %q", opt)
		}
	}
	return nil
}

// Options that may be given more than once in a block; their values
// accumulate. Any other option given twice is an error, because the second
// value would silently replace the first.
var (
	repeatableHandlerOptions = map[string]bool{"models": true, "labels": true, "backend": true, "backends_from": true, "required_models": true, "cors_origins": true}
	repeatableBackendOptions = map[string]bool{"labels": true, "header": true}
)

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	ollamaflow [<matcher>] {
//		name                   <name>
//		lb_policy              least_delay|least_conn|round_robin|random|first
//		retries                <count>
//		max_request_body       <size>
//		max_body_memory        <size>
//		dial_timeout           <duration>
//		first_byte_timeout     <duration>
//		response_timeout       <duration>
//		stream_idle_timeout    <duration>
//		client_write_timeout   <duration>
//		max_queue              <count>
//		max_queue_per_client   <count>
//		queue_timeout          <duration>
//		allow_embeddings       [true|false]
//		allow_completions      [true|false]
//		allow_model_management [true|false]
//		models                 <model...>
//		labels                 <label...>
//		label_header           <header>
//		pin_completions        <json-object> | {
//			<path> <value>
//		}
//		pin_embeddings         <json-object> | {
//			<path> <value>
//		}
//		required_models        <model...>
//		insecure_pulls         [true|false]
//		sticky {
//			headers   <header...>
//			client_ip
//		}
//		conversation_affinity  [on|off]
//		cors_origins           <origin...> | off
//		tenants {
//			# see Tenants.UnmarshalCaddyfile
//		}
//		explorer               [<path>]
//
//		backend <name> <url> [{
//			# see Backend.UnmarshalCaddyfile
//		}]
//		backends_from a <host> [<port>] | srv <name> [{
//			# see BackendSource.UnmarshalCaddyfile
//		}]
//	}
//
// A flag without an argument means true. Sizes accept units (64MiB, 10MB)
// or plain bytes; durations use Caddy's syntax (5s, 2m, 1d). models, labels,
// required_models, cors_origins, backend and backends_from may repeat;
// every other option may be given once. At least one backend or
// backends_from is required.
//
// cors_origins lists origins (https://app.example.com), patterns with one *
// (http://localhost:*), * (any origin), null, and default (Ollama's own
// list, which applies when the option is absent); cors_origins off, alone,
// turns CORS off.
//
// explorer serves the API Explorer page on this site, at /explorer/ unless
// a path is given.
//
// pin_completions and pin_embeddings take one JSON object (quote it with
// backticks) or a block of lines that each set one value at an sjson path:
// options.temperature 0.7 pins {"options":{"temperature":0.7}}. A value that
// parses as JSON is that JSON; anything else is a string. Escape a dot in a
// key as \., write :N for a numeric key, and pin an array whole.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name
	if d.NextArg() {
		return d.ArgErr()
	}

	seen := make(map[string]bool)
	backendNames := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !repeatableHandlerOptions[opt] {
			return d.Errf("duplicate ollamaflow option '%s'", opt)
		}
		seen[opt] = true

		var err error
		switch opt {
		case "name":
			h.Name, err = oneArg(d)
		case "lb_policy":
			h.LBPolicy, err = parsePolicy(d)
		case "retries":
			var n int
			n, err = parseInt(d, 0)
			h.Retries = &n
		case "max_request_body":
			h.MaxRequestBody, err = parseSize(d)
		case "max_body_memory":
			h.MaxBodyMemory, err = parseSize(d)
		case "dial_timeout":
			h.DialTimeout, err = parseDuration(d)
		case "first_byte_timeout":
			h.FirstByteTimeout, err = parseDuration(d)
		case "stream_idle_timeout":
			h.StreamIdleTimeout, err = parseDuration(d)
		case "response_timeout":
			h.ResponseTimeout, err = parseDuration(d)
		case "client_write_timeout":
			h.ClientWriteTimeout, err = parseDuration(d)
		case "max_queue":
			h.MaxQueue, err = parseInt(d, 1)
		case "max_queue_per_client":
			h.MaxQueuePerClient, err = parseInt(d, 1)
		case "queue_timeout":
			h.QueueTimeout, err = parseDuration(d)
		case "allow_embeddings":
			h.AllowEmbeddings, err = parseFlagPtr(d)
		case "allow_completions":
			h.AllowCompletions, err = parseFlagPtr(d)
		case "allow_model_management":
			h.AllowModelManagement, err = parseFlag(d)
		case "models":
			var models []string
			models, err = someArgs(d)
			h.Models = append(h.Models, models...)
		case "labels":
			var labels []string
			labels, err = someArgs(d)
			h.Labels = append(h.Labels, labels...)
		case "label_header":
			h.LabelHeader, err = oneArg(d)
		case "required_models":
			var models []string
			models, err = someArgs(d)
			h.RequiredModels = append(h.RequiredModels, models...)
		case "insecure_pulls":
			h.InsecurePulls, err = parseFlag(d)
		case "sticky":
			h.Sticky, err = parseSticky(d)
		case "conversation_affinity":
			h.ConversationAffinity, err = parseSwitch(d)
		case "pin_completions":
			h.PinCompletions, err = parsePinOption(d)
		case "pin_embeddings":
			h.PinEmbeddings, err = parsePinOption(d)
		case "cors_origins":
			var origins []string
			origins, err = someArgs(d)
			h.CORSOrigins = append(h.CORSOrigins, origins...)
			if err == nil {
				err = checkCORSOrigins(d, h.CORSOrigins, origins)
			}
		case "tenants":
			h.Tenants = new(Tenants)
			err = h.Tenants.UnmarshalCaddyfile(caddyfile.NewDispenser(d.NextSegment()))
		case "explorer":
			h.ExplorerPath, err = parseExplorer(d)
		case "backends_from":
			src := new(BackendSource)
			err = src.UnmarshalCaddyfile(caddyfile.NewDispenser(d.NextSegment()))
			h.BackendsFrom = append(h.BackendsFrom, src)
		case "backend":
			var b *Backend
			b, err = parseBackendSegment(d, backendNames)
			if b != nil {
				h.Backends = append(h.Backends, b)
			}
		default:
			return unrecognized(d, "ollamaflow")
		}
		if err != nil {
			return err
		}
	}

	if len(h.Backends) == 0 && len(h.BackendsFrom) == 0 {
		// Point at the directive itself: the block is where the backend
		// is missing, and its last token may be anything.
		d.Reset()
		d.Next()
		return d.Errf("at least one backend is required (backend <name> <url>, or backends_from a <host> [<port>])")
	}
	return nil
}

// checkCORSOrigins reports, at the line that wrote it, an origin of added
// that provision would refuse, and off given with anything else. Entries
// with placeholders are checked at provision, once they are replaced.
func checkCORSOrigins(d *caddyfile.Dispenser, all, added []string) error {
	for _, o := range all {
		if strings.EqualFold(o, corsOff) && len(all) > 1 {
			return d.Err("cors_origins: off turns CORS off and cannot be combined with origins")
		}
	}
	for _, entry := range added {
		if strings.Contains(entry, "{") {
			continue
		}
		for _, o := range strings.Split(entry, ",") {
			o = strings.ToLower(strings.TrimSpace(o))
			if o == "" || o == corsOff || o == corsDefault {
				continue
			}
			if err := checkOrigin(o); err != nil {
				return d.Errf("cors_origins: %v", err)
			}
		}
	}
	return nil
}

// parseExplorer reads `explorer [<path>]`.
func parseExplorer(d *caddyfile.Dispenser) (string, error) {
	args := d.RemainingArgs()
	switch len(args) {
	case 0:
		return defaultExplorerPath, nil
	case 1:
		if _, err := normalizeExplorerPath(args[0]); err != nil {
			return "", d.Errf("explorer: %v", err)
		}
		return args[0], nil
	}
	return "", d.Errf("explorer: want at most one argument (a path), got %d", len(args))
}

// The helpers below are called with the cursor on an option name; they
// consume that option's arguments and report errors at its line, naming it.

// unrecognized reports the option under the cursor as unknown. A '{' in
// option position is a block opened after an option that takes none.
func unrecognized(d *caddyfile.Dispenser, kind string) error {
	if d.Val() == "{" {
		return d.Err("unexpected '{': the option on this line takes no block")
	}
	return d.Errf("unrecognized %s option '%s'", kind, d.Val())
}

// oneArg returns the option's single argument.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) != 1 {
		return "", d.Errf("%s: want exactly one argument, got %d", opt, len(args))
	}
	return args[0], nil
}

// someArgs returns the option's arguments, of which there must be at least one.
func someArgs(d *caddyfile.Dispenser) ([]string, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) == 0 {
		return nil, d.Errf("%s: want at least one argument", opt)
	}
	return args, nil
}

// parseFlag reads a boolean option: bare means true, else true or false.
func parseFlag(d *caddyfile.Dispenser) (bool, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	switch {
	case len(args) == 0:
		return true, nil
	case len(args) > 1:
		return false, d.Errf("%s: want at most one argument (true or false), got %d", opt, len(args))
	case args[0] == "true":
		return true, nil
	case args[0] == "false":
		return false, nil
	default:
		return false, d.Errf("%s: want true or false, got '%s'", opt, args[0])
	}
}

// parseFlagPtr is parseFlag for options whose unset state has its own
// default.
func parseFlagPtr(d *caddyfile.Dispenser) (*bool, error) {
	v, err := parseFlag(d)
	if err != nil {
		return nil, err
	}
	return &v, nil
}

// parseSwitch reads an option that is on or off (true or false): bare
// means on.
func parseSwitch(d *caddyfile.Dispenser) (*bool, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	on := true
	switch {
	case len(args) > 1:
		return nil, d.Errf("%s: want at most one argument (on or off), got %d", opt, len(args))
	case len(args) == 0, args[0] == "on", args[0] == "true":
	case args[0] == "off", args[0] == "false":
		on = false
	default:
		return nil, d.Errf("%s: want on or off, got '%s'", opt, args[0])
	}
	return &on, nil
}

// parseInt reads an integer option that must be at least minimum.
func parseInt(d *caddyfile.Dispenser, minimum int) (int, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, d.Errf("%s: want an integer, got '%s'", opt, s)
	}
	if n < minimum {
		if minimum == 0 {
			return 0, d.Errf("%s: must not be negative, got %d", opt, n)
		}
		return 0, d.Errf("%s: must be at least %d, got %d", opt, minimum, n)
	}
	return n, nil
}

// parseDuration reads a positive duration. Zero is refused rather than
// silently meaning the default.
func parseDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return 0, d.Errf("%s: invalid duration '%s': %v", opt, s, err)
	}
	if dur <= 0 {
		return 0, d.Errf("%s: must be positive, got %s", opt, time.Duration(dur))
	}
	return caddy.Duration(dur), nil
}

// parseSize reads a positive byte size such as 64MiB, 10MB or 1048576.
func parseSize(d *caddyfile.Dispenser) (int64, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, d.Errf("%s: invalid size '%s': %v", opt, s, err)
	}
	if n == 0 || n > math.MaxInt64 {
		return 0, d.Errf("%s: must be between 1 byte and %d bytes, got '%s'", opt, int64(math.MaxInt64), s)
	}
	return int64(n), nil
}

// parsePolicy reads lb_policy, accepting the policies the balancer knows.
func parsePolicy(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return "", err
	}
	if _, ok := policies[s]; !ok {
		return "", d.Errf("%s: unknown policy '%s' (want one of %s)", opt, s, policyNames())
	}
	return s, nil
}

// parseHeader reads "header <field> <value>" and adds it to the backend.
func parseHeader(d *caddyfile.Dispenser, b *Backend) error {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) != 2 {
		return d.Errf("%s: want 2 arguments (a field name and a value), got %d", opt, len(args))
	}
	if b.Headers == nil {
		b.Headers = make(http.Header)
	}
	b.Headers.Add(args[0], args[1])
	return nil
}

// parseQuery reads the query appended to every backend URL.
func parseQuery(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return "", err
	}
	if _, err := url.ParseQuery(strings.TrimPrefix(s, "?")); err != nil {
		return "", d.Errf("%s: invalid query '%s': %v", opt, s, err)
	}
	return s, nil
}

// parseHealthURI reads the probe path, which must be absolute.
func parseHealthURI(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(s, "/") {
		return "", d.Errf("%s: must start with /, got '%s'", opt, s)
	}
	return s, nil
}

// parseHealthMethod reads GET or HEAD, in any case.
func parseHealthMethod(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return "", err
	}
	m := strings.ToUpper(s)
	if m != http.MethodGet && m != http.MethodHead {
		return "", d.Errf("%s: want GET or HEAD, got '%s'", opt, s)
	}
	return m, nil
}

// parseHealthStatus reads a status code (200) or a class (2xx); a class is
// stored as its digit, as the JSON field expects.
func parseHealthStatus(d *caddyfile.Dispenser) (int, error) {
	opt := d.Val()
	s, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	if len(s) == 3 && strings.EqualFold(s[1:], "xx") && s[0] >= '1' && s[0] <= '5' {
		return int(s[0] - '0'), nil
	}
	code, err := strconv.Atoi(s)
	if err != nil || len(s) != 3 || code < 100 || code > 599 {
		return 0, d.Errf("%s: want a status code (100-599) or a class (1xx-5xx), got '%s'", opt, s)
	}
	return code, nil
}

// parseStatusList reads fail_status: one or more codes (502) or classes
// (5xx), stored as reverse_proxy stores unhealthy_status (a class as its
// digit).
func parseStatusList(d *caddyfile.Dispenser) ([]int, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) == 0 {
		return nil, d.ArgErr()
	}
	out := make([]int, 0, len(args))
	for _, s := range args {
		if len(s) == 3 && strings.EqualFold(s[1:], "xx") && s[0] >= '1' && s[0] <= '5' {
			out = append(out, int(s[0]-'0'))
			continue
		}
		code, err := strconv.Atoi(s)
		if err != nil || len(s) != 3 || code < 100 || code > 599 {
			return nil, d.Errf("%s: want status codes (100-599) or classes (1xx-5xx), got '%s'", opt, s)
		}
		out = append(out, code)
	}
	return out, nil
}

// parsePinOption reads pin_completions or pin_embeddings: one JSON object
// argument, or a block of PATH VALUE lines. The lines build one JSON object
// with sjson; a line may not set a path another line sets or lies under.
func parsePinOption(d *caddyfile.Dispenser) (json.RawMessage, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) > 1 {
		return nil, d.Errf("%s: want one JSON object argument or a block of PATH VALUE lines, got %d arguments (quote JSON with backticks)", opt, len(args))
	}
	if len(args) == 1 {
		if d.NextBlock(d.Nesting()) {
			return nil, d.Errf("%s: give one JSON object argument or a block, not both", opt)
		}
		raw := json.RawMessage(args[0])
		if _, err := parsePins(raw, opt); err != nil {
			return nil, d.Err(err.Error())
		}
		return raw, nil
	}

	obj := []byte("{}")
	var paths [][]string
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		path := d.Val()
		vals := d.RemainingArgs()
		if len(vals) != 1 {
			return nil, d.Errf("%s: want PATH VALUE, got %d values after '%s' (quote a value that has spaces)", opt, len(vals), path)
		}
		keys, err := parsePinPath(path)
		if err != nil {
			return nil, d.Errf("%s: path '%s': %v", opt, path, err)
		}
		for _, prev := range paths {
			if keysPrefix(prev, keys) || keysPrefix(keys, prev) {
				return nil, d.Errf("%s: path '%s' overlaps the earlier '%s'; give each value one line", opt, path, strings.Join(prev, "."))
			}
		}
		paths = append(paths, keys)
		value := []byte(vals[0])
		if !json.Valid(value) {
			value, _ = json.Marshal(vals[0])
		}
		if obj, err = sjson.SetRawBytes(obj, path, value); err != nil {
			return nil, d.Errf("%s: path '%s': %v", opt, path, err)
		}
		if _, err := parsePins(obj, opt); err != nil {
			return nil, d.Err(err.Error())
		}
	}
	if len(paths) == 0 {
		return nil, d.Errf("%s: want one JSON object argument or a block of PATH VALUE lines", opt)
	}
	return obj, nil
}

// parsePinPath splits an sjson path into the object keys it names. It
// refuses what sjson would not read as object keys: wildcards and
// modifiers (which sjson ignores without an error), empty keys, and
// numeric keys or -1 (which build arrays; arrays are pinned whole).
func parsePinPath(path string) ([]string, error) {
	var keys []string
	rest := path
	for {
		force := strings.HasPrefix(rest, ":")
		if force {
			rest = rest[1:]
		}
		var key []byte
		i := 0
		for ; i < len(rest) && rest[i] != '.'; i++ {
			switch c := rest[i]; c {
			case '\\':
				i++
				if i == len(rest) {
					return nil, errors.New("ends with a lone backslash")
				}
				key = append(key, rest[i])
			case '|', '#', '@', '*', '?':
				return nil, fmt.Errorf("'%c' is a wildcard or modifier in sjson paths; write \\%c for a key that has it", c, c)
			default:
				key = append(key, c)
			}
		}
		k := string(key)
		if k == "" {
			return nil, errors.New("empty key")
		}
		if !force && isArrayIndex(k) {
			return nil, fmt.Errorf("'%s' would index an array; pin the whole array as a JSON value, or write :%s for a key named %s", k, k, k)
		}
		keys = append(keys, k)
		if i == len(rest) {
			return keys, nil
		}
		rest = rest[i+1:]
	}
}

// isArrayIndex reports whether sjson takes key for an array index.
func isArrayIndex(key string) bool {
	if key == "-1" {
		return true
	}
	for i := 0; i < len(key); i++ {
		if key[i] < '0' || key[i] > '9' {
			return false
		}
	}
	return true
}

// keysPrefix reports whether path a is b or lies above it.
func keysPrefix(a, b []string) bool {
	if len(a) > len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Backend)(nil)
)

// parseSticky parses
//
//	sticky {
//		headers   <header...>
//		client_ip
//	}
func parseSticky(d *caddyfile.Dispenser) (*StickyConfig, error) {
	if d.NextArg() {
		return nil, d.Errf("sticky: options go in a block, got argument '%s'", d.Val())
	}
	sc := &StickyConfig{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "headers":
			names, err := someArgs(d)
			if err != nil {
				return nil, err
			}
			sc.Headers = append(sc.Headers, names...)
		case "client_ip":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			sc.ClientIP = true
		default:
			return nil, unrecognized(d, "sticky")
		}
	}
	if len(sc.Headers) == 0 && !sc.ClientIP {
		return nil, d.Err("sticky: name at least one header (headers …) or client_ip")
	}
	return sc, nil
}
