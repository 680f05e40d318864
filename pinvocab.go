package ollamaflow

// Pins per API vocabulary (SPEC §6).
//
// Pins are written in Ollama's native vocabulary (options.temperature,
// options.num_predict, format, …) and must mean the same on both APIs. But
// Ollama's OpenAI layer (openai/openai.go and middleware/openai.go of the
// Ollama module, v0.17.4) decodes /v1 bodies into its own request types and
// builds the native request from a few top-level fields, ignoring options,
// keep_alive and everything else. So each pin option is compiled at
// provision into one tree per API: the native tree for /api/*, and for
// /v1/chat/completions, /v1/completions and /v1/embeddings a tree that sets
// the fields Ollama reads there. The merge (pinning.go) then applies the
// tree of the request's API with the same bypass resistance everywhere.
//
// The mapping, from Ollama's FromChatRequest and FromCompleteRequest:
//
//	options.temperature, top_p, seed, stop,     the same names at the top level
//	frequency_penalty, presence_penalty
//	options.num_predict                         max_tokens
//	format "json"                               response_format {"type":"json_object"} (chat only)
//	format {schema}                             response_format {"type":"json_schema","json_schema":{"schema":…}} (chat only)
//	think false, "low", "medium", "high"        reasoning {"effort":"none"|…} (chat only)
//	model, stream                               the same
//
// and for embeddings (EmbeddingsMiddleware): model and dimensions. A pin
// written in the OpenAI vocabulary (a top-level temperature, max_tokens,
// response_format) is accepted and applies on the native API through the
// same mapping read backwards. A pin that a /v1 endpoint has no field for
// (options.num_ctx, keep_alive, …) is reported once at provision.

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// vocab is the request vocabulary of an endpoint: which fields Ollama reads
// from a body there.
type vocab int

const (
	vocabNative     vocab = iota // Ollama's own API, /api/*
	vocabChat                    // /v1/chat/completions
	vocabCompletion              // /v1/completions
	vocabEmbeddings              // /v1/embeddings
	numVocabs
)

// vocabOf is the vocabulary of requests to path.
func vocabOf(path string) vocab {
	switch path {
	case "/v1/chat/completions":
		return vocabChat
	case "/v1/completions":
		return vocabCompletion
	case "/v1/embeddings":
		return vocabEmbeddings
	}
	return vocabNative
}

func (v vocab) String() string {
	switch v {
	case vocabChat:
		return "/v1/chat/completions"
	case vocabCompletion:
		return "/v1/completions"
	case vocabEmbeddings:
		return "/v1/embeddings"
	}
	return "the Ollama API"
}

// pinTrees is one pin option compiled for each vocabulary; nil entries pin
// nothing.
type pinTrees [numVocabs]*pins

// sampling are the options Ollama's OpenAI layer reads under the same name
// at the top level of a /v1 completion body, with the JSON type it decodes
// them into.
var sampling = []struct{ name, kind string }{
	{"temperature", "number"},
	{"top_p", "number"},
	{"seed", "integer"},
	{"stop", "stop"},
	{"frequency_penalty", "number"},
	{"presence_penalty", "number"},
}

// compilePins parses a pin option for requests of kind and compiles it for
// each API. The warnings name each pin an API has no field for, and what
// requests there get instead.
func compilePins(raw []byte, option string, kind routeKind) (pinTrees, []string, error) {
	var trees pinTrees
	p, err := parsePins(raw, option)
	if err != nil || p == nil {
		return trees, nil, err
	}
	var warns []string
	if kind == kindEmbedding {
		native, openai, w := compileEmbedPins(p.root, option)
		trees[vocabNative], trees[vocabEmbeddings], warns = newPins(native), newPins(openai), w
		return trees, warns, nil
	}
	native, err := nativeCompletionPins(p.root, option)
	if err != nil {
		return trees, nil, err
	}
	chat, missChat := openAICompletionPins(native, vocabChat)
	compl, missCompl := openAICompletionPins(native, vocabCompletion)
	trees[vocabNative], trees[vocabChat], trees[vocabCompletion] = newPins(native), newPins(chat), newPins(compl)
	for _, path := range missChat {
		where := "/v1/chat/completions and /v1/completions"
		if !slices.Contains(missCompl, path) {
			where = "/v1/chat/completions"
		}
		warns = append(warns, missingWarning(option, path, where))
	}
	for _, path := range missCompl {
		if !slices.Contains(missChat, path) {
			warns = append(warns, missingWarning(option, path, "/v1/completions"))
		}
	}
	return trees, warns, nil
}

func missingWarning(option, path, where string) string {
	return fmt.Sprintf("%s: %s has no equivalent on %s, which Ollama's OpenAI-compatible API does not read; requests there get the server's default", option, path, where)
}

func newPins(nodes []pinNode) *pins {
	if len(nodes) == 0 {
		return nil
	}
	return &pins{root: nodes, extra: pinsSize(nodes)}
}

func leaf(name, value string) pinNode {
	return pinNode{name: name, keyRaw: strconv.Quote(name), value: value}
}

func object(name string, children ...pinNode) pinNode {
	return pinNode{name: name, keyRaw: strconv.Quote(name), object: true, children: children}
}

// whole makes an object pin a value that replaces the client's instead of
// merging into it: a format's JSON schema is one value to Ollama, and a
// client must not add properties to a pinned one.
func whole(n pinNode) pinNode {
	if n.object {
		n.value, n.object, n.children = string(appendNodes(nil, n.children)), false, nil
	}
	return n
}

// appendNodes writes nodes as a JSON object.
func appendNodes(out []byte, nodes []pinNode) []byte {
	out = append(out, '{')
	for i, n := range nodes {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, n.keyRaw...)
		out = append(out, ':')
		if n.object {
			out = appendNodes(out, n.children)
		} else {
			out = append(out, n.value...)
		}
	}
	return append(out, '}')
}

func renamed(n pinNode, name string) pinNode {
	n.name, n.keyRaw = name, strconv.Quote(name)
	return n
}

func samplingKind(name string) (canonical, kind string, ok bool) {
	for _, s := range sampling {
		if strings.EqualFold(name, s.name) {
			return s.name, s.kind, true
		}
	}
	return "", "", false
}

// checkKind refuses a pinned value that Ollama could not decode into the
// field it goes to, which would make every request fail.
func checkKind(option, path string, n pinNode, kind string) error {
	v := n.value
	if n.object {
		return fmt.Errorf("%s: %s must be %s, not an object", option, path, kindName(kind))
	}
	if v == "null" {
		return nil
	}
	ok := false
	switch kind {
	case "number":
		ok = v[0] == '-' || ('0' <= v[0] && v[0] <= '9')
	case "integer":
		_, err := strconv.ParseInt(v, 10, 64)
		ok = err == nil
	case "stop":
		ok = v[0] == '"' || isStringArray(v)
	}
	if !ok {
		return fmt.Errorf("%s: %s must be %s, got %s", option, path, kindName(kind), v)
	}
	return nil
}

func kindName(kind string) string {
	switch kind {
	case "number":
		return "a number"
	case "integer":
		return "an integer"
	}
	return "a string or an array of strings"
}

// isStringArray reports whether the compact JSON v is an array of strings.
func isStringArray(v string) bool {
	if v[0] != '[' {
		return false
	}
	ok := true
	_ = eachElement(v, func(elem string) {
		ok = ok && elem[0] == '"'
	})
	return ok
}

// eachElement calls fn with each element of the compact, valid JSON array v.
func eachElement(v string, fn func(string)) error {
	i := 1
	if v[i] == ']' {
		return nil
	}
	for i < len(v) {
		end, err := skipValue(v, i, 1)
		if err != nil {
			return err
		}
		fn(v[i:end])
		i = end + 1 // past ',' or the closing ']'
	}
	return nil
}

// nativeCompletionPins is the completion pin tree for Ollama's own API:
// pins in the OpenAI vocabulary move to where /api/chat and /api/generate
// read them.
func nativeCompletionPins(root []pinNode, option string) ([]pinNode, error) {
	var out, moved []pinNode
	movedFrom := map[string]string{}
	for _, n := range root {
		if canonical, kind, ok := samplingKind(n.name); ok {
			if err := checkKind(option, n.name, n, kind); err != nil {
				return nil, err
			}
			moved = append(moved, renamed(n, canonical))
			movedFrom[canonical] = n.name
			continue
		}
		switch {
		case strings.EqualFold(n.name, "max_tokens"):
			if err := checkKind(option, n.name, n, "integer"); err != nil {
				return nil, err
			}
			moved = append(moved, renamed(n, "num_predict"))
			movedFrom["num_predict"] = n.name
		case strings.EqualFold(n.name, "response_format"):
			f, err := formatFromResponseFormat(n, option)
			if err != nil {
				return nil, err
			}
			out = append(out, whole(f))
		case strings.EqualFold(n.name, "format"):
			out = append(out, whole(n))
		default:
			out = append(out, n)
		}
	}
	// The native format a response_format pin gave must not meet a format
	// pin: parsePins has refused duplicates only among the keys as written.
	if err := refuseDuplicates(out, option, ""); err != nil {
		return nil, err
	}
	opts := -1
	for i, n := range out {
		if strings.EqualFold(n.name, "options") {
			opts = i
		}
	}
	if opts < 0 {
		if len(moved) > 0 {
			out = append(out, object("options", moved...))
		}
	} else {
		o := out[opts]
		if len(moved) > 0 && !o.object {
			return nil, fmt.Errorf("%s: options is pinned to %s, so %s cannot be pinned beside it", option, o.value, moved[0].name)
		}
		for _, m := range moved {
			for _, c := range o.children {
				if strings.EqualFold(c.name, m.name) {
					return nil, fmt.Errorf("%s: %s and options.%s are the same setting on Ollama's API; pin one of them", option, movedFrom[m.name], c.name)
				}
			}
		}
		o.children = append(append([]pinNode(nil), o.children...), moved...)
		out[opts] = o
	}
	// What goes to /v1 must decode there too: check the native sampling
	// options as well.
	for _, n := range out {
		if !strings.EqualFold(n.name, "options") || !n.object {
			continue
		}
		for _, c := range n.children {
			if _, kind, ok := samplingKind(c.name); ok {
				if err := checkKind(option, "options."+c.name, c, kind); err != nil {
					return nil, err
				}
			} else if strings.EqualFold(c.name, "num_predict") {
				if err := checkKind(option, "options."+c.name, c, "integer"); err != nil {
					return nil, err
				}
			}
		}
	}
	return out, nil
}

func refuseDuplicates(nodes []pinNode, option, where string) error {
	for i := range nodes {
		for j := range i {
			if strings.EqualFold(nodes[i].name, nodes[j].name) {
				return fmt.Errorf("%s: %s%s is pinned twice (response_format is format on Ollama's API)", option, where, nodes[i].name)
			}
		}
	}
	return nil
}

// formatFromResponseFormat reads an OpenAI response_format pin as the
// native format Ollama's FromChatRequest makes of it.
func formatFromResponseFormat(n pinNode, option string) (pinNode, error) {
	if !n.object {
		if n.value == "null" {
			return leaf("format", "null"), nil
		}
		return pinNode{}, fmt.Errorf("%s: response_format must be an object or null, got %s", option, n.value)
	}
	var typ string
	var schema *pinNode
	for i, c := range n.children {
		switch {
		case strings.EqualFold(c.name, "type"):
			typ, _ = strconv.Unquote(c.value)
		case strings.EqualFold(c.name, "json_schema") && c.object:
			for j, s := range c.children {
				if strings.EqualFold(s.name, "schema") {
					schema = &n.children[i].children[j]
				}
			}
		}
	}
	switch strings.ToLower(strings.TrimSpace(typ)) {
	case "json_object":
		return leaf("format", `"json"`), nil
	case "json_schema":
		if schema != nil {
			return renamed(*schema, "format"), nil
		}
	}
	return pinNode{}, fmt.Errorf(`%s: response_format must be {"type":"json_object"} or {"type":"json_schema","json_schema":{"schema":…}}, the forms Ollama reads`, option)
}

// openAICompletionPins is the tree for /v1/chat/completions or
// /v1/completions made from the native one, and the paths of the pins it
// has no field for.
func openAICompletionPins(native []pinNode, v vocab) (out []pinNode, missing []string) {
	for _, n := range native {
		switch {
		case strings.EqualFold(n.name, "model"), strings.EqualFold(n.name, "stream"):
			out = append(out, n)
		case strings.EqualFold(n.name, "options"):
			if !n.object {
				missing = append(missing, n.name)
				continue
			}
			for _, c := range n.children {
				if canonical, _, ok := samplingKind(c.name); ok {
					out = append(out, renamed(c, canonical))
				} else if strings.EqualFold(c.name, "num_predict") {
					out = append(out, renamed(c, "max_tokens"))
				} else {
					missing = append(missing, n.name+"."+c.name)
				}
			}
		case strings.EqualFold(n.name, "format") && v == vocabChat:
			if rf, ok := responseFormatFromFormat(n); ok {
				out = append(out, rf)
			} else {
				missing = append(missing, n.name)
			}
		case strings.EqualFold(n.name, "think") && v == vocabChat:
			if effort, ok := effortFromThink(n); ok {
				// reasoning, not reasoning_effort: Ollama reads
				// reasoning.effort first, so a client's reasoning object
				// would beat a pinned reasoning_effort.
				out = append(out, object("reasoning", leaf("effort", effort)))
			} else {
				missing = append(missing, n.name)
			}
		default:
			missing = append(missing, n.name)
		}
	}
	return out, missing
}

// responseFormatFromFormat is the response_format Ollama's FromChatRequest
// turns into the pinned native format, if there is one.
func responseFormatFromFormat(n pinNode) (pinNode, bool) {
	switch {
	case n.value != "" && n.value[0] == '{':
		return object("response_format", leaf("type", `"json_schema"`), object("json_schema", renamed(n, "schema"))), true
	case n.value == `"json"`:
		return object("response_format", leaf("type", `"json_object"`)), true
	case n.value == "null", n.value == `""`:
		return leaf("response_format", "null"), true
	}
	return pinNode{}, false
}

// effortFromThink is the reasoning effort Ollama's FromChatRequest turns
// into the pinned think value, if there is one: true has none, since an
// effort is a level, not "on".
func effortFromThink(n pinNode) (string, bool) {
	switch n.value {
	case "false":
		return `"none"`, true
	case `"low"`, `"medium"`, `"high"`:
		return n.value, true
	}
	return "", false
}

// compileEmbedPins splits embedding pins between the APIs: /v1/embeddings
// reads model, dimensions and encoding_format (the last only there), and
// Ollama's own API everything but encoding_format.
func compileEmbedPins(root []pinNode, option string) (native, openai []pinNode, warns []string) {
	for _, n := range root {
		switch {
		case strings.EqualFold(n.name, "encoding_format"):
			openai = append(openai, n)
			warns = append(warns, fmt.Sprintf("%s: encoding_format applies on /v1/embeddings only; Ollama's own API has no such field", option))
		case strings.EqualFold(n.name, "model"), strings.EqualFold(n.name, "dimensions"):
			native = append(native, n)
			openai = append(openai, n)
		case strings.EqualFold(n.name, "options") && n.object:
			native = append(native, n)
			for _, c := range n.children {
				warns = append(warns, missingWarning(option, n.name+"."+c.name, "/v1/embeddings"))
			}
		default:
			native = append(native, n)
			warns = append(warns, missingWarning(option, n.name, "/v1/embeddings"))
		}
	}
	return native, openai, warns
}
