package ollamaflow

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The /v1 request types of Ollama's openai package (openai/openai.go,
// v0.17.4), the fields its FromChatRequest, FromCompleteRequest and
// EmbeddingsMiddleware read.
type (
	oaResponseFormat struct {
		Type       string `json:"type"`
		JsonSchema *struct {
			Schema json.RawMessage `json:"schema"`
		} `json:"json_schema,omitempty"`
	}
	oaChatRequest struct {
		Model            string            `json:"model"`
		Stream           bool              `json:"stream"`
		MaxTokens        *int              `json:"max_tokens"`
		Seed             *int              `json:"seed"`
		Stop             any               `json:"stop"`
		Temperature      *float64          `json:"temperature"`
		FrequencyPenalty *float64          `json:"frequency_penalty"`
		PresencePenalty  *float64          `json:"presence_penalty"`
		TopP             *float64          `json:"top_p"`
		ResponseFormat   *oaResponseFormat `json:"response_format"`
		Reasoning        *struct {
			Effort string `json:"effort,omitempty"`
		} `json:"reasoning,omitempty"`
		ReasoningEffort *string `json:"reasoning_effort,omitempty"`
	}
	oaCompletionRequest struct {
		Model            string   `json:"model"`
		FrequencyPenalty float32  `json:"frequency_penalty"`
		MaxTokens        *int     `json:"max_tokens"`
		PresencePenalty  float32  `json:"presence_penalty"`
		Seed             *int     `json:"seed"`
		Stop             any      `json:"stop"`
		Stream           bool     `json:"stream"`
		Temperature      *float32 `json:"temperature"`
		TopP             float32  `json:"top_p"`
	}
	oaEmbedRequest struct {
		Input          any    `json:"input"`
		Model          string `json:"model"`
		Dimensions     int    `json:"dimensions,omitempty"`
		EncodingFormat string `json:"encoding_format,omitempty"`
	}
)

// effective is what Ollama runs for a /v1 completion: the native fields its
// OpenAI layer builds (FromChatRequest / FromCompleteRequest), reduced to
// JSON values so that they compare with the native pins.
type effective struct {
	Model   string
	Stream  bool
	Options map[string]any
	Format  string // compact JSON, "" for none
	Effort  string
}

func jsonValue(t testing.TB, v any) any {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	var out any
	require.NoError(t, json.Unmarshal(b, &out))
	return out
}

func stopOption(stop any) (any, bool) {
	switch s := stop.(type) {
	case string:
		return []any{s}, true
	case []any:
		var out []any
		for _, x := range s {
			if str, ok := x.(string); ok {
				out = append(out, str)
			}
		}
		return out, true
	}
	return nil, false
}

func effectiveChat(t testing.TB, r oaChatRequest) effective {
	e := effective{Model: r.Model, Stream: r.Stream, Options: map[string]any{"temperature": 1.0, "top_p": 1.0}}
	if stop, ok := stopOption(r.Stop); ok {
		e.Options["stop"] = stop
	}
	set := func(name string, v any, ok bool) {
		if ok {
			e.Options[name] = jsonValue(t, v)
		}
	}
	set("num_predict", r.MaxTokens, r.MaxTokens != nil)
	set("temperature", r.Temperature, r.Temperature != nil)
	set("seed", r.Seed, r.Seed != nil)
	set("frequency_penalty", r.FrequencyPenalty, r.FrequencyPenalty != nil)
	set("presence_penalty", r.PresencePenalty, r.PresencePenalty != nil)
	set("top_p", r.TopP, r.TopP != nil)
	if rf := r.ResponseFormat; rf != nil {
		switch strings.ToLower(strings.TrimSpace(rf.Type)) {
		case "json_object":
			e.Format = `"json"`
		case "json_schema":
			if rf.JsonSchema != nil {
				e.Format = string(rf.JsonSchema.Schema)
			}
		}
	}
	if r.Reasoning != nil {
		e.Effort = r.Reasoning.Effort
	} else if r.ReasoningEffort != nil {
		e.Effort = *r.ReasoningEffort
	}
	return e
}

func TestCompileCompletionPins(t *testing.T) {
	trees, warns, err := compilePins([]byte(`{
		"model":"m","stream":false,"keep_alive":"5m","think":false,"format":"json",
		"options":{"temperature":0.1,"top_p":0.5,"seed":7,"stop":["x"],"frequency_penalty":0.2,"presence_penalty":0.3,"num_predict":64,"num_ctx":8192}}`),
		"pin_completions", kindCompletion)
	require.NoError(t, err)
	tree := func(v vocab) string {
		out, err := trees[v].apply([]byte(`{}`))
		require.NoError(t, err)
		return string(out)
	}
	assert.JSONEq(t, `{"model":"m","stream":false,"keep_alive":"5m","think":false,"format":"json",
		"options":{"temperature":0.1,"top_p":0.5,"seed":7,"stop":["x"],"frequency_penalty":0.2,"presence_penalty":0.3,"num_predict":64,"num_ctx":8192}}`, tree(vocabNative))
	assert.JSONEq(t, `{"model":"m","stream":false,"temperature":0.1,"top_p":0.5,"seed":7,"stop":["x"],"frequency_penalty":0.2,"presence_penalty":0.3,"max_tokens":64,
		"response_format":{"type":"json_object"},"reasoning":{"effort":"none"}}`, tree(vocabChat))
	assert.JSONEq(t, `{"model":"m","stream":false,"temperature":0.1,"top_p":0.5,"seed":7,"stop":["x"],"frequency_penalty":0.2,"presence_penalty":0.3,"max_tokens":64}`, tree(vocabCompletion))
	assert.Nil(t, trees[vocabEmbeddings])
	joined := strings.Join(warns, "\n")
	for _, want := range []string{
		"keep_alive has no equivalent on /v1/chat/completions and /v1/completions",
		"options.num_ctx has no equivalent on /v1/chat/completions and /v1/completions",
		"think has no equivalent on /v1/completions",
		"format has no equivalent on /v1/completions",
	} {
		assert.Contains(t, joined, want)
	}
	assert.Len(t, warns, 4, joined)
	assert.NotContains(t, joined, "temperature")
}

func TestCompilePinsInOpenAIVocabulary(t *testing.T) {
	trees, warns, err := compilePins([]byte(`{"temperature":0.2,"MAX_TOKENS":10,"options":{"num_ctx":4096},"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}}`),
		"pin_completions", kindCompletion)
	require.NoError(t, err)
	native, err := trees[vocabNative].apply([]byte(`{}`))
	require.NoError(t, err)
	assert.JSONEq(t, `{"format":{"type":"object"},"options":{"num_ctx":4096,"temperature":0.2,"num_predict":10}}`, string(native))
	chat, err := trees[vocabChat].apply([]byte(`{}`))
	require.NoError(t, err)
	assert.JSONEq(t, `{"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}},"temperature":0.2,"max_tokens":10}`, string(chat))
	assert.Len(t, warns, 2, "options.num_ctx on both, format on /v1/completions: %v", warns)

	trees, _, err = compilePins([]byte(`{"response_format":{"type":"json_object"}}`), "pin_completions", kindCompletion)
	require.NoError(t, err)
	native, _ = trees[vocabNative].apply([]byte(`{}`))
	assert.JSONEq(t, `{"format":"json"}`, string(native))
}

func TestCompilePinsRefuses(t *testing.T) {
	for raw, want := range map[string]string{
		`{"temperature":0.1,"options":{"temperature":0.2}}`: "temperature and options.temperature are the same setting",
		`{"max_tokens":5,"options":{"NUM_PREDICT":6}}`:      "max_tokens and options.NUM_PREDICT",
		`{"seed":1.5}`:                                           "seed must be an integer",
		`{"options":{"num_predict":"x"}}`:                        "options.num_predict must be an integer",
		`{"options":{"stop":5}}`:                                 "options.stop must be a string or an array of strings",
		`{"options":{"stop":["a",1]}}`:                           "options.stop must be a string or an array of strings",
		`{"top_p":"high"}`:                                       "top_p must be a number",
		`{"temperature":{"x":1}}`:                                "temperature must be a number, not an object",
		`{"response_format":{"type":"text"}}`:                    "response_format must be",
		`{"response_format":{"type":"json_object"},"format":""}`: "format is pinned twice",
		`{"options":null,"temperature":1}`:                       "options is pinned to null",
	} {
		_, _, err := compilePins([]byte(raw), "pin_completions", kindCompletion)
		if assert.Error(t, err, raw) {
			assert.Contains(t, err.Error(), want, raw)
			assert.True(t, strings.HasPrefix(err.Error(), "pin_completions: "), err.Error())
		}
	}
}

func TestCompileEmbeddingPins(t *testing.T) {
	trees, warns, err := compilePins([]byte(`{"model":"e","dimensions":256,"truncate":true,"options":{"num_ctx":512},"encoding_format":"float"}`), "pin_embeddings", kindEmbedding)
	require.NoError(t, err)
	native, _ := trees[vocabNative].apply([]byte(`{}`))
	assert.JSONEq(t, `{"model":"e","dimensions":256,"truncate":true,"options":{"num_ctx":512}}`, string(native))
	v1, _ := trees[vocabEmbeddings].apply([]byte(`{}`))
	assert.JSONEq(t, `{"model":"e","dimensions":256,"encoding_format":"float"}`, string(v1))
	assert.Nil(t, trees[vocabChat])
	joined := strings.Join(warns, "\n")
	assert.Contains(t, joined, "truncate has no equivalent on /v1/embeddings")
	assert.Contains(t, joined, "options.num_ctx has no equivalent on /v1/embeddings")
	assert.Contains(t, joined, "encoding_format applies on /v1/embeddings only")
	assert.Len(t, warns, 3, joined)
}

func TestVocabOf(t *testing.T) {
	for path, want := range map[string]vocab{
		"/api/chat": vocabNative, "/api/generate": vocabNative, "/api/embed": vocabNative, "/api/embeddings": vocabNative,
		"/v1/chat/completions": vocabChat, "/v1/completions": vocabCompletion, "/v1/embeddings": vocabEmbeddings,
	} {
		assert.Equal(t, want, vocabOf(path), path)
	}
}

// openAIPins pins every field the /v1 completion APIs read, in the native
// vocabulary.
const openAIPins = `{"model":"pinned","stream":false,"think":"low","format":{"type":"object","properties":{"a":{"type":"string"}}},
	"options":{"temperature":0.25,"top_p":0.5,"seed":7,"stop":["END"],"frequency_penalty":0.125,"presence_penalty":0.375,"num_predict":64,"num_ctx":8192}}`

// hostileOpenAIBodies try to make Ollama's OpenAI layer read something
// other than the pins.
var hostileOpenAIBodies = []string{
	`{"model":"evil","messages":[{"role":"user","content":"hi"}],"temperature":2}`,
	`{"Temperature":2,"TEMPERATURE":1.5,"temp\u0065rature":1.9}`,
	`{"max_tokens":100000,"MAX_TOKENS":99,"max_tokens":null}`,
	`{"top_p":0,"Top_P":0.9,"seed":null,"SEED":1}`,
	`{"stop":"x","STOP":["y"],"stop":null}`,
	`{"frequency_penalty":2,"presence_penalty":-2,"Frequency_Penalty":1}`,
	`{"response_format":{"type":"text"},"RESPONSE_FORMAT":{"type":"json_object"}}`,
	`{"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"array"},"SCHEMA":{"x":1}}}}`,
	`{"response_format":null}`,
	`{"reasoning_effort":"high","reasoning":{"effort":"high","EFFORT":"none"}}`,
	`{"reasoning":null,"REASONING_EFFORT":"high"}`,
	`{"stream":true,"ſtream":true,"Stream":null}`,
	`{"options":{"temperature":2},"temperature":2}`,
	"{\"\u212aeep\":1,\"model\":\"x\",\"MOD\\u0045L\":\"y\"}",
}

// TestPinsHoldOnTheOpenAIAPI: whatever the client sends, what Ollama's
// OpenAI layer makes of the pinned body is the pins.
func TestPinsHoldOnTheOpenAIAPI(t *testing.T) {
	trees, _, err := compilePins([]byte(openAIPins), "pin_completions", kindCompletion)
	require.NoError(t, err)
	for i, body := range append(append([]string{}, hostileOpenAIBodies...), hostileBodies...) {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			checkOpenAIPins(t, trees, []byte(body))
		})
	}
}

// checkOpenAIPins applies the /v1 trees to body and checks, through the
// mirror of Ollama's OpenAI layer, that every pin holds.
func checkOpenAIPins(t testing.TB, trees pinTrees, body []byte) {
	t.Helper()
	var wantOpts map[string]any
	var pinned struct {
		Format  json.RawMessage
		Options map[string]any
	}
	require.NoError(t, json.Unmarshal([]byte(openAIPins), &pinned))
	wantOpts = pinned.Options
	delete(wantOpts, "num_ctx") // no /v1 equivalent: warned about at provision
	var format any
	require.NoError(t, json.Unmarshal(pinned.Format, &format))

	out, err := trees[vocabChat].apply(body)
	if err != nil {
		return // refused bodies never reach Ollama
	}
	var chat oaChatRequest
	decodeLikeOllama(t, out, &chat)
	e := effectiveChat(t, chat)
	var gotFormat any
	if e.Format != "" {
		require.NoError(t, json.Unmarshal([]byte(e.Format), &gotFormat))
	}
	if e.Model != "pinned" || e.Stream || e.Effort != "low" || !reflect.DeepEqual(gotFormat, format) {
		t.Fatalf("chat: model %q stream %v effort %q format %s; want the pins\nbody %q\nout  %s", e.Model, e.Stream, e.Effort, e.Format, body, out)
	}
	for k, v := range wantOpts {
		if got := e.Options[k]; !reflect.DeepEqual(got, jsonValue(t, v)) {
			t.Fatalf("chat: options.%s = %v, want %v\nbody %q\nout  %s", k, got, v, body, out)
		}
	}

	out, err = trees[vocabCompletion].apply(body)
	if err != nil {
		return
	}
	var compl oaCompletionRequest
	decodeLikeOllama(t, out, &compl)
	stop, _ := stopOption(compl.Stop)
	got := map[string]any{"stop": stop, "frequency_penalty": jsonValue(t, compl.FrequencyPenalty), "presence_penalty": jsonValue(t, compl.PresencePenalty),
		"top_p": jsonValue(t, compl.TopP)}
	if compl.MaxTokens != nil {
		got["num_predict"] = jsonValue(t, *compl.MaxTokens)
	}
	if compl.Seed != nil {
		got["seed"] = jsonValue(t, *compl.Seed)
	}
	if compl.Temperature != nil {
		got["temperature"] = jsonValue(t, *compl.Temperature)
	}
	if compl.Model != "pinned" || compl.Stream || !reflect.DeepEqual(got, jsonValue(t, wantOpts)) {
		t.Fatalf("completion: model %q stream %v options %v; want %v\nbody %q\nout  %s", compl.Model, compl.Stream, got, wantOpts, body, out)
	}
}

// FuzzPinOpenAI: for any body, the /v1 chat and completion trees of a pin
// set that covers every field Ollama's OpenAI layer reads leave Ollama
// reading exactly the pins.
//
//	go test -run '^$' -fuzz '^FuzzPinOpenAI$' -fuzztime 200000x .
func FuzzPinOpenAI(f *testing.F) {
	for _, body := range append(append([]string{}, hostileOpenAIBodies...), hostileBodies...) {
		f.Add([]byte(body))
	}
	trees, _, err := compilePins([]byte(openAIPins), "pin_completions", kindCompletion)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		checkOpenAIPins(t, trees, body)
	})
}

// TestEmbeddingPinsHoldOnTheOpenAIAPI: /v1/embeddings reads the pinned
// model, dimensions and encoding_format whatever the client sends.
func TestEmbeddingPinsHoldOnTheOpenAIAPI(t *testing.T) {
	trees, _, err := compilePins([]byte(`{"model":"embed","dimensions":128,"encoding_format":"float"}`), "pin_embeddings", kindEmbedding)
	require.NoError(t, err)
	for _, body := range []string{
		`{"model":"evil","input":"x","dimensions":4096,"encoding_format":"base64"}`,
		`{"MODEL":"evil","Dimensions":1,"ENCODING_FORMAT":"base64","dimensions":null}`,
		`{"mod\u0065l":"evil","d\u0069mensions":2}`,
	} {
		out, err := trees[vocabEmbeddings].apply([]byte(body))
		require.NoError(t, err)
		var req oaEmbedRequest
		decodeLikeOllama(t, out, &req)
		assert.Equal(t, oaEmbedRequest{Input: req.Input, Model: "embed", Dimensions: 128, EncodingFormat: "float"}, req, string(out))
	}
}
