package ollamaflow

// The conversation a completion belongs to, read from its body without
// decoding it: the prefix hashes of the conversation so far (system
// prompt, earlier messages, a context), which conversation affinity
// (affinity.go) looks up to keep a conversation where its prompt is
// cached.

import (
	"encoding/json"
	"hash/maphash"
	"strings"
	"unsafe"
)

// conversation is the prefix hashes of a completion, shortest first; the
// last is the whole request. sizes are how much prompt each prefix holds,
// what a server that has it in its cache need not evaluate again. keep are
// the hashes to record. followUp says the request carries an earlier turn
// (an answer in its messages, a context): only then is a cached prefix
// credited, so that unrelated clients sending the same first message are
// not taken for one conversation. None: not a conversation (or affinity
// off).
type conversation struct {
	prefixes []uint64
	sizes    []prefixSize
	keep     []uint64
	followUp bool
}

// prefixSize is the prompt a prefix holds: characters of text (messages'
// content, system prompt, prompt), counted as newJob counts them, and
// tokens where the body gives them (/api/generate's context).
type prefixSize struct {
	chars, tokens int32
}

func (c conversation) none() bool { return len(c.prefixes) == 0 }

// affinitySeed keys the hashes: per process, so a client cannot aim
// collisions at other clients' conversations.
var affinitySeed = maphash.MakeSeed()

// conversationOf reads the conversation of a completion body on path, for
// model (normalised). A body it cannot read gives none: Ollama refuses it.
func conversationOf(path, model string, body []byte) conversation {
	s := unsafe.String(unsafe.SliceData(body), len(body))
	i := skipSpace(s, 0)
	if i == len(s) || s[i] != '{' {
		return conversation{}
	}
	chat := path == "/api/chat" || path == "/v1/chat/completions"
	var messages, tools, system, context, prompt string
	err := eachMember(s[i:], 1, func(key string, escaped bool, value string) {
		switch {
		case chat && keyIs(key, escaped, "messages"):
			messages = value
		case chat && keyIs(key, escaped, "tools"):
			tools = value
		case !chat && keyIs(key, escaped, "system"):
			system = value
		case !chat && keyIs(key, escaped, "context"):
			context = value
		case !chat && keyIs(key, escaped, "prompt"):
			prompt = value
		}
	})
	if err != nil {
		return conversation{}
	}
	c := &convHasher{}
	c.h.SetSeed(affinitySeed)
	c.h.WriteString(path)
	c.h.WriteByte(0)
	c.h.WriteString(model)
	c.h.WriteByte(0)
	if chat {
		c.value(tools)
		if len(messages) == 0 || messages[0] != '[' {
			return conversation{}
		}
		turnAt := -1 // the first earlier turn (an answer) among the messages
		if eachArrayElement(messages, 2, func(m string) {
			c.message(m)
			if c.out.followUp && turnAt < 0 {
				turnAt = len(c.out.prefixes)
			}
			c.boundary()
		}) != nil {
			return conversation{}
		}
		// The messages before the last (an edited question) are recorded
		// only when they hold an earlier turn: without one they are a
		// template many unrelated requests share (an application's system
		// prompt), not the conversation so far, and recording them would
		// make every new conversation of that application a turn of one
		// (no spreading, one id for all in the hosting counts).
		if n := len(c.out.prefixes); n > 1 && turnAt >= 0 && turnAt <= n-2 {
			c.out.keep = append(c.out.keep, c.out.prefixes[n-2])
		}
		return c.finish()
	}
	c.chars += c.value(system)
	c.h.WriteByte(1)
	if len(context) > 0 && context[0] == '[' {
		n := 0
		if eachArrayElement(context, 2, func(tok string) {
			c.h.WriteString(tok)
			c.h.WriteByte(',')
			c.tokens++
			if n++; n%affinityContextChunk == 0 {
				c.boundary()
			}
		}) != nil {
			return conversation{}
		}
		c.out.followUp = n > 0
		if n >= affinityContextChunk {
			c.keepLast()
		}
		if n%affinityContextChunk != 0 {
			c.boundary()
		}
	}
	if len(prompt) > 0 && prompt[0] == '"' {
		text := decodeString(prompt)
		full := false
		for len(text) > affinityPromptChunk {
			c.h.WriteString(text[:affinityPromptChunk])
			c.chars += affinityPromptChunk
			c.boundary()
			text, full = text[affinityPromptChunk:], true
		}
		if full {
			c.keepLast()
		}
		if text != "" {
			c.h.WriteString(text)
			c.chars += int32(len(text))
			c.boundary()
		}
	}
	return c.finish()
}

// convHasher hashes a conversation as it is read, keeping the hash at each
// boundary.
type convHasher struct {
	h             maphash.Hash
	out           conversation
	chars, tokens int32 // the prompt read so far
}

func (c *convHasher) boundary() {
	c.out.prefixes = append(c.out.prefixes, c.h.Sum64())
	c.out.sizes = append(c.out.sizes, prefixSize{c.chars, c.tokens})
}

// keepLast marks the last boundary for recording.
func (c *convHasher) keepLast() {
	c.out.keep = append(c.out.keep, c.out.prefixes[len(c.out.prefixes)-1])
}

// finish records the whole request too.
func (c *convHasher) finish() conversation {
	if n := len(c.out.prefixes); n > 0 {
		c.out.keep = append(c.out.keep, c.out.prefixes[n-1])
	}
	return c.out
}

// The fields of a message that change what a model is shown, on both APIs.
var messageFields = []string{"role", "content", "images", "tool_calls", "tool_name", "tool_call_id"}

// message hashes the fields of one message object, each as the last
// member that spells it (case-insensitively, as encoding/json) holds it.
func (c *convHasher) message(m string) {
	if len(m) == 0 || m[0] != '{' {
		c.value(m)
		return
	}
	var vals [6]string
	_ = eachMember(m, 3, func(key string, escaped bool, value string) {
		for i, f := range messageFields {
			if keyIs(key, escaped, f) {
				if value != "null" { // null leaves a decoded field as it was
					vals[i] = value
				}
				return
			}
		}
	})
	for i, v := range vals {
		if n := c.value(v); i == 1 { // content
			c.chars += n
		}
	}
	if role := vals[0]; len(role) > 0 && role[0] == '"' {
		switch decodeString(role) {
		case "assistant", "tool":
			c.out.followUp = true
		}
	}
}

// value hashes a JSON value canonically: a string decoded, anything else
// decoded and encoded again (object keys sorted, numbers and escapes in
// one spelling), so spellings Ollama reads alike hash alike. It returns
// the length hashed: a string's decoded, another value's canonical JSON
// (content parts: an estimate of their text).
func (c *convHasher) value(raw string) (n int32) {
	switch {
	case raw == "" || raw == "null":
		c.h.WriteByte('n')
	case raw[0] == '"':
		c.h.WriteByte('s')
		text := decodeString(raw)
		c.h.WriteString(text)
		n = int32(len(text))
	default:
		var v any
		canon := raw
		if json.Unmarshal([]byte(raw), &v) == nil {
			if b, err := json.Marshal(v); err == nil {
				canon = string(b)
			}
		}
		c.h.WriteByte('j')
		c.h.WriteString(canon)
		n = int32(len(canon))
	}
	c.h.WriteByte(0)
	return n
}

// keyIs reports whether a raw member key names field as encoding/json
// matches keys: unescaped, then equal under Unicode simple folding.
func keyIs(key string, escaped bool, field string) bool {
	name := key[1 : len(key)-1]
	if escaped {
		var buf [64]byte
		if len(name) > 6*len(field)+8 {
			return false
		}
		b := appendUnquoted(buf[:0], key)
		name = string(b)
	}
	// A folded letter is at most three bytes (ſ, K): longer names differ.
	if len(name) < len(field) || len(name) > 3*len(field) {
		return false
	}
	return strings.EqualFold(name, field)
}

// eachArrayElement calls fn with each raw element of the array at the start of
// s, whose nesting level is depth. Like eachMember it matches brackets and
// strings without checking the grammar.
func eachArrayElement(s string, depth int, fn func(value string)) error {
	i := skipSpace(s, 1) // s[0] is '['
	if i < len(s) && s[i] == ']' {
		return nil
	}
	for {
		end, err := skipValue(s, i, depth)
		if err != nil {
			return err
		}
		fn(s[i:end])
		i = skipSpace(s, end)
		if i >= len(s) {
			return errBodyNotObject
		}
		switch s[i] {
		case ',':
			i = skipSpace(s, i+1)
		case ']':
			return nil
		default:
			return errBodyNotObject
		}
	}
}
