package ollamaflow

// One reading of a request body, the way Ollama reads it.
//
// The proxy decides on a few top-level fields of a body: the model (the
// allow-list, routing, the models filter, metrics) and stream (how a
// management answer is merged). Ollama binds bodies to its request types
// with Go's encoding/json, so each of those decisions must see exactly the
// value encoding/json would: keys matched case-insensitively with Unicode
// simple folding ("ſtream" is stream, "\u212aeep_alive" is keep_alive),
// escapes decoded in keys and values, invalid UTF-8 read as U+FFFD, the last
// duplicate winning, and null leaving a string or bool as it was while it
// resets a pointer. readFields does that in one scan of the top level,
// reusing the merge's member iteration and key unescaping.
//
// A body that spells a decided field more than once is forwarded with
// exactly one spelling, the decided value under the canonical key, so that
// what was checked is what runs whatever the backend's decoder does with
// duplicates.

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
	"unsafe"

	"github.com/tidwall/gjson"
)

// optBool is a bool a body may leave unset.
type optBool uint8

const (
	boolUnset optBool = iota
	boolFalse
	boolTrue
)

// or is the value, or def when unset.
func (b optBool) or(def bool) bool {
	if b == boolUnset {
		return def
	}
	return b == boolTrue
}

// bodyFields is what the proxy decides on from a body.
type bodyFields struct {
	// model is the model Ollama runs, decoded but not normalised: "model",
	// or on the routes that still take it, "name" when model is empty.
	model string
	// stream is the client's stream field as Ollama's request type holds
	// it after decoding; see streams.
	stream optBool

	// How many members spell each field, for canonicalBody.
	modelKeys, nameKeys, streamKeys int
}

// streams reports whether the request asks for a streamed answer: Ollama's
// own API streams unless told not to, its OpenAI API only when asked.
func (f *bodyFields) streams(api apiFormat) bool {
	return f.stream.or(api == apiOllama)
}

// needsCanonical reports whether the body spells a decided field more than
// once (for the routes that take "name", model and name count together).
func (f *bodyFields) needsCanonical(from modelFrom) bool {
	models := f.modelKeys
	if from == modelInBodyName {
		models += f.nameKeys
	}
	return models > 1 || f.streamKeys > 1
}

// The fields readFields looks for.
const (
	fieldNone = iota
	fieldModel
	fieldName
	fieldStream
)

// errNoModel is the 400 for a body that names no model where one is needed.
var errNoModel = errors.New(`request body must name a model: {"model":"NAME",…}`)

// readFields reads the decided fields of body, a request on the route whose
// model comes from from, on api. validated says the caller has already
// checked that body is valid JSON (pins.apply does). It allocates only for
// a model name or key that holds escapes or invalid UTF-8.
func readFields(body []byte, from modelFrom, api apiFormat, validated bool) (bodyFields, error) {
	var f bodyFields
	s := unsafe.String(unsafe.SliceData(body), len(body))
	i := skipSpace(s, 0)
	if i == len(s) || s[i] != '{' {
		return f, errBodyNotObject
	}
	var model, name string
	var typeErr error
	err := eachMember(s[i:], 1, func(key string, escaped bool, value string) {
		field := fieldOf(key, escaped)
		if field == fieldNone || typeErr != nil {
			return
		}
		switch field {
		case fieldModel, fieldName:
			if field == fieldModel {
				f.modelKeys++
			} else {
				f.nameKeys++
			}
			var str string
			switch value[0] {
			case 'n': // null leaves a string as it was
				return
			case '"':
				str = decodeString(value)
			default:
				typeErr = fmt.Errorf("%s must be a string", fieldLabel(field))
				return
			}
			if field == fieldModel {
				model = str
			} else {
				name = str
			}
		case fieldStream:
			f.streamKeys++
			switch value {
			case "true":
				f.stream = boolTrue
			case "false":
				f.stream = boolFalse
			case "null":
				// Ollama's API holds stream as *bool, which null resets;
				// its OpenAI API as bool, which null leaves as it was.
				if api == apiOllama {
					f.stream = boolUnset
				}
			default:
				typeErr = errors.New("stream must be true or false")
			}
		}
	})
	if err != nil {
		return f, err
	}
	// The scan only matched brackets: check the grammar, which the scan's
	// depth limit keeps gjson's recursive validator within.
	if !validated && !gjson.ValidBytes(body) {
		return f, errBodyNotObject
	}
	if typeErr != nil {
		return f, typeErr
	}
	switch from {
	case modelInBody:
		f.model = model
	case modelInBodyName:
		// As Ollama's show, pull, push and delete handlers: cmp.Or(Model, Name).
		f.model = model
		if f.model == "" {
			f.model = name
		}
	default:
		return f, nil
	}
	if strings.TrimSpace(f.model) == "" {
		return f, errNoModel
	}
	return f, nil
}

// fieldOf says which decided field a raw key names, as encoding/json
// matches keys to struct fields.
func fieldOf(key string, escaped bool) int {
	name := key[1 : len(key)-1]
	// Of the letters in these names only s folds with a longer rune (ſ, two
	// bytes; k's Kelvin sign does not occur), so a match is 4 to 7 bytes
	// once unescaped, and an escape gives at least one byte from six.
	if len(name) < 4 || len(name) > 6*7 {
		return fieldNone
	}
	var buf [64]byte
	if escaped {
		b := appendUnquoted(buf[:0], key)
		name = unsafe.String(unsafe.SliceData(b), len(b))
	}
	if len(name) < 4 || len(name) > 7 {
		return fieldNone
	}
	switch {
	case strings.EqualFold(name, "model"):
		return fieldModel
	case strings.EqualFold(name, "name"):
		return fieldName
	case strings.EqualFold(name, "stream"):
		return fieldStream
	}
	return fieldNone
}

func fieldLabel(field int) string {
	switch field {
	case fieldModel:
		return "model"
	case fieldName:
		return "name"
	}
	return "stream"
}

// decodeString decodes the JSON string raw (quotes included) as
// encoding/json does, each invalid UTF-8 byte becoming U+FFFD.
func decodeString(raw string) string {
	inner := raw[1 : len(raw)-1]
	if strings.IndexByte(inner, '\\') < 0 && utf8.ValidString(inner) {
		return inner
	}
	b := appendUnquoted(make([]byte, 0, len(inner)), raw)
	if utf8.Valid(b) {
		return string(b)
	}
	out := make([]byte, 0, len(b)+8)
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		out = utf8.AppendRune(out, r) // RuneError for a bad byte, as encoding/json
		i += size
	}
	return string(out)
}

// canonicalBody rewrites body so that each decided field it spells more
// than once appears once, under its canonical key, with the decided value:
// model (and, on the routes that take it, name, which is then dropped) and
// stream. It reuses the pin merge, which already drops every spelling of a
// key; it runs only for the rare body that needs it.
func canonicalBody(body []byte, f *bodyFields, from modelFrom) ([]byte, error) {
	var nodes []pinNode
	models := f.modelKeys
	if from == modelInBodyName {
		models += f.nameKeys
	}
	if models > 1 && f.model != "" {
		quoted, err := json.Marshal(f.model)
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, pinNode{name: "model", keyRaw: `"model"`, value: string(quoted)})
		if from == modelInBodyName {
			nodes = append(nodes, pinNode{name: "name", keyRaw: `"name"`, drop: true})
		}
	}
	if f.streamKeys > 1 {
		n := pinNode{name: "stream", keyRaw: `"stream"`}
		switch f.stream {
		case boolTrue:
			n.value = "true"
		case boolFalse:
			n.value = "false"
		default:
			n.drop = true
		}
		nodes = append(nodes, n)
	}
	if len(nodes) == 0 {
		return body, nil
	}
	return (&pins{root: nodes, extra: pinsSize(nodes)}).apply(body)
}
