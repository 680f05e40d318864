package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
)

// TestCaddyfileAdapt adapts each testdata/*.caddyfiletest (a Caddyfile, a
// line of ten dashes, then the expected JSON) and compares the result.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/*.caddyfiletest")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.caddyfiletest files")
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, expected, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatalf("%s: no ---------- separator", file)
			}
			input = strings.TrimSpace(input) + "\n"
			expected = strings.TrimSpace(expected)
			if !caddytest.CompareAdapt(t, file, input, "caddyfile", expected) {
				t.Errorf("adapted config of %s differs from the expected JSON (diff above)", file)
			}
		})
	}
}

// frontend wraps option lines in a site and an ollamaflow block, so the
// first body line is line 3 of the Caddyfile.
func frontend(body string) string {
	return ":8080 {\n\tollamaflow {\n" + body + "\n\t}\n}\n"
}

func TestCaddyfileParseErrors(t *testing.T) {
	const ok = "\t\tbackend ok localhost"
	tests := []struct {
		name  string
		input string
		want  string // substring of the error
		line  int    // the error must end with Caddyfile:line
	}{
		// Structure.
		{"no block", ":8080 {\n\tollamaflow\n}\n", "at least one backend is required", 2},
		{"no backend", frontend("\t\tname llm"), "at least one backend is required", 2},
		{"directive argument", ":8080 {\n\tollamaflow extra {\n" + ok + "\n\t}\n}\n", "wrong argument count", 2},
		{"unknown option", frontend("\t\tfoo bar\n" + ok), "unrecognized ollamaflow option 'foo'", 3},
		{"block after a plain option", frontend("\t\tlabels a {\n\t\t\tb\n\t\t}\n" + ok), "unexpected '{': the option on this line takes no block", 3},
		{"duplicate option", frontend("\t\tname a\n\t\tname b\n" + ok), "duplicate ollamaflow option 'name'", 4},
		// Options of later issues stay unrecognized until their fields exist.
		{"required_models without models", frontend("\t\trequired_models\n" + ok), "required_models", 3},
		{"insecure_pulls bad flag", frontend("\t\tinsecure_pulls maybe\n" + ok), "insecure_pulls", 3},
		{"sticky empty", frontend("\t\tsticky {\n\t\t}\n" + ok), "sticky: name at least one header", 4},
		{"explorer two paths", frontend("\t\texplorer /a /b\n" + ok), "explorer: want at most one argument", 3},
		{"explorer under /api", frontend("\t\texplorer /api/try\n" + ok), "under /api/ or /v1/", 3},
		{"explorer at root", frontend("\t\texplorer /\n" + ok), "cannot be /", 3},
		{"explorer relative", frontend("\t\texplorer explorer\n" + ok), "must start with /", 3},
		{"explorer twice", frontend("\t\texplorer\n\t\texplorer /x\n" + ok), "duplicate ollamaflow option 'explorer'", 4},
		{"sticky unknown", frontend("\t\tsticky {\n\t\t\tcookie x\n\t\t}\n" + ok), "unrecognized sticky option 'cookie'", 4},
		{"sticky client_ip arg", frontend("\t\tsticky {\n\t\t\tclient_ip yes\n\t\t}\n" + ok), "wrong argument count", 4},
		{"model_refresh bad duration", frontend("\t\tbackend a localhost {\n\t\t\tmodel_refresh soon\n\t\t}"), "model_refresh", 4},
		{"pull_concurrency zero", frontend("\t\tbackend a localhost {\n\t\t\tpull_concurrency 0\n\t\t}"), "pull_concurrency", 4},

		// Frontend values.
		{"name without value", frontend("\t\tname\n" + ok), "name: want exactly one argument, got 0", 3},
		{"name with two values", frontend("\t\tname a b\n" + ok), "name: want exactly one argument, got 2", 3},
		{"unknown policy", frontend("\t\tlb_policy fastest\n" + ok), "lb_policy: unknown policy 'fastest'", 3},
		{"policy list", frontend("\t\tlb_policy fastest\n" + ok), "first, least_conn, least_delay, random, round_robin", 3},
		{"negative retries", frontend("\t\tretries -1\n" + ok), "retries: must not be negative, got -1", 3},
		{"non-integer retries", frontend("\t\tretries two\n" + ok), "retries: want an integer, got 'two'", 3},
		{"bad size", frontend("\t\tmax_request_body lots\n" + ok), "max_request_body: invalid size 'lots'", 3},
		{"bad size unit", frontend("\t\tmax_request_body 10QB\n" + ok), "max_request_body: invalid size '10QB'", 3},
		{"zero size", frontend("\t\tmax_request_body 0\n" + ok), "max_request_body: must be between 1 byte", 3},
		{"bad duration", frontend("\t\tdial_timeout soon\n" + ok), "dial_timeout: invalid duration 'soon'", 3},
		{"negative duration", frontend("\t\tfirst_byte_timeout -5s\n" + ok), "first_byte_timeout: must be positive, got -5s", 3},
		{"zero duration", frontend("\t\tstream_idle_timeout 0\n" + ok), "stream_idle_timeout: must be positive", 3},
		{"bad bool", frontend("\t\tallow_embeddings maybe\n" + ok), "allow_embeddings: want true or false, got 'maybe'", 3},
		{"bool with two values", frontend("\t\tallow_completions true false\n" + ok), "allow_completions: want at most one argument", 3},
		{"bad management bool", frontend("\t\tallow_model_management yes\n" + ok), "allow_model_management: want true or false, got 'yes'", 3},
		{"models without value", frontend("\t\tmodels\n" + ok), "models: want at least one argument", 3},
		{"labels without value", frontend("\t\tlabels\n" + ok), "labels: want at least one argument", 3},
		{"label_header without value", frontend("\t\tlabel_header\n" + ok), "label_header: want exactly one argument", 3},
		{"cors_origins without value", frontend("\t\tcors_origins\n" + ok), "cors_origins: want at least one argument", 3},
		{"cors_origins with a path", frontend("\t\tcors_origins https://a.example/\n" + ok), `cors_origins: origin "https://a.example/": an origin has no path`, 3},
		{"cors_origins without scheme", frontend("\t\tcors_origins default app.example.com\n" + ok), `cors_origins: origin "app.example.com": no scheme`, 3},
		{"cors_origins two stars", frontend("\t\tcors_origins http://*.a.*\n" + ok), "at most one *", 3},
		{"cors_origins off with origins", frontend("\t\tcors_origins off http://localhost:3000\n" + ok), "off turns CORS off and cannot be combined", 3},
		{"cors_origins off on a second line", frontend("\t\tcors_origins http://localhost:3000\n\t\tcors_origins off\n" + ok), "off turns CORS off and cannot be combined", 4},

		// The backend line.
		{"backend without url", frontend("\t\tbackend a"), "backend 'a': wrong argument count", 3},
		{"backend without name", frontend("\t\tbackend"), "wrong argument count", 3},
		{"backend extra argument", frontend("\t\tbackend a localhost extra"), "wrong argument count", 3},
		{"backend bad scheme", frontend("\t\tbackend a ftp://host"), "url: scheme must be http or https", 3},
		{"backend credentials", frontend("\t\tbackend a http://user:pw@host"), "credentials in the URL are not allowed", 3},
		{"backend bad port", frontend("\t\tbackend a host:99999"), "invalid port", 3},
		{"duplicate backend", frontend("\t\tbackend a 127.0.0.1 {\n\t\t\tweight 2\n\t\t}\n\t\tbackend a 127.0.0.2"), "duplicate backend name 'a'", 6},

		// Backend values.
		{"unknown backend option", frontend("\t\tbackend a localhost {\n\t\t\tbar 1\n\t\t}"), "unrecognized backend option 'bar'", 4},
		{"block after a backend option", frontend("\t\tbackend a localhost {\n\t\t\tweight 2 {\n\t\t\t}\n\t\t}"), "unexpected '{'", 4},
		{"duplicate backend option", frontend("\t\tbackend a localhost {\n\t\t\tweight 1\n\t\t\tweight 2\n\t\t}"), "duplicate backend option 'weight'", 5},
		{"negative max_parallel", frontend("\t\tbackend a localhost {\n\t\t\tmax_parallel -1\n\t\t}"), "max_parallel: must not be negative, got -1", 4},
		{"zero weight", frontend("\t\tbackend a localhost {\n\t\t\tweight 0\n\t\t}"), "weight: must be at least 1, got 0", 4},
		{"fractional weight", frontend("\t\tbackend a localhost {\n\t\t\tweight 1.5\n\t\t}"), "weight: want an integer, got '1.5'", 4},
		{"backend bad bool", frontend("\t\tbackend a localhost {\n\t\t\tdisabled yes\n\t\t}"), "disabled: want true or false, got 'yes'", 4},
		{"bearer_token without value", frontend("\t\tbackend a localhost {\n\t\t\tbearer_token\n\t\t}"), "bearer_token: want exactly one argument, got 0", 4},
		{"header without value", frontend("\t\tbackend a localhost {\n\t\t\theader X-Api-Key\n\t\t}"), "header: want 2 arguments (a field name and a value), got 1", 4},
		{"bad query", frontend("\t\tbackend a localhost {\n\t\t\tquery token=%zz\n\t\t}"), "query: invalid query 'token=%zz'", 4},
		{"relative health_uri", frontend("\t\tbackend a localhost {\n\t\t\thealth_uri health\n\t\t}"), "health_uri: must start with /", 4},
		{"bad health_method", frontend("\t\tbackend a localhost {\n\t\t\thealth_method POST\n\t\t}"), "health_method: want GET or HEAD, got 'POST'", 4},
		{"health_status word", frontend("\t\tbackend a localhost {\n\t\t\thealth_status ok\n\t\t}"), "health_status: want a status code (100-599) or a class (1xx-5xx), got 'ok'", 4},
		{"health_status class 6", frontend("\t\tbackend a localhost {\n\t\t\thealth_status 6xx\n\t\t}"), "health_status: want a status code", 4},
		{"health_status 600", frontend("\t\tbackend a localhost {\n\t\t\thealth_status 600\n\t\t}"), "health_status: want a status code", 4},
		{"health_status bare digit", frontend("\t\tbackend a localhost {\n\t\t\thealth_status 2\n\t\t}"), "health_status: want a status code", 4},
		{"health_status 2x", frontend("\t\tbackend a localhost {\n\t\t\thealth_status 2x\n\t\t}"), "health_status: want a status code", 4},
		{"bad health_interval", frontend("\t\tbackend a localhost {\n\t\t\thealth_interval often\n\t\t}"), "health_interval: invalid duration 'often'", 4},
		{"zero health_timeout", frontend("\t\tbackend a localhost {\n\t\t\thealth_timeout 0s\n\t\t}"), "health_timeout: must be positive", 4},
		{"zero health_passes", frontend("\t\tbackend a localhost {\n\t\t\thealth_passes 0\n\t\t}"), "health_passes: must be at least 1, got 0", 4},
		{"negative health_fails", frontend("\t\tbackend a localhost {\n\t\t\thealth_fails -2\n\t\t}"), "health_fails: must be at least 1, got -2", 4},
		{"non-integer fail_threshold", frontend("\t\tbackend a localhost {\n\t\t\tfail_threshold three\n\t\t}"), "fail_threshold: want an integer, got 'three'", 4},
		{"fail_status 5x", frontend("\t\tbackend a localhost {\n\t\t\tfail_status 502 5x\n\t\t}"), "fail_status: want status codes (100-599) or classes (1xx-5xx), got '5x'", 4},
		{"fail_status without codes", frontend("\t\tbackend a localhost {\n\t\t\tfail_status\n\t\t}"), "wrong argument count", 4},
		{"bad response_timeout", frontend("\t\tresponse_timeout soon\n" + ok), "response_timeout: invalid duration 'soon'", 3},
		{"zero client_write_timeout", frontend("\t\tclient_write_timeout 0s\n" + ok), "client_write_timeout: must be positive", 3},
		{"backend error names the backend", frontend("\t\tbackend gpu1 localhost {\n\t\t\tweight 0\n\t\t}"), "backend 'gpu1': weight", 4},
	}

	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := adapter.Adapt([]byte(tc.input), nil)
			if err == nil {
				t.Fatalf("want an error containing %q, got none for:\n%s", tc.want, tc.input)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
			if loc := fmt.Sprintf(", at Caddyfile:%d", tc.line); !strings.HasSuffix(msg, loc) {
				t.Errorf("error %q does not end with %q", msg, loc)
			}
		})
	}
}

// TestCaddyfileBackendStandalone parses a backend block on its own, as
// another module or a test would, and checks the fields directly.
func TestCaddyfileBackendStandalone(t *testing.T) {
	d := caddyfile.NewTestDispenser(`backend gpu1 10.0.0.5 {
		header X-Api-Key abc
		header x-api-key def
		health_status 5xx
		health_method head
	}`)
	var b Backend
	if err := b.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if b.Name != "gpu1" || b.URL != "10.0.0.5" {
		t.Errorf("name, url = %q, %q; want gpu1, 10.0.0.5", b.Name, b.URL)
	}
	if got := b.Headers.Values("X-Api-Key"); len(got) != 2 || got[0] != "abc" || got[1] != "def" {
		t.Errorf("X-Api-Key values = %q, want [abc def]", got)
	}
	if b.HealthStatus != 5 {
		t.Errorf("health_status 5xx = %d, want 5", b.HealthStatus)
	}
	if b.HealthMethod != "HEAD" {
		t.Errorf("health_method head = %q, want HEAD", b.HealthMethod)
	}
}

// TestCaddyfileRetriesZero checks that an explicit retries 0 survives as a
// set pointer, so Provision does not replace it with the default.
func TestCaddyfileRetriesZero(t *testing.T) {
	d := caddyfile.NewTestDispenser("ollamaflow {\n\tretries 0\n\tbackend a localhost\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if h.Retries == nil || *h.Retries != 0 {
		t.Fatalf("Retries = %v, want a pointer to 0", h.Retries)
	}
	if len(h.Backends) != 1 || h.Backends[0].Name != "a" {
		t.Fatalf("Backends = %+v, want one backend named a", h.Backends)
	}
}

// TestCaddyfilePinErrors covers pin_completions and pin_embeddings, which
// take one JSON object or a block of PATH VALUE lines.
func TestCaddyfilePinErrors(t *testing.T) {
	const ok = "\t\tbackend ok localhost"
	pinBlock := func(lines ...string) string {
		return "\t\tpin_completions {\n\t\t\t" + strings.Join(lines, "\n\t\t\t") + "\n\t\t}\n" + ok
	}
	tests := []struct {
		name  string
		input string
		want  string
		line  int
	}{
		{"no value", frontend("\t\tpin_completions\n" + ok), "pin_completions: want one JSON object argument or a block of PATH VALUE lines", 3},
		{"empty block", frontend("\t\tpin_embeddings {\n\t\t}\n" + ok), "pin_embeddings: want one JSON object argument or a block", 4},
		{"two arguments", frontend("\t\tpin_completions model x\n" + ok), "pin_completions: want one JSON object argument or a block of PATH VALUE lines, got 2 arguments", 3},
		{"array", frontend("\t\tpin_completions `[1]`\n" + ok), "pin_completions: must be a JSON object, got an array", 3},
		{"string", frontend("\t\tpin_embeddings llama3.2\n" + ok), "pin_embeddings: invalid JSON", 3},
		{"invalid JSON", frontend("\t\tpin_completions `{\"model\":}`\n" + ok), "pin_completions: invalid JSON", 3},
		{"JSON case collision", frontend("\t\tpin_completions `{\"model\":\"a\",\"MODEL\":\"b\"}`\n" + ok), `pin_completions: keys "model" and "MODEL" are the same key to Ollama`, 3},
		{"argument and block", frontend("\t\tpin_completions `{}` {\n\t\t\tmodel x\n\t\t}\n" + ok), "pin_completions: give one JSON object argument or a block, not both", 4},
		{"duplicate option", frontend("\t\tpin_completions `{\"a\":1}`\n\t\tpin_completions `{\"b\":1}`\n" + ok), "duplicate ollamaflow option 'pin_completions'", 4},
		{"line without value", frontend(pinBlock("options.temperature 0.7", "model")), "pin_completions: want PATH VALUE, got 0 values after 'model'", 5},
		{"line with two values", frontend(pinBlock("system Be brief.")), "got 2 values after 'system' (quote a value that has spaces)", 4},
		{"nested block", frontend(pinBlock("options {", "\ttemperature 0.7", "}")), "want PATH VALUE, got 0 values after 'options'", 4},
		{"wildcard", frontend(pinBlock("options.* 1")), "path 'options.*': '*' is a wildcard or modifier in sjson paths", 4},
		{"modifier", frontend(pinBlock("@this 1")), "'@' is a wildcard or modifier", 4},
		{"array index", frontend(pinBlock("options.stop.0 x")), "path 'options.stop.0': '0' would index an array; pin the whole array as a JSON value, or write :0", 4},
		{"append index", frontend(pinBlock("stop.-1 x")), "'-1' would index an array", 4},
		{"empty key", frontend(pinBlock("options..x 1")), "path 'options..x': empty key", 4},
		{"trailing dot", frontend(pinBlock("options. 1")), "empty key", 4},
		{"lone backslash", frontend(pinBlock("`options\\` 1")), "ends with a lone backslash", 4},
		{"same path twice", frontend(pinBlock("model a", "model b")), "path 'model' overlaps the earlier 'model'", 5},
		{"path under a value", frontend(pinBlock("options `{\"a\":1}`", "options.temperature 0.7")), "path 'options.temperature' overlaps the earlier 'options'", 5},
		{"path above a value", frontend(pinBlock("options.temperature 0.7", "options 1")), "path 'options' overlaps the earlier 'options.temperature'", 5},
		{"case collision", frontend(pinBlock("options.temperature 0.7", "Options.num_ctx 1")), `pin_completions: keys "options" and "Options" are the same key to Ollama`, 5},
		{"nested case collision", frontend(pinBlock("options.num_ctx 1", "options.NUM_CTX 2")), `pin_completions.options: keys "num_ctx" and "NUM_CTX"`, 5},
		{"backend pin", frontend("\t\tbackend a localhost {\n\t\t\tpin_embeddings `\"x\"`\n\t\t}"), "backend 'a': pin_embeddings: must be a JSON object, got a string", 4},
		{"backend pin line", frontend("\t\tbackend a localhost {\n\t\t\tpin_completions {\n\t\t\t\toptions.num_ctx\n\t\t\t}\n\t\t}"), "backend 'a': pin_completions: want PATH VALUE, got 0 values after 'options.num_ctx'", 5},
		{"backend duplicate pin", frontend("\t\tbackend a localhost {\n\t\t\tpin_embeddings `{}`\n\t\t\tpin_embeddings `{}`\n\t\t}"), "duplicate backend option 'pin_embeddings'", 5},
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := adapter.Adapt([]byte(tc.input), nil)
			if err == nil {
				t.Fatalf("want an error containing %q, got none for:\n%s", tc.want, tc.input)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
			if loc := fmt.Sprintf(", at Caddyfile:%d", tc.line); !strings.HasSuffix(msg, loc) {
				t.Errorf("error %q does not end with %q", msg, loc)
			}
		})
	}
}

// TestCaddyfilePins checks the JSON that pin lines build: nested objects
// from paths, JSON values as JSON, anything else as a string.
func TestCaddyfilePins(t *testing.T) {
	d := caddyfile.NewTestDispenser("ollamaflow {\n" +
		"\tpin_completions {\n" +
		"\t\toptions.temperature 0.7\n" +
		"\t\toptions.num_ctx 8192\n" +
		"\t\tmodel llama3.2:1b\n" +
		"\t\tsystem \"Be brief.\"\n" +
		"\t\tformat `\"json\"`\n" +
		"\t\tkeep_alive null\n" +
		"\t\tstream false\n" +
		"\t\toptions.stop `[\"\\n\",\"User:\"]`\n" +
		"\t\tversion 1.0e1\n" +
		"\t\tname `12`\n" +
		"\t\tlabel 12abc\n" +
		"\t\ta\\.b.:0 x\n" +
		"\t\tschema `{\"type\": \"object\"}`\n" +
		"\t}\n" +
		"\tpin_embeddings `{\"options\": {\"num_ctx\": 2048}}`\n" +
		"\tbackend a localhost {\n" +
		"\t\tpin_embeddings {\n" +
		"\t\t\ttruncate true\n" +
		"\t\t}\n" +
		"\t}\n" +
		"}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	const wantCompl = `{"options":{"temperature":0.7,"num_ctx":8192,"stop":["\n","User:"]},"model":"llama3.2:1b","system":"Be brief.","format":"json","keep_alive":null,"stream":false,"version":1.0e1,"name":12,"label":"12abc","a.b":{"0":"x"},"schema":{"type": "object"}}`
	if string(h.PinCompletions) != wantCompl {
		t.Errorf("pin_completions =\n%s\nwant\n%s", h.PinCompletions, wantCompl)
	}
	if want := `{"options": {"num_ctx": 2048}}`; string(h.PinEmbeddings) != want {
		t.Errorf("pin_embeddings = %s, want %s", h.PinEmbeddings, want)
	}
	if want := `{"truncate":true}`; len(h.Backends) != 1 || string(h.Backends[0].PinEmbeddings) != want {
		t.Errorf("backend pin_embeddings = %s, want %s", h.Backends[0].PinEmbeddings, want)
	}
	if _, err := parsePins(h.PinCompletions, "pin_completions"); err != nil {
		t.Errorf("the built object does not provision: %v", err)
	}
}

// TestPinPathMatchesSjson checks that the keys parsePinPath reports are
// where sjson puts the value, so the overlap check sees what sjson does.
func TestPinPathMatchesSjson(t *testing.T) {
	for _, path := range []string{"model", "options.temperature", `a\.b`, `a\.b.c`, "a.:0", ":12.x", `a\*b`, `a\\b`, `\:x`, "a-b.c_d", "x.:-1", `a\|b.\@c`} {
		keys, err := parsePinPath(path)
		if err != nil {
			t.Errorf("parsePinPath(%q): %v", path, err)
			continue
		}
		obj, err := sjson.SetRaw("{}", path, "1")
		if err != nil {
			t.Errorf("sjson.SetRaw(%q): %v", path, err)
			continue
		}
		var v any
		if err := json.Unmarshal([]byte(obj), &v); err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			m, ok := v.(map[string]any)
			if !ok || len(m) != 1 {
				t.Errorf("path %q: sjson built %s, want one key %q at each level of %q", path, obj, k, keys)
				break
			}
			v = m[k]
		}
		if v != float64(1) {
			t.Errorf("path %q: sjson built %s, keys %q", path, obj, keys)
		}
	}
}

func TestCaddyfileMemoryAndQueueShare(t *testing.T) {
	d := caddyfile.NewTestDispenser("ollamaflow {\n\tmax_body_memory 512MiB\n\tmax_queue_per_client 8\n\tbackend a localhost\n}")
	var h Handler
	require.NoError(t, h.UnmarshalCaddyfile(d))
	assert.EqualValues(t, int64(512<<20), h.MaxBodyMemory)
	assert.Equal(t, 8, h.MaxQueuePerClient)

	for _, tc := range []struct{ in, want string }{
		{"\t\tmax_body_memory lots\n", "max_body_memory: invalid size 'lots'"},
		{"\t\tmax_queue_per_client 0\n", "max_queue_per_client"},
		{"\t\tmax_queue_per_client\n", "max_queue_per_client"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n" + tc.in + "\tbackend a localhost\n}"))
		if assert.Error(t, err, tc.in) {
			assert.Contains(t, err.Error(), tc.want)
		}
	}
}

func TestProvisionMemoryAndQueueShareDefaults(t *testing.T) {
	provision := func(js string) (*Handler, error) {
		var h Handler
		require.NoError(t, json.Unmarshal([]byte(js), &h))
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		err := h.Provision(ctx)
		if err == nil {
			t.Cleanup(func() { _ = h.Cleanup() })
		}
		return &h, err
	}
	h, err := provision(`{"max_queue":10,"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]}`)
	require.NoError(t, err)
	assert.EqualValues(t, 256<<20, h.maxBodyMemory)
	assert.Equal(t, 2, h.maxQueuePerClient, "a quarter of max_queue")
	h, err = provision(`{"max_queue":2,"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]}`)
	require.NoError(t, err)
	assert.Equal(t, 1, h.maxQueuePerClient, "never zero")
	_, err = provision(`{"max_request_body":2048,"max_body_memory":1024,"backends":[{"name":"a","url":"127.0.0.1:9"}]}`)
	assert.ErrorContains(t, err, "max_body_memory")
	_, err = provision(`{"max_queue_per_client":-1,"backends":[{"name":"a","url":"127.0.0.1:9"}]}`)
	assert.ErrorContains(t, err, "max_queue_per_client")
}

// TestReadmeExamples: every file in examples/ is shown in the README exactly
// as it is in the repository, adapts without a warning (Caddy warns about an
// unformatted Caddyfile, inline comments included), serves on a port of this
// machine rather than a domain (no automatic HTTPS in a quick start), and
// passes Caddy's validation, which provisions the handler.
func TestReadmeExamples(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	for _, part := range strings.Split(string(readme), "```caddyfile\n")[1:] {
		end := strings.Index(part, "```\n")
		if end < 0 {
			t.Fatal("README: a caddyfile block is not closed")
		}
		blocks = append(blocks, part[:end])
	}
	files, err := filepath.Glob("examples/*Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 2 {
		t.Fatalf("want examples/Caddyfile and examples/two-servers.Caddyfile, found %v", files)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			body, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(blocks, string(body)) {
				t.Errorf("README.md has no caddyfile block identical to %s", file)
			}
			if !strings.Contains(string(readme), "]("+file+")") {
				t.Errorf("README.md does not link %s", file)
			}

			adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": file})
			if err != nil {
				t.Fatalf("caddy adapt %s: %v", file, err)
			}
			if len(warnings) > 0 {
				t.Errorf("caddy adapt %s warns: %v", file, warnings)
			}
			servers := gjson.GetBytes(adapted, "apps.http.servers")
			if len(servers.Map()) == 0 {
				t.Fatalf("%s: no servers in %s", file, adapted)
			}
			for name, srv := range servers.Map() {
				for _, l := range srv.Get("listen").Array() {
					if !strings.HasPrefix(l.String(), ":") && !strings.HasPrefix(l.String(), "127.0.0.1:") {
						t.Errorf("%s: server %s listens on %s; want a port, or a loopback port", file, name, l)
					}
				}
				// A site may name hosts only where it is plain http (Caddy
				// then skips them in automatic HTTPS): loopback names that
				// keep a DNS-rebound page out of a local dashboard.
				skip := map[string]bool{}
				for _, h := range srv.Get("automatic_https.skip").Array() {
					skip[h.String()] = true
				}
				for _, h := range srv.Get("routes.#.match.#.host|@flatten|@flatten").Array() {
					if !skip[h.String()] || (h.String() != "localhost" && h.String() != "127.0.0.1") {
						t.Errorf("%s: server %s matches host %s; a domain turns on automatic HTTPS", file, name, h)
					}
				}
			}

			var cfg caddy.Config
			if err := json.Unmarshal(adapted, &cfg); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&cfg); err != nil {
				t.Errorf("caddy validate %s: %v", file, err)
			}
		})
	}
}

func TestCaddyfileStatus(t *testing.T) {
	site := func(body string) string { return ":8080 {\n" + body + "\n}\n" }
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tc := range []struct {
		input, want string
	}{
		{site("\tollamaflow_status"), `{"handler":"ollamaflow_status"}`},
		{site("\tollamaflow_status {\n\t\tread_only\n\t}"), `{"handler":"ollamaflow_status","read_only":true}`},
		{site("\tollamaflow_status {\n\t\tread_only false\n\t}"), `{"handler":"ollamaflow_status"}`},
	} {
		out, _, err := adapter.Adapt([]byte(tc.input), nil)
		require.NoError(t, err, tc.input)
		assert.JSONEq(t, tc.want, gjson.GetBytes(out, "apps.http.servers.srv0.routes.0.handle.0").Raw, tc.input)
	}
	for _, tc := range []struct {
		name, input, want string
		line              int
	}{
		{"argument", site("\tollamaflow_status /ops/* extra"), "wrong argument count", 2},
		{"unknown option", site("\tollamaflow_status {\n\t\tactions off\n\t}"), `unknown ollamaflow_status option "actions"`, 3},
		{"twice", site("\tollamaflow_status {\n\t\tread_only\n\t\tread_only\n\t}"), "read_only given twice", 4},
		{"bad flag", site("\tollamaflow_status {\n\t\tread_only maybe\n\t}"), "read_only: want true or false, got 'maybe'", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := adapter.Adapt([]byte(tc.input), nil)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.True(t, strings.HasSuffix(err.Error(), fmt.Sprintf(", at Caddyfile:%d", tc.line)), err.Error())
		})
	}
}
