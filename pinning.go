package ollamaflow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
	"unsafe"

	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// Pinned properties (SPEC §6) are values the operator fixes in request
// bodies: the client's body is merged with the pins, and the pins win.
//
// Ollama decodes request bodies with Go's encoding/json, which matches
// object keys to struct fields case-insensitively (Unicode simple folding,
// so "ſtream" is "stream" and "\u212aeep_alive" is "keep_alive"), after
// unescaping, and lets the last duplicate win. A pin that merely set "model"
// would lose to a later "MODEL" or "mod\u0065l". So at every level a pin
// touches, apply drops every client key that equals a pinned key that way
// and writes the pinned key once, after the client's members.

// Errors from pins.apply; the caller answers 400 with them.
var (
	errBodyNotObject = errors.New("request body must be a JSON object")
	errBodyTooDeep   = fmt.Errorf("request body nests deeper than %d levels", maxJSONDepth)
)

// maxJSONDepth is encoding/json's nesting limit: Ollama rejects anything
// deeper, so apply does too, and never recurses deeper itself.
const maxJSONDepth = 10000

// pins is a validated pin set, parsed once at provision. A nil *pins is the
// empty set.
type pins struct {
	root  []pinNode
	extra int // upper bound of the bytes apply adds to a body
}

// pinNode is one pinned key. An object pin merges into the client's object
// at that key; any other value replaces it.
type pinNode struct {
	name     string    // the key, unescaped; compared with strings.EqualFold
	keyRaw   string    // the key as a JSON string, as configured
	object   bool      // the pinned value is an object
	value    string    // compact JSON of a non-object value
	children []pinNode // the members of an object value
	drop     bool      // remove every spelling of the key and write nothing
}

// provisionPins compiles the frontend's pin options for each API and logs,
// once, each pin an API has no field for.
func (h *Handler) provisionPins() error {
	var err error
	var warns, more []string
	if h.pinCompl, warns, err = compilePins(h.PinCompletions, "pin_completions", kindCompletion); err != nil {
		return err
	}
	if h.pinEmbed, more, err = compilePins(h.PinEmbeddings, "pin_embeddings", kindEmbedding); err != nil {
		return err
	}
	for _, w := range append(warns, more...) {
		h.logger.Warn("pin does not apply on every API", zap.String("frontend", h.Name), zap.String("pin", w))
	}
	return nil
}

// provisionPins compiles the backend's pin options for each API and
// returns what a frontend's provision should warn about.
func (b *Backend) provisionPins() ([]string, error) {
	var err error
	var warns, more []string
	if b.pinCompl, warns, err = compilePins(b.PinCompletions, "pin_completions", kindCompletion); err != nil {
		return nil, err
	}
	if b.pinEmbed, more, err = compilePins(b.PinEmbeddings, "pin_embeddings", kindEmbedding); err != nil {
		return nil, err
	}
	return append(warns, more...), nil
}

// pinsFor returns the frontend's pins for requests of kind in vocabulary
// v: nil, the empty set, for kinds other than completions and embeddings.
func (h *Handler) pinsFor(kind routeKind, v vocab) *pins {
	return choosePins(kind, v, &h.pinCompl, &h.pinEmbed)
}

// pinsFor returns the backend's pins for requests of kind in vocabulary v.
func (b *Backend) pinsFor(kind routeKind, v vocab) *pins {
	return choosePins(kind, v, &b.pinCompl, &b.pinEmbed)
}

func choosePins(kind routeKind, v vocab, compl, embed *pinTrees) *pins {
	switch kind {
	case kindCompletion:
		return compl[v]
	case kindEmbedding:
		return embed[v]
	}
	return nil
}

// parsePins validates a pin option (a JSON object) and pre-parses it.
// Empty, null and {} give nil, the empty set. option names the config
// option in errors.
func parsePins(raw json.RawMessage, option string) (*pins, error) {
	s := bytes.TrimSpace(raw)
	if len(s) == 0 || string(s) == "null" {
		return nil, nil
	}
	var probe any
	if err := json.Unmarshal(s, &probe); err != nil {
		return nil, fmt.Errorf("%s: invalid JSON: %v", option, err)
	}
	if _, ok := probe.(map[string]any); !ok {
		return nil, fmt.Errorf("%s: must be a JSON object, got %s", option, jsonKind(s))
	}
	root, err := parsePinObject(gjson.ParseBytes(s), option)
	if err != nil || len(root) == 0 {
		return nil, err
	}
	return &pins{root: root, extra: pinsSize(root)}, nil
}

// parsePinObject turns the members of a JSON object into pin nodes,
// refusing two keys that Ollama could not tell apart. where is the path so
// far, for errors.
func parsePinObject(obj gjson.Result, where string) ([]pinNode, error) {
	var nodes []pinNode
	var err error
	obj.ForEach(func(key, value gjson.Result) bool {
		n := pinNode{name: unquoteKey(key.Raw), keyRaw: key.Raw}
		for _, other := range nodes {
			if strings.EqualFold(other.name, n.name) {
				err = fmt.Errorf("%s: keys %s and %s are the same key to Ollama, which matches keys case-insensitively", where, other.keyRaw, n.keyRaw)
				return false
			}
		}
		if value.IsObject() {
			n.object = true
			n.children, err = parsePinObject(value, where+"."+n.name)
			if err != nil {
				return false
			}
		} else {
			var buf bytes.Buffer
			if err = json.Compact(&buf, []byte(value.Raw)); err != nil {
				err = fmt.Errorf("%s.%s: %v", where, n.name, err)
				return false
			}
			n.value = buf.String()
		}
		nodes = append(nodes, n)
		return true
	})
	return nodes, err
}

// pinsSize bounds what writing nodes adds to an object: each member, a
// comma, and braces for object values.
func pinsSize(nodes []pinNode) int {
	size := 0
	for _, n := range nodes {
		size += len(n.keyRaw) + 2 + len(n.value)
		if n.object {
			size += 2 + pinsSize(n.children)
		}
	}
	return size
}

// jsonKind names the type of a valid JSON value for error messages.
func jsonKind(s []byte) string {
	switch s[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		return "a number"
	}
}

// empty reports whether p pins nothing.
func (p *pins) empty() bool { return p == nil || len(p.root) == 0 }

// apply merges the pins into body, which must be a JSON object: objects
// merge recursively, anything else (scalars, arrays, null) replaces the
// client's value, and client keys that Ollama would take for a pinned key
// are dropped. The result is a new slice. The empty set returns body
// itself, unchecked and without allocating.
//
// The client's members are copied as raw bytes and their values are never
// decoded, so the cost is one scan of the body plus gjson's validation.
func (p *pins) apply(body []byte) ([]byte, error) {
	if p == nil || len(p.root) == 0 {
		return body, nil
	}
	// The scan reads body as a string so that members are substrings, not
	// copies; body is not modified while apply runs.
	s := unsafe.String(unsafe.SliceData(body), len(body))
	i := skipSpace(s, 0)
	if i == len(s) || s[i] != '{' {
		return nil, errBodyNotObject
	}
	out := make([]byte, 0, len(body)+p.extra)
	out, err := mergeObject(out, clientObjects{one: s[i:]}, p.root, 1)
	if err != nil {
		return nil, err
	}
	// The scan only matched brackets; this checks the grammar, which the
	// scan's depth limit keeps gjson's recursive validator within.
	if !gjson.ValidBytes(body) {
		return nil, errBodyNotObject
	}
	return out, nil
}

// mergeObject writes one object: the members of srcs that no node claims,
// then the nodes. An object node merges into the client objects
// under its key that come after the last non-object one, as encoding/json
// fills one map or struct from all of them in turn. depth is this object's
// nesting level.
func mergeObject(out []byte, srcs clientObjects, nodes []pinNode, depth int) ([]byte, error) {
	if depth > maxJSONDepth {
		return nil, errBodyTooDeep
	}
	// For each node, the client objects seen under its key since the last
	// non-object value there: their count and the last one, which is all
	// there is in the common case. Bigger runs are collected again below.
	var small [8]pinRun
	var runs []pinRun
	if len(nodes) <= len(small) {
		runs = small[:len(nodes)]
	} else {
		runs = make([]pinRun, len(nodes))
	}

	out = append(out, '{')
	first := true
	for k := range srcs.len() {
		err := eachMember(srcs.at(k), depth, func(key string, escaped bool, value string) {
			n := matchPin(nodes, key, escaped)
			if n < 0 {
				if !first {
					out = append(out, ',')
				}
				first = false
				out = append(out, key...)
				out = append(out, ':')
				out = append(out, value...)
				return
			}
			if !nodes[n].object {
				return
			}
			if value[0] == '{' {
				runs[n].count++
				runs[n].last = value
			} else {
				runs[n] = pinRun{}
			}
		})
		if err != nil {
			return nil, err
		}
	}

	for n := range nodes {
		if nodes[n].drop {
			continue
		}
		if !first {
			out = append(out, ',')
		}
		first = false
		out = append(out, nodes[n].keyRaw...)
		out = append(out, ':')
		if !nodes[n].object {
			out = append(out, nodes[n].value...)
			continue
		}
		var err error
		var sub clientObjects
		switch runs[n].count {
		case 0:
		case 1:
			sub.one = runs[n].last
		default:
			sub.many = collectRun(srcs, nodes, n, depth)
		}
		out, err = mergeObject(out, sub, nodes[n].children, depth+1)
		if err != nil {
			return nil, err
		}
	}
	return append(out, '}'), nil
}

type pinRun struct {
	count int
	last  string
}

// clientObjects are client objects, in order, that Ollama decodes into one
// place: usually one, held inline so that the common case allocates
// nothing; sometimes none or several.
type clientObjects struct {
	one  string
	many []string
}

func (c clientObjects) len() int {
	switch {
	case c.many != nil:
		return len(c.many)
	case c.one != "":
		return 1
	}
	return 0
}

func (c clientObjects) at(k int) string {
	if c.many != nil {
		return c.many[k]
	}
	return c.one
}

// collectRun lists the client objects under node n's key after the last
// non-object value there; mergeObject has scanned srcs without error.
func collectRun(srcs clientObjects, nodes []pinNode, n, depth int) []string {
	var run []string
	for k := range srcs.len() {
		_ = eachMember(srcs.at(k), depth, func(key string, escaped bool, value string) {
			if matchPin(nodes, key, escaped) != n {
				return
			}
			if value[0] == '{' {
				run = append(run, value)
			} else {
				run = run[:0]
			}
		})
	}
	return run
}

// matchPin returns the index of the node whose name the raw JSON key
// equals as encoding/json compares them, or -1.
func matchPin(nodes []pinNode, key string, escaped bool) int {
	name := key[1 : len(key)-1]
	var buf [64]byte
	if escaped {
		b := appendUnquoted(buf[:0], key)
		name = unsafe.String(unsafe.SliceData(b), len(b))
	}
	for i := range nodes {
		if strings.EqualFold(name, nodes[i].name) {
			return i
		}
	}
	return -1
}

// unquoteKey unescapes a raw JSON string exactly as encoding/json does,
// including its replacement of invalid surrogates and bytes. It is for
// configuration; matchPin uses the allocation-free appendUnquoted.
func unquoteKey(raw string) string {
	var s string
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		return raw[1 : len(raw)-1]
	}
	return s
}

// appendUnquoted appends the JSON string raw (quotes included) to dst,
// unescaped as encoding/json unescapes it: a \u surrogate that does not
// pair with the next escape is U+FFFD. Invalid UTF-8 is copied as it is:
// strings.EqualFold reads each bad byte as U+FFFD, which is what
// encoding/json turns it into. A malformed escape ends the name early; the
// body is refused by validation anyway.
func appendUnquoted(dst []byte, raw string) []byte {
	s := raw[1 : len(raw)-1]
	for i := 0; i < len(s); {
		if s[i] != '\\' {
			dst = append(dst, s[i])
			i++
			continue
		}
		if i+1 == len(s) {
			return dst
		}
		switch c := s[i+1]; c {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r := hex4(s, i+2)
			if r < 0 {
				return dst
			}
			i += 6
			if utf16.IsSurrogate(r) {
				next := rune(-1)
				if i+1 < len(s) && s[i] == '\\' && s[i+1] == 'u' {
					next = hex4(s, i+2)
				}
				if pair := utf16.DecodeRune(r, next); pair != unicode.ReplacementChar {
					r = pair
					i += 6
				} else {
					r = unicode.ReplacementChar
				}
			}
			dst = utf8.AppendRune(dst, r)
			continue
		default: // '"', '\\', '/'
			dst = append(dst, c)
		}
		i += 2
	}
	return dst
}

// hexDigit is the value of the hex digit c; ok is false when c is none.
func hexDigit(c byte) (v byte, ok bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// hex4 reads the four hex digits at s[i:], or returns -1.
func hex4(s string, i int) rune {
	if i+4 > len(s) {
		return -1
	}
	var r rune
	for _, c := range []byte(s[i : i+4]) {
		v, ok := hexDigit(c)
		if !ok {
			return -1
		}
		r = r<<4 | rune(v)
	}
	return r
}

// eachMember calls fn with the raw key and value of each member of the
// object at the start of s, whose nesting level is depth. It matches
// brackets and strings but does not check the grammar (apply does that);
// it never reads out of bounds, whatever s holds.
func eachMember(s string, depth int, fn func(key string, escaped bool, value string)) error {
	i := skipSpace(s, 1) // s[0] is '{'
	if i < len(s) && s[i] == '}' {
		return nil
	}
	for {
		if i >= len(s) || s[i] != '"' {
			return errBodyNotObject
		}
		end := scanString(s, i)
		if end < 0 {
			return errBodyNotObject
		}
		key := s[i:end]
		escaped := strings.IndexByte(key, '\\') >= 0
		i = skipSpace(s, end)
		if i >= len(s) || s[i] != ':' {
			return errBodyNotObject
		}
		i = skipSpace(s, i+1)
		end, err := skipValue(s, i, depth)
		if err != nil {
			return err
		}
		fn(key, escaped, s[i:end])
		i = skipSpace(s, end)
		if i >= len(s) {
			return errBodyNotObject
		}
		switch s[i] {
		case ',':
			i = skipSpace(s, i+1)
		case '}':
			return nil
		default:
			return errBodyNotObject
		}
	}
}

// skipValue returns the end of the value at s[i], a member of an object
// or array at level depth.
func skipValue(s string, i, depth int) (int, error) {
	if i >= len(s) {
		return 0, errBodyNotObject
	}
	switch s[i] {
	case '"':
		end := scanString(s, i)
		if end < 0 {
			return 0, errBodyNotObject
		}
		return end, nil
	case '{', '[':
		level := 0
		for ; i < len(s); i++ {
			switch s[i] {
			case '{', '[':
				level++
				if depth+level > maxJSONDepth {
					return 0, errBodyTooDeep
				}
			case '}', ']':
				level--
				if level == 0 {
					return i + 1, nil
				}
			case '"':
				end := scanString(s, i)
				if end < 0 {
					return 0, errBodyNotObject
				}
				i = end - 1
			}
		}
		return 0, errBodyNotObject
	default: // number, true, false, null
		start := i
		for ; i < len(s); i++ {
			switch s[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if i == start {
					return 0, errBodyNotObject
				}
				return i, nil
			}
		}
		return 0, errBodyNotObject
	}
}

// scanString returns the end of the JSON string at s[i] (just past the
// closing quote), or -1 if it is unterminated. It jumps from quote to quote
// with strings.IndexByte, which is what makes long prompts cheap; a quote
// preceded by an odd number of backslashes is escaped.
func scanString(s string, i int) int {
	for i++; i < len(s); i++ {
		j := strings.IndexByte(s[i:], '"')
		if j < 0 {
			return -1
		}
		i += j
		k := i - 1
		for s[k] == '\\' { // stops at the opening quote at the latest
			k--
		}
		if (i-1-k)%2 == 0 {
			return i + 1
		}
	}
	return -1
}

func skipSpace(s string, i int) int {
	for ; i < len(s); i++ {
		switch s[i] {
		case ' ', '\t', '\n', '\r':
		default:
			return i
		}
	}
	return i
}
