package ollamaflow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func mustPins(t testing.TB, raw string) *pins {
	t.Helper()
	p, err := parsePins(json.RawMessage(raw), "pin_completions")
	if err != nil {
		t.Fatalf("parsePins(%s): %v", raw, err)
	}
	return p
}

func TestParsePins(t *testing.T) {
	tests := []struct {
		name  string
		raw   string
		empty bool   // want the nil set
		want  string // substring of the error, if any
	}{
		{"unset", ``, true, ""},
		{"null", `null`, true, ""},
		{"empty object", ` {} `, true, ""},
		{"object", `{"model":"llama3.2:1b","options":{"temperature":0.7}}`, false, ""},
		{"empty nested object", `{"options":{}}`, false, ""},
		{"array", `[{"model":"x"}]`, false, "pin_completions: must be a JSON object, got an array"},
		{"string", `"model"`, false, "pin_completions: must be a JSON object, got a string"},
		{"number", `1`, false, "pin_completions: must be a JSON object, got a number"},
		{"boolean", `true`, false, "pin_completions: must be a JSON object, got a boolean"},
		{"invalid JSON", `{"model":}`, false, "pin_completions: invalid JSON"},
		{"trailing garbage", `{"model":"x"} {}`, false, "pin_completions: invalid JSON"},
		{"case collision", `{"model":"a","Model":"b"}`, false, `pin_completions: keys "model" and "Model" are the same key to Ollama`},
		{"escape collision", `{"model":"a","mod\u0065l":"b"}`, false, `keys "model" and "mod\u0065l"`},
		{"duplicate key", `{"model":"a","model":"b"}`, false, `keys "model" and "model"`},
		{"nested collision", `{"options":{"num_ctx":1,"NUM_CTX":2}}`, false, `pin_completions.options: keys "num_ctx" and "NUM_CTX"`},
		{"kelvin collision", `{"keep_alive":1,"\u212aeep_alive":2}`, false, "are the same key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parsePins(json.RawMessage(tc.raw), "pin_completions")
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error = %v, want one containing %q", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (p == nil) != tc.empty {
				t.Fatalf("parsePins(%s) = %+v, want empty=%v", tc.raw, p, tc.empty)
			}
		})
	}
}

func TestPinsApply(t *testing.T) {
	const opts = `{"options":{"temperature":0.7}}`
	tests := []struct {
		name, pins, body, want string
	}{
		// Scalars and arrays replace; absent keys are added; pinned keys go last.
		{"replace", `{"model":"m"}`, `{"model":"evil","prompt":"hi"}`, `{"prompt":"hi","model":"m"}`},
		{"add", `{"model":"m"}`, `{"prompt":"hi"}`, `{"prompt":"hi","model":"m"}`},
		{"empty body", `{"model":"m"}`, `{}`, `{"model":"m"}`},
		{"whitespace", `{"model":"m"}`, " \r\n\t{ \"prompt\" : [ 1 , 2 ] , \"model\" : \"x\" }\n", `{"prompt":[ 1 , 2 ],"model":"m"}`},
		{"array replaces", `{"stop":["a"]}`, `{"stop":["x","y"]}`, `{"stop":["a"]}`},
		{"pinned null", `{"keep_alive":null}`, `{"keep_alive":"1h"}`, `{"keep_alive":null}`},
		{"compact pin values", `{"stop": [ "a" , "b" ] }`, `{}`, `{"stop":["a","b"]}`},
		{"string values untouched", `{"model":"m"}`, `{"prompt":"\"model\":\"evil\"}"}`, `{"prompt":"\"model\":\"evil\"}","model":"m"}`},

		// Every key Ollama would take for a pinned one goes.
		{"case variants", `{"model":"m"}`, `{"Model":"a","MODEL":"b","mOdEl":"c"}`, `{"model":"m"}`},
		{"duplicate", `{"model":"m"}`, `{"model":"a","x":1,"model":"b"}`, `{"x":1,"model":"m"}`},
		{"unicode escape", `{"model":"m"}`, `{"mod\u0065l":"a","\u004dODEL":"b"}`, `{"model":"m"}`},
		{"long s folds to s", `{"stream":false}`, `{"ſtream":true,"\u017ftream":true}`, `{"stream":false}`},
		{"kelvin sign folds to k", `{"keep_alive":"5m"}`, `{"\u212aeep_alive":0,"Keep_Alive":0}`, `{"keep_alive":"5m"}`},
		{"other keys stay", `{"model":"m"}`, `{"model2":1,"mode":2,"model ":3,"mod\/el":4}`, `{"model2":1,"mode":2,"model ":3,"mod\/el":4,"model":"m"}`},
		{"unpinned duplicates stay", `{"model":"m"}`, `{"a":1,"a":2}`, `{"a":1,"a":2,"model":"m"}`},

		// Objects merge recursively.
		{"merge keeps client keys", opts, `{"options":{"num_ctx":4096,"temperature":2}}`, `{"options":{"num_ctx":4096,"temperature":0.7}}`},
		{"merge adds object", opts, `{"model":"x"}`, `{"model":"x","options":{"temperature":0.7}}`},
		{"merge case variants of the object", opts, `{"options":{"a":1},"OPTIONS":{"temperature":2,"b":2}}`, `{"options":{"a":1,"b":2,"temperature":0.7}}`},
		{"merge variants inside", opts, `{"Options":{"Temperature":2,"temp\u0065rature":3,"top_k":5}}`, `{"options":{"top_k":5,"temperature":0.7}}`},
		{"null resets the run", opts, `{"options":{"a":1},"options":null,"options":{"b":2}}`, `{"options":{"b":2,"temperature":0.7}}`},
		{"client null", opts, `{"options":null}`, `{"options":{"temperature":0.7}}`},
		{"client array", opts, `{"options":[1,{"temperature":2}]}`, `{"options":{"temperature":0.7}}`},
		{"client string", opts, `{"options":"temperature"}`, `{"options":{"temperature":0.7}}`},
		{"object then scalar", opts, `{"options":{"a":1},"OPTIONS":5}`, `{"options":{"temperature":0.7}}`},
		{"empty pinned object keeps client", `{"options":{}}`, `{"options":{"a":1}}`, `{"options":{"a":1}}`},
		{"empty pinned object replaces scalar", `{"options":{}}`, `{"options":3}`, `{"options":{}}`},
		{"deep merge", `{"a":{"b":{"c":1}}}`, `{"a":{"x":0,"b":{"c":2,"d":3},"B":{"C":4}}}`, `{"a":{"x":0,"b":{"d":3,"c":1}}}`},
		{"object pin replaces pinned scalar path", `{"format":{"type":"object"}}`, `{"format":"json"}`, `{"format":{"type":"object"}}`},
		{"nested value whitespace kept", opts, `{"options": { "stop" : [ "a" ] } }`, `{"options":{"stop":[ "a" ],"temperature":0.7}}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := mustPins(t, tc.pins).apply([]byte(tc.body))
			if err != nil {
				t.Fatalf("apply(%s): %v", tc.body, err)
			}
			if string(got) != tc.want {
				t.Errorf("apply(%s)\n got %s\nwant %s", tc.body, got, tc.want)
			}
			if !json.Valid(got) {
				t.Errorf("output is not valid JSON: %s", got)
			}
		})
	}
}

func TestPinsApplyRefuses(t *testing.T) {
	p := mustPins(t, `{"model":"m"}`)
	deep := func(n int) string {
		return `{"a":` + strings.Repeat("[", n-1) + strings.Repeat("]", n-1) + `}`
	}
	tests := []struct {
		name, body string
		want       error
	}{
		{"empty", ``, errBodyNotObject},
		{"spaces", " \n", errBodyNotObject},
		{"array", `[{"model":"x"}]`, errBodyNotObject},
		{"string", `"{}"`, errBodyNotObject},
		{"null", `null`, errBodyNotObject},
		{"number", `12`, errBodyNotObject},
		{"unterminated", `{"model":"x"`, errBodyNotObject},
		{"unterminated string", `{"model":"x`, errBodyNotObject},
		{"trailing garbage", `{"model":"x"}x`, errBodyNotObject},
		{"two objects", `{} {}`, errBodyNotObject},
		{"bad literal", `{"stream":tru}`, errBodyNotObject},
		{"bad number", `{"n":01}`, errBodyNotObject},
		{"missing colon", `{"model" "x"}`, errBodyNotObject},
		{"trailing comma", `{"model":"x",}`, errBodyNotObject},
		{"single quotes", `{'model':'x'}`, errBodyNotObject},
		{"control character", "{\"model\":\"a\x01\"}", errBodyNotObject},
		{"bad escape", `{"model":"\x"}`, errBodyNotObject},
		{"bom", "\ufeff{}", errBodyNotObject},
		{"mismatched brackets", `{"a":[}`, errBodyNotObject},
		{"too deep", deep(maxJSONDepth + 1), errBodyTooDeep},
		{"too deep in a string-free run", `{"a":{"b":` + strings.Repeat(`{"c":`, maxJSONDepth) + `1` + strings.Repeat(`}`, maxJSONDepth+2), errBodyTooDeep},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := p.apply([]byte(tc.body))
			if !errors.Is(err, tc.want) {
				t.Fatalf("apply(%.40q) = %.40q, %v; want error %v", tc.body, out, err, tc.want)
			}
			if json.Valid([]byte(tc.body)) && tc.want == errBodyNotObject && strings.HasPrefix(strings.TrimSpace(tc.body), "{") {
				t.Errorf("apply refused %q, which encoding/json accepts", tc.body)
			}
		})
	}

	// The deepest body encoding/json accepts is accepted.
	body := deep(maxJSONDepth)
	if !json.Valid([]byte(body)) {
		t.Fatal("test body should be within encoding/json's limit")
	}
	if _, err := p.apply([]byte(body)); err != nil {
		t.Fatalf("apply at depth %d: %v", maxJSONDepth, err)
	}
	if json.Valid([]byte(deep(maxJSONDepth + 1))) {
		t.Fatal("encoding/json's depth limit changed; update maxJSONDepth")
	}
}

// TestPinsEmptyIsFree checks that an empty set hands the body back as is:
// same slice, nothing allocated, nothing checked.
func TestPinsEmptyIsFree(t *testing.T) {
	var p *pins
	for _, body := range []string{`{"model":"x"}`, `not json`, ``} {
		in := []byte(body)
		out, err := p.apply(in)
		if err != nil || len(out) != len(in) || (len(in) > 0 && &out[0] != &in[0]) {
			t.Errorf("nil pins: apply(%q) = %q, %v; want the same slice", body, out, err)
		}
	}
	in := []byte(`{"model":"x"}`)
	if n := testing.AllocsPerRun(100, func() { _, _ = p.apply(in) }); n != 0 {
		t.Errorf("nil pins: %v allocations per apply, want 0", n)
	}
}

// TestProvisionPins checks that provisioning parses the pin options of the
// frontend and its backends, names the option in errors, and hands each
// request kind its set.
func TestProvisionPins(t *testing.T) {
	const backend = `"backends":[{"name":"a","url":"127.0.0.1:1"}]`
	for raw, want := range map[string]string{
		`{"pin_completions":[1],` + backend + `}`:                                                 "pin_completions: must be a JSON object, got an array",
		`{"pin_embeddings":"x",` + backend + `}`:                                                  "pin_embeddings: must be a JSON object, got a string",
		`{"pin_completions":{"a":{"B":1,"b":2}},` + backend + `}`:                                 `pin_completions.a: keys "B" and "b" are the same key to Ollama`,
		`{"backends":[{"name":"a","url":"127.0.0.1:1","pin_embeddings":true}]}`:                   `backend "a": pin_embeddings: must be a JSON object, got a boolean`,
		`{"backends":[{"name":"a","url":"127.0.0.1:1","pin_completions":{"model":1,"MODEL":2}}]}`: `backend "a": pin_completions: keys "model" and "MODEL"`,
	} {
		_, err := provisionJSON(t, raw)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("provisioning %s: error %v, want one containing %q", raw, err, want)
		}
	}

	h, err := provisionJSON(t, `{"pin_completions":{"model":"m"},"pin_embeddings":{"truncate":true},"backends":[{"name":"a","url":"127.0.0.1:1","pin_completions":{"options":{"num_ctx":8192}}}]}`)
	if err != nil {
		t.Fatal(err)
	}
	b := h.backends[0].cfg
	if h.pinsFor(kindCompletion, vocabNative) == nil || h.pinsFor(kindEmbedding, vocabNative) == nil || h.pinsFor(kindModelRead, vocabNative) != nil || h.pinsFor(kindManagement, vocabNative) != nil {
		t.Errorf("frontend pinsFor: completion %v, embedding %v, model read %v, management %v; want the first two only",
			h.pinsFor(kindCompletion, vocabNative), h.pinsFor(kindEmbedding, vocabNative), h.pinsFor(kindModelRead, vocabNative), h.pinsFor(kindManagement, vocabNative))
	}
	if b.pinsFor(kindCompletion, vocabNative) == nil || b.pinsFor(kindEmbedding, vocabNative) != nil {
		t.Errorf("backend pinsFor: completion %v, embedding %v; want completion only", b.pinsFor(kindCompletion, vocabNative), b.pinsFor(kindEmbedding, vocabNative))
	}
	body, err := h.pinsFor(kindCompletion, vocabNative).apply([]byte(`{"MODEL":"x","options":{"seed":1}}`))
	if err == nil {
		body, err = b.pinsFor(kindCompletion, vocabNative).apply(body)
	}
	if want := `{"model":"m","options":{"seed":1,"num_ctx":8192}}`; err != nil || string(body) != want {
		t.Errorf("frontend then backend pins: %s, %v; want %s", body, err, want)
	}
}

// The request shapes of Ollama's api package (api/types.go), decoded the
// way Ollama decodes them: encoding/json into structs, so keys match fields
// case-insensitively and the last duplicate wins.
type ollamaMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type ollamaChatRequest struct {
	Model     string          `json:"model"`
	Messages  []ollamaMessage `json:"messages"`
	Stream    *bool           `json:"stream,omitempty"`
	Format    json.RawMessage `json:"format,omitempty"`
	KeepAlive json.RawMessage `json:"keep_alive,omitempty"`
	Options   map[string]any  `json:"options"`
}

type ollamaGenerateRequest struct {
	Model     string          `json:"model"`
	Prompt    string          `json:"prompt"`
	System    string          `json:"system"`
	Template  string          `json:"template"`
	Context   []int           `json:"context,omitempty"`
	Stream    *bool           `json:"stream,omitempty"`
	Raw       bool            `json:"raw,omitempty"`
	Format    json.RawMessage `json:"format,omitempty"`
	KeepAlive json.RawMessage `json:"keep_alive,omitempty"`
	Options   map[string]any  `json:"options"`
}

type ollamaEmbedRequest struct {
	Model     string          `json:"model"`
	Input     any             `json:"input"`
	KeepAlive json.RawMessage `json:"keep_alive,omitempty"`
	Truncate  *bool           `json:"truncate,omitempty"`
	Options   map[string]any  `json:"options"`
}

// decodeLikeOllama decodes body as Ollama's handlers do. A type error in
// a field the client controls does not stop the other fields from being
// set, so only syntax errors fail.
func decodeLikeOllama(t testing.TB, body []byte, v any) {
	t.Helper()
	err := json.NewDecoder(bytes.NewReader(body)).Decode(v)
	var typeErr *json.UnmarshalTypeError
	if err != nil && !errors.As(err, &typeErr) {
		t.Fatalf("decoding the pinned body: %v\n%s", err, body)
	}
}

// checkOptions asserts that options hold exactly want for the pinned keys,
// with no other key that a case-insensitive reader could take for them.
func checkOptions(t testing.TB, options map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if got, ok := options[k]; !ok || !reflect.DeepEqual(got, v) {
			t.Errorf("options[%q] = %v, want %v (options %v)", k, got, v, options)
		}
		for other := range options {
			if other != k && strings.EqualFold(other, k) {
				t.Errorf("options keep %q beside pinned %q", other, k)
			}
		}
	}
}

// hostileBodies try to make Ollama see something other than the pins:
// every one must decode to the pinned values.
var hostileBodies = []string{
	`{"model":"evil","messages":[{"role":"user","content":"hi"}]}`,
	`{"Model":"evil"}`,
	`{"MODEL":"evil"}`,
	`{"mOdEl":"evil","model":"x","MODEL":"evil2"}`,
	`{"mod\u0065l":"evil"}`,
	`{"\u006d\u006f\u0064\u0065\u006c":"evil"}`,
	`{"\u004D\u004f\u0044\u0045\u004C":"evil"}`,
	`{"model":"a","model":"evil"}`,
	`{"model":"a","prompt":"p","input":"i","model":"b","Model":"c","model":"evil"}`,
	"{\"mod\xffel\":\"evil\",\"model\\ud800\":\"evil\"}",
	`{"model":{"evil":true}}`,
	`{"model":["evil"]}`,
	`{"model":null}`,
	`{"\u017ftream":true,"STREAM":true,"keep_alive":"24h","\u212aeep_alive":"-1","KEEP_ALIVE":-1}`,
	`{"stream":true,"stream":"yes"}`,
	`{"format":"json","FORMAT":{"type":"object"}}`,
	`{"truncate":false,"TRUNCATE":false}`,
	`{"options":{"temperature":2}}`,
	`{"options":{"temperature":2,"temperature":3}}`,
	`{"Options":{"Temperature":2,"temperature":3,"TEMPERATURE":4}}`,
	`{"options":{"temp\u0065rature":2,"num_ctx":1}}`,
	`{"options":{"a":1},"OPTIONS":{"temperature":2}}`,
	`{"options":{"temperature":2},"options":null}`,
	`{"options":null,"OPTIONS":{"num_ctx":1}}`,
	`{"options":null}`,
	`{"options":[{"temperature":2}]}`,
	`{"options":"temperature=2"}`,
	`{"options":{"temperature":1e999,"num_ctx":123456789012345678901234567890123456789}}`,
	`{"options":{"num_ctx":-0.0e-0,"seed":1E+2}}`,
	`{"options":{"temperature":{"nested":{"temperature":2}}}}`,
	`{"options":{"nested":` + strings.Repeat("[", 5000) + strings.Repeat("]", 5000) + `},"model":"evil"}`,
	`{"messages":` + strings.Repeat(`[{"a":`, 2000) + `1` + strings.Repeat(`}]`, 2000) + `,"Model":"evil"}`,
	`{ "model" : "evil" , "options" : { "temperature" : 2 } , "MODEL"	:	"evil" }`,
	`{"prompt":"\"model\":\"evil\"","model\"":"evil","options\\":{"temperature":2}}`,
	`{}`,
}

func TestPinsHostileBodies(t *testing.T) {
	completion := mustPins(t, `{"model":"pinned:1b","stream":false,"keep_alive":"5m","format":"json","options":{"temperature":0.7,"num_ctx":8192}}`)
	embedding := mustPins(t, `{"model":"embed:latest","truncate":true,"keep_alive":-1,"options":{"num_ctx":2048}}`)
	wantCompl := map[string]any{"temperature": 0.7, "num_ctx": float64(8192)}
	wantEmbed := map[string]any{"num_ctx": float64(2048)}

	for i, body := range hostileBodies {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			out, err := completion.apply([]byte(body))
			if err != nil {
				t.Fatalf("apply(%.80s): %v", body, err)
			}
			var chat ollamaChatRequest
			decodeLikeOllama(t, out, &chat)
			if chat.Model != "pinned:1b" || chat.Stream == nil || *chat.Stream || string(chat.KeepAlive) != `"5m"` || string(chat.Format) != `"json"` {
				t.Errorf("chat: model %q, stream %v, keep_alive %s, format %s; want the pins\n%.300s", chat.Model, chat.Stream, chat.KeepAlive, chat.Format, out)
			}
			checkOptions(t, chat.Options, wantCompl)

			var gen ollamaGenerateRequest
			decodeLikeOllama(t, out, &gen)
			if gen.Model != "pinned:1b" || gen.Stream == nil || *gen.Stream || string(gen.KeepAlive) != `"5m"` {
				t.Errorf("generate: model %q, stream %v, keep_alive %s; want the pins", gen.Model, gen.Stream, gen.KeepAlive)
			}
			checkOptions(t, gen.Options, wantCompl)

			out, err = embedding.apply([]byte(body))
			if err != nil {
				t.Fatalf("apply(%.80s): %v", body, err)
			}
			var embed ollamaEmbedRequest
			decodeLikeOllama(t, out, &embed)
			if embed.Model != "embed:latest" || embed.Truncate == nil || !*embed.Truncate || string(embed.KeepAlive) != `-1` {
				t.Errorf("embed: model %q, truncate %v, keep_alive %s; want the pins", embed.Model, embed.Truncate, embed.KeepAlive)
			}
			checkOptions(t, embed.Options, wantEmbed)
		})
	}
}

// TestPinsFrontendThenBackend applies the frontend's pins once and each
// backend's pins to that result, as the handler does per attempt: each
// backend sees the frontend's pins and its own, never another backend's.
func TestPinsFrontendThenBackend(t *testing.T) {
	frontend := mustPins(t, `{"model":"llama3.2:1b","options":{"temperature":0.7}}`)
	gpu1 := mustPins(t, `{"options":{"num_ctx":8192}}`)
	gpu2 := mustPins(t, `{"options":{"num_ctx":2048,"temperature":0.1}}`)

	body, err := frontend.apply([]byte(`{"MODEL":"evil","options":{"temperature":2,"num_ctx":99,"seed":1}}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		p    *pins
		want map[string]any
	}{
		{"gpu1", gpu1, map[string]any{"temperature": 0.7, "num_ctx": float64(8192), "seed": float64(1)}},
		{"gpu2", gpu2, map[string]any{"temperature": 0.1, "num_ctx": float64(2048), "seed": float64(1)}},
		{"no pins", nil, map[string]any{"temperature": 0.7, "num_ctx": float64(99), "seed": float64(1)}},
	} {
		out, err := tc.p.apply(body)
		if err != nil {
			t.Fatal(err)
		}
		var chat ollamaChatRequest
		decodeLikeOllama(t, out, &chat)
		if chat.Model != "llama3.2:1b" || !reflect.DeepEqual(chat.Options, tc.want) {
			t.Errorf("%s: model %q, options %v; want llama3.2:1b, %v", tc.name, chat.Model, chat.Options, tc.want)
		}
	}
}

// fuzzPins covers each kind of pin: a scalar, an array, null, and objects
// merged at two levels.
const fuzzPins = `{"model":"pinned","stop":["x"],"keep_alive":null,"options":{"temperature":0.5,"nested":{"k":1}}}`

// FuzzPin checks, for any body, that apply either refuses it (and then
// encoding/json refuses it too, or it is not an object) or returns valid
// JSON in which every pinned key appears once at its level, holds the
// pinned value as encoding/json reads it, and every other top-level key
// keeps its value.
//
//	go test -run '^$' -fuzz '^FuzzPin$' -fuzztime 2m .
func FuzzPin(f *testing.F) {
	for _, body := range hostileBodies {
		f.Add([]byte(body))
	}
	f.Add([]byte(`{"options":{"nested":{"k":2,"K":3,"j":4},"NESTED":5}}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(` {"a" : [1, "b", {"c": null}], "model": true } `))
	p, err := parsePins(json.RawMessage(fuzzPins), "pin_completions")
	if err != nil {
		f.Fatal(err)
	}
	var pinned map[string]any
	if err := json.Unmarshal([]byte(fuzzPins), &pinned); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, body []byte) {
		out, err := p.apply(body)
		isObject := json.Valid(body) && bytes.TrimLeft(body, " \t\r\n")[0] == '{'
		if err != nil {
			if isObject {
				t.Fatalf("apply refused a JSON object that encoding/json accepts: %v\n%q", err, body)
			}
			return
		}
		if !isObject {
			t.Fatalf("apply accepted a body that is not a JSON object:\n%q", body)
		}
		if !json.Valid(out) {
			t.Fatalf("output is not valid JSON:\nbody %q\nout  %q", body, out)
		}

		// Ollama's view: a struct, keys matched case-insensitively.
		var req struct {
			Model     string         `json:"model"`
			Stop      []string       `json:"stop"`
			KeepAlive any            `json:"keep_alive"`
			Options   map[string]any `json:"options"`
		}
		decodeLikeOllama(t, out, &req)
		if req.Model != "pinned" || !reflect.DeepEqual(req.Stop, []string{"x"}) || req.KeepAlive != nil || req.Options["temperature"] != 0.5 {
			t.Fatalf("decoded %+v; want the pins\nbody %q\nout  %q", req, body, out)
		}
		if nested, _ := req.Options["nested"].(map[string]any); nested["k"] != float64(1) {
			t.Fatalf("options.nested = %v, want k=1\nbody %q\nout  %q", req.Options["nested"], body, out)
		}

		// The generic view: each pinned key once per level, with its value.
		var got, orig map[string]any
		decodeLikeOllama(t, out, &got)
		checkPinned(t, got, pinned, out)

		// Nothing else changes at the top level.
		if err := json.Unmarshal(body, &orig); err != nil {
			return // a type error such as a number out of range: no map to compare
		}
		for k, v := range orig {
			if pinnedName(pinned, k) {
				continue
			}
			if !reflect.DeepEqual(got[k], v) {
				t.Fatalf("top-level %q = %v, want the client's %v\nbody %q\nout  %q", k, got[k], v, body, out)
			}
		}
	})
}

// FuzzUnquoteKey checks that matchPin reads keys as encoding/json does:
// appendUnquoted, with each invalid byte read as U+FFFD the way
// strings.EqualFold reads it, must give encoding/json's string.
func FuzzUnquoteKey(f *testing.F) {
	for _, s := range []string{`"model"`, `"mod\u0065l"`, `"\u004D\u004f"`, `"\ud800"`, `"\ud800x"`, `"\ud83d\ude00"`, `"\ud83d\u0041"`,
		`"\udc00\ud800"`, `"\ud800\ud800\udc00"`, `"a\"b\\c\/d\b\f\n\r\t"`, "\"\xff\xfe\xe2\x84\"", `"\u212a"`, `"\uD834\uDD1E"`, `"\u0000"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		var want string
		if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' || json.Unmarshal([]byte(raw), &want) != nil {
			return
		}
		if got := string([]rune(string(appendUnquoted(nil, raw)))); got != want {
			t.Fatalf("appendUnquoted(%q) = %q, encoding/json reads %q", raw, got, want)
		}
	})
}

// TestPinsEscapedKeysDoNotAllocate: a body full of escaped keys costs no
// more allocations than a plain one.
func TestPinsEscapedKeysDoNotAllocate(t *testing.T) {
	p := mustPins(t, `{"model":"m","options":{"temperature":0.7}}`)
	body := []byte(`{"mod\u0065l":"a","\u006d\u006f\u0064\u0065\u006c":"b","x\ud83d\ude00":1,"opti\u006fns":{"t\u0065mperature":2},"a":1}`)
	if n := testing.AllocsPerRun(100, func() { _, _ = p.apply(body) }); n != 1 {
		t.Errorf("%v allocations per apply, want 1 (the output)", n)
	}
	out, _ := p.apply(body)
	if want := `{"x\ud83d\ude00":1,"a":1,"model":"m","options":{"temperature":0.7}}`; string(out) != want {
		t.Errorf("apply = %s, want %s", out, want)
	}
}

// checkPinned asserts that obj holds each key of want exactly once, up to
// case, with want's value; pinned objects are checked recursively.
func checkPinned(t *testing.T, obj, want map[string]any, out []byte) {
	t.Helper()
	for k, v := range want {
		for other := range obj {
			if other != k && strings.EqualFold(other, k) {
				t.Fatalf("key %q is left beside pinned %q\nout %q", other, k, out)
			}
		}
		if sub, ok := v.(map[string]any); ok {
			gotSub, ok := obj[k].(map[string]any)
			if !ok {
				t.Fatalf("%q = %v, want an object\nout %q", k, obj[k], out)
			}
			checkPinned(t, gotSub, sub, out)
			continue
		}
		if got, ok := obj[k]; !ok || !reflect.DeepEqual(got, v) {
			t.Fatalf("%q = %v, want %v\nout %q", k, got, v, out)
		}
	}
}

func pinnedName(pinned map[string]any, key string) bool {
	for k := range pinned {
		if strings.EqualFold(k, key) {
			return true
		}
	}
	return false
}

// benchText is about 1 KiB of message text as JSON string content: prose
// with line breaks, a quoted word, a tab and a non-ASCII character.
var benchText = strings.Repeat(`The model reads this sentence, then the next one.\n`, 16) +
	`She said \"pin it\" and left.\tCaf\u00e9 ok.\n`

// chatBody1MiB is a chat request of about 1 MiB: many messages, then the
// options a client would send.
func chatBody1MiB() []byte {
	var b bytes.Buffer
	b.WriteString(`{"model":"llama3.2:1b","stream":true,"messages":[`)
	for i := 0; b.Len() < 1<<20; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		role := "user"
		if i%2 == 1 {
			role = "assistant"
		}
		fmt.Fprintf(&b, `{"role":%q,"content":"%d: %s"}`, role, i, benchText)
	}
	b.WriteString(`],"options":{"temperature":1.2,"top_k":40,"num_ctx":2048},"keep_alive":"10m"}`)
	return b.Bytes()
}

// generateBody1MiB is a generate request whose 1 MiB prompt is one
// top-level string.
func generateBody1MiB() []byte {
	var b bytes.Buffer
	b.WriteString(`{"model":"llama3.2:1b","prompt":"`)
	for b.Len() < 1<<20 {
		b.WriteString(benchText)
	}
	b.WriteString(`","options":{"temperature":1.2,"num_ctx":2048}}`)
	return b.Bytes()
}

// escapedKeysBody1MiB is a hostile body: about 1 MiB of short members
// whose keys are escaped, so every key must be unescaped to be compared.
func escapedKeysBody1MiB() []byte {
	var b bytes.Buffer
	b.WriteString(`{"model":"llama3.2:1b"`)
	for i := 0; b.Len() < 1<<20; i++ {
		fmt.Fprintf(&b, `,"m\u006fdel%d":%d`, i, i)
	}
	b.WriteString(`,"MOD\u0045L":"evil"}`)
	return b.Bytes()
}

// BenchmarkPin1MiB pins a model and two options into 1 MiB bodies.
//
//	go test -run '^$' -bench '^BenchmarkPin1MiB$' -benchmem .
func BenchmarkPin1MiB(b *testing.B) {
	p := mustPins(b, `{"model":"llama3.2:1b","options":{"temperature":0.7,"num_ctx":8192}}`)
	for _, bc := range []struct {
		name string
		body []byte
	}{
		{"chat", chatBody1MiB()},
		{"generate", generateBody1MiB()},
		{"escaped-keys", escapedKeysBody1MiB()},
	} {
		b.Run(bc.name, func(b *testing.B) {
			if !json.Valid(bc.body) {
				b.Fatal("benchmark body is not valid JSON")
			}
			b.SetBytes(int64(len(bc.body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.apply(bc.body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
