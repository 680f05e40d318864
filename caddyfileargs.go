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
	"github.com/dustin/go-humanize"
	"github.com/tidwall/sjson"
)

// The Caddyfile's argument parsers, shared by the ollamaflow directive, its
// backend and tenant blocks: one value per kind of option, each error
// naming the option and what it accepts.

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
