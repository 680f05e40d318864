package ollamaflow

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The shapes of Ollama's request types (api and openai packages of
// github.com/ollama/ollama v0.17.4) for the fields the proxy decides on.
type (
	// api.GenerateRequest, ChatRequest, EmbedRequest, CreateRequest.
	nativeModelRequest struct {
		Model  string `json:"model"`
		Stream *bool  `json:"stream,omitempty"`
	}
	// api.ShowRequest, PullRequest, PushRequest, DeleteRequest: the model is
	// cmp.Or(Model, Name).
	nativeNameRequest struct {
		Model  string `json:"model"`
		Name   string `json:"name"`
		Stream *bool  `json:"stream,omitempty"`
	}
	// openai.ChatCompletionRequest, CompletionRequest, EmbedRequest.
	openAIModelRequest struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
)

// decided is what Ollama's decoder makes of a body: the model (before
// normalisation), whether it streams, and whether it accepts the body.
func decided(body []byte, from modelFrom, api apiFormat) (model string, stream bool, err error) {
	switch {
	case api == apiOpenAI:
		var req openAIModelRequest
		err = json.Unmarshal(body, &req)
		return req.Model, req.Stream, err
	case from == modelInBodyName:
		var req nativeNameRequest
		err = json.Unmarshal(body, &req)
		model = req.Model
		if model == "" {
			model = req.Name
		}
		return model, req.Stream == nil || *req.Stream, err
	default:
		var req nativeModelRequest
		err = json.Unmarshal(body, &req)
		return req.Model, req.Stream == nil || *req.Stream, err
	}
}

// topLevelKeys lists the keys of a JSON object in order, duplicates
// included, with encoding/json's own tokenizer.
func topLevelKeys(t testing.TB, body []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("not an object: %q", body)
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatalf("reading a key: %v\n%q", err, body)
		}
		keys = append(keys, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			t.Fatalf("reading a value: %v\n%q", err, body)
		}
	}
	return keys
}

func countFold(keys []string, names ...string) int {
	n := 0
	for _, k := range keys {
		for _, name := range names {
			if strings.EqualFold(k, name) {
				n++
			}
		}
	}
	return n
}

func TestReadFieldsLikeOllama(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		from       modelFrom
		api        apiFormat
		model      string
		stream     bool
		canonical  string // the forwarded body, when it must change
	}{
		{name: "plain", body: `{"model":"llama3","stream":false}`, from: modelInBody, model: "llama3:latest"},
		{name: "case variant wins last", body: `{"model":"llama3","MODEL":"forbidden"}`, from: modelInBody, model: "forbidden:latest", stream: true, canonical: `{"model":"forbidden"}`},
		{name: "escaped key", body: `{"model":"llama3","mod\u0065l":"forbidden"}`, from: modelInBody, model: "forbidden:latest", stream: true, canonical: `{"model":"forbidden"}`},
		{name: "escaped value", body: `{"model":"ll\u0061ma3"}`, from: modelInBody, model: "llama3:latest", stream: true},
		{name: "long s in stream", body: `{"model":"m","stream":true,"ſtream":false}`, from: modelInBody, model: "m:latest", stream: false, canonical: `{"model":"m","stream":false}`},
		{name: "kelvin sign", body: `{"model":"m","\u212aeep_alive":1}`, from: modelInBody, model: "m:latest", stream: true},
		{name: "null keeps the string", body: `{"model":"llama3","MODEL":null}`, from: modelInBody, model: "llama3:latest", stream: true, canonical: `{"model":"llama3"}`},
		{name: "null resets a native stream", body: `{"model":"m","stream":false,"Stream":null}`, from: modelInBody, model: "m:latest", stream: true, canonical: `{"model":"m"}`},
		{name: "null keeps an OpenAI stream", body: `{"model":"m","stream":true,"Stream":null}`, from: modelInBody, api: apiOpenAI, model: "m:latest", stream: true, canonical: `{"model":"m","stream":true}`},
		{name: "OpenAI default is not streaming", body: `{"model":"m"}`, from: modelInBody, api: apiOpenAI, model: "m:latest"},
		{name: "name when model empty", body: `{"model":"","name":"tiny"}`, from: modelInBodyName, model: "tiny:latest", stream: true, canonical: `{"model":"tiny"}`},
		{name: "model before name", body: `{"name":"b","model":"a"}`, from: modelInBodyName, model: "a:latest", stream: true, canonical: `{"model":"a"}`},
		{name: "older name alone", body: `{"NAME":"tiny"}`, from: modelInBodyName, model: "tiny:latest", stream: true},
		{name: "name ignored on chat", body: `{"model":"a","name":"b"}`, from: modelInBody, model: "a:latest", stream: true},
		{name: "invalid UTF-8 as encoding/json", body: "{\"model\":\"a\xffb\"}", from: modelInBody, model: "a\uFFFDb:latest", stream: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			model, out, err := requestModel(tc.from, tc.api, "/api/x", []byte(tc.body), false)
			require.NoError(t, err)
			assert.Equal(t, tc.model, model)
			if tc.canonical != "" {
				assert.JSONEq(t, tc.canonical, string(out))
			} else {
				assert.Equal(t, tc.body, string(out), "a body with one spelling of each field goes as it came")
			}
			f, err := readFields(out, tc.from, tc.api, false)
			require.NoError(t, err)
			assert.Equal(t, tc.stream, f.streams(tc.api))
			// And Ollama's decoder agrees on both bodies.
			for _, b := range [][]byte{[]byte(tc.body), out} {
				m, s, err := decided(b, tc.from, tc.api)
				require.NoError(t, err)
				assert.Equal(t, tc.model, normalizeModel(m))
				assert.Equal(t, tc.stream, s)
			}
		})
	}
}

func TestReadFieldsRefuses(t *testing.T) {
	for _, bad := range []string{
		``, `[]`, `"x"`, `{"model":`, `{"messages":[]}`, `{"model":""}`, `{"model":"  "}`,
		`{"model":42}`, `{"model":"a","MODEL":42}`, `{"model":"a"} trailing`, `{"name":"a"}`,
		`{"model":"a","stream":"yes"}`, `{"model":"a","STREAM":1}`, `{"model":null}`,
		`{"model":"a","x":[1,}`, "{\"model\":\"a\x01\"}",
	} {
		_, _, err := requestModel(modelInBody, apiOllama, "/api/chat", []byte(bad), false)
		assert.Error(t, err, bad)
		if err == nil {
			continue
		}
		// Ollama refuses each of them too, or finds no model in it.
		if m, _, derr := decided([]byte(bad), modelInBody, apiOllama); derr == nil {
			assert.Empty(t, strings.TrimSpace(m), "refused a body Ollama accepts: %s", bad)
		}
	}
}

// TestReadFieldsAllocations: the common body costs nothing to read, an
// escaped model name one string.
func TestReadFieldsAllocations(t *testing.T) {
	plain := []byte(`{"model":"llama3.2:1b","stream":true,"messages":[{"role":"user","content":"hi"}],"options":{"temperature":1}}`)
	assert.Zero(t, testing.AllocsPerRun(100, func() { _, _ = readFields(plain, modelInBody, apiOllama, false) }))
	keys := []byte(`{"mod\u0065l":"llama3.2:1b","\u017ftream":true}`)
	assert.Zero(t, testing.AllocsPerRun(100, func() { _, _ = readFields(keys, modelInBody, apiOllama, false) }))
}

// FuzzReadFields: for any body, on a route of each shape, the model and
// stream the proxy decides on are what encoding/json decodes from the body
// it forwards into structs shaped like Ollama's request types, the
// forwarded body means what the client's meant, and it spells each decided
// field at most once. A body the proxy refuses is one Ollama refuses too,
// or one that names no model.
//
//	go test -run '^$' -fuzz '^FuzzReadFields$' -fuzztime 200000x .
func FuzzReadFields(f *testing.F) {
	for _, body := range hostileBodies {
		f.Add([]byte(body), uint8(0))
	}
	for _, s := range []string{
		`{"model":"llama3","MODEL":"forbidden"}`, `{"model":"a","model":null}`, `{"ſtream":false,"model":"m"}`,
		`{"model":"","NAME":"x","name":"y"}`, `{"model":"\ud800x","stream":null}`, "{\"model\":\"a\xffb\",\"Model\":\"c\xe2\x82\"}",
		`{"x":[[[{"y":"]"}]]],"model":"m"}`, `{"model":"m","stream":true,"STREAM":null}`,
	} {
		for shape := range uint8(3) {
			f.Add([]byte(s), shape)
		}
	}
	f.Fuzz(func(t *testing.T, body []byte, shape uint8) {
		from, api := modelInBody, apiOllama
		switch shape % 3 {
		case 1:
			from = modelInBodyName
		case 2:
			api = apiOpenAI
		}
		model, out, err := requestModel(from, api, "/api/x", body, false)
		want, wantStream, derr := decided(body, from, api)
		if err != nil {
			if derr == nil && strings.TrimSpace(want) != "" {
				t.Fatalf("refused (%v) a body Ollama reads as model %q:\n%q", err, want, body)
			}
			return
		}
		if derr != nil {
			t.Fatalf("accepted a body encoding/json refuses (%v):\n%q", derr, body)
		}
		got, gotStream, err := decided(out, from, api)
		if err != nil {
			t.Fatalf("the forwarded body does not decode: %v\nbody %q\nout  %q", err, body, out)
		}
		if normalizeModel(got) != model || got != want || gotStream != wantStream {
			t.Fatalf("decided model %q; Ollama reads %q (stream %v) from the forwarded body, %q (stream %v) from the client's\nbody %q\nout  %q",
				model, got, gotStream, want, wantStream, body, out)
		}
		fields, err := readFields(out, from, api, false)
		if err != nil || fields.streams(api) != gotStream {
			t.Fatalf("stream: readFields %v (%v), Ollama %v\nout %q", fields.streams(api), err, gotStream, out)
		}
		keys := topLevelKeys(t, out)
		models := countFold(keys, "model")
		if from == modelInBodyName {
			models += countFold(keys, "name")
		}
		if models > 1 || countFold(keys, "stream") > 1 {
			t.Fatalf("the forwarded body spells a decided field twice: %q", out)
		}
	})
}

// TestDecodeStringMatchesEncodingJSON: values decode as encoding/json
// decodes them, bad surrogates and bytes included.
func TestDecodeStringMatchesEncodingJSON(t *testing.T) {
	for _, raw := range []string{`"plain"`, `"a\u0062c"`, `"\ud800"`, `"\ud83d\ude00"`, "\"a\xffb\xe2\x82\"", `"\\\"\/"`} {
		var want string
		require.NoError(t, json.Unmarshal([]byte(raw), &want), raw)
		assert.Equal(t, want, decodeString(raw), raw)
	}
}

// BenchmarkBodyPath1MiB is what a request body costs before routing: the
// frontend's pins, then the one reading of the decided fields, for 1 MiB
// bodies, with and without pins.
//
//	go test -run '^$' -bench '^BenchmarkBodyPath1MiB$' -benchmem .
func BenchmarkBodyPath1MiB(b *testing.B) {
	trees, _, err := compilePins([]byte(`{"options":{"temperature":0.7,"num_ctx":8192}}`), "pin_completions", kindCompletion)
	if err != nil {
		b.Fatal(err)
	}
	for _, pc := range []struct {
		name string
		p    *pins
	}{{"pinned", trees[vocabNative]}, {"unpinned", nil}} {
		for _, bc := range []struct {
			name string
			body []byte
		}{
			{"chat", chatBody1MiB()},
			{"generate", generateBody1MiB()},
			{"escaped-keys", escapedKeysBody1MiB()},
		} {
			b.Run(pc.name+"/"+bc.name, func(b *testing.B) {
				b.SetBytes(int64(len(bc.body)))
				b.ReportAllocs()
				for b.Loop() {
					out, err := pc.p.apply(bc.body)
					if err != nil {
						b.Fatal(err)
					}
					if _, _, err := requestModel(modelInBody, apiOllama, "/api/chat", out, !pc.p.empty()); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
