package ollamaflow

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConversationHashReadsBodiesAsOllama(t *testing.T) {
	const base = `{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`
	want := conversationOf("/api/chat", "m:latest", []byte(base))
	require.Len(t, want.prefixes, 2, "one boundary per message")
	assert.Equal(t, []uint64{want.prefixes[1]}, want.keep, "a first turn: the whole only (its system prompt alone is no conversation)")

	same := map[string]string{
		"key case":          `{"MODEL":"m","Messages":[{"ROLE":"system","Content":"be brief"},{"rOlE":"user","CONTENT":"hi"}]}`,
		"escaped key":       `{"model":"m","m\u0065ssages":[{"role":"system","content":"be brief"},{"r\u006fle":"user","content":"hi"}]}`,
		"long s folds":      `{"model":"m","meſſages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`,
		"escaped value":     `{"model":"m","messages":[{"role":"system","content":"be\u0020brief"},{"role":"user","content":"\u0068i"}]}`,
		"whitespace":        "{ \"model\" : \"m\" ,\n \"messages\" : [ { \"role\" : \"system\" , \"content\" : \"be brief\" } ,\n { \"role\" : \"user\", \"content\" : \"hi\" } ] }",
		"last duplicate":    `{"messages":[{"role":"user","content":"other"}],"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`,
		"duplicate in msg":  `{"model":"m","messages":[{"role":"system","content":"x","content":"be brief"},{"role":"user","content":"hi"}]}`,
		"null leaves":       `{"model":"m","messages":[{"role":"system","content":"be brief","content":null},{"role":"user","content":"hi"}]}`,
		"unrelated members": `{"model":"m","stream":false,"options":{"seed":1},"messages":[{"role":"system","content":"be brief","thinking":"x"},{"role":"user","content":"hi"}]}`,
	}
	for name, body := range same {
		assert.Equal(t, want, conversationOf("/api/chat", "m:latest", []byte(body)), name)
	}
	// "system" here reads as a different role ("ſyſtem" folds only as a key).
	assert.NotEqual(t, want, conversationOf("/api/chat", "m:latest", []byte(`{"messages":[{"role":"ſyſtem","content":"be brief"},{"role":"user","content":"hi"}]}`)))

	differ := map[string]string{
		"content case": `{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"Hi"}]}`,
		"role":         `{"messages":[{"role":"system","content":"be brief"},{"role":"assistant","content":"hi"}]}`,
		"images":       `{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi","images":["aGk="]}]}`,
	}
	for name, body := range differ {
		got := conversationOf("/api/chat", "m:latest", []byte(body)).prefixes
		require.Len(t, got, 2, name)
		assert.Equal(t, want.prefixes[0], got[0], "%s: the first message is the same", name)
		assert.NotEqual(t, want.prefixes[1], got[1], name)
	}
	assert.NotEqual(t, want, conversationOf("/api/chat", "other:latest", []byte(base)), "another model has another cache")
	assert.NotEqual(t, want, conversationOf("/v1/chat/completions", "m:latest", []byte(base)), "another API renders another prompt")
	assert.NotEqual(t, want, conversationOf("/api/chat", "m:latest", []byte(`{"tools":[{"type":"function"}],"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`)))

	// The next turn holds this one as a prefix.
	next := conversationOf("/api/chat", "m:latest", []byte(`{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}`))
	require.Len(t, next.prefixes, 4)
	assert.Equal(t, want.prefixes, next.prefixes[:2])

	// Each prefix knows how much prompt it holds; only a request with an
	// earlier answer in it is a follow-up.
	assert.Equal(t, []prefixSize{{chars: 8}, {chars: 10}}, want.sizes)
	assert.Equal(t, []prefixSize{{chars: 8}, {chars: 10}, {chars: 15}, {chars: 19}}, next.sizes)
	assert.False(t, want.followUp, "a first message")
	assert.True(t, next.followUp, "holds an answer")

	// OpenAI content parts: canonical JSON, whatever the spelling.
	a := conversationOf("/v1/chat/completions", "m:latest", []byte(`{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}`))
	b := conversationOf("/v1/chat/completions", "m:latest", []byte(`{"messages":[{"Role":"user","content":[ {"text":"h\u0069", "type":"text"} ]}]}`))
	require.Len(t, a.prefixes, 1)
	assert.Equal(t, a, b)

	// Nothing to read: no conversation.
	for _, body := range []string{``, `[]`, `{"messages":null}`, `{"messages":"hi"}`, `{"messages":[`, `{"messages":[{"role":"user"`} {
		assert.True(t, conversationOf("/api/chat", "m:latest", []byte(body)).none(), body)
	}
}

func TestConversationHashOfGenerate(t *testing.T) {
	long := strings.Repeat("a", 3*affinityPromptChunk+10)
	first := conversationOf("/api/generate", "m:latest", []byte(fmt.Sprintf(`{"system":"s","prompt":%q}`, long)))
	require.Len(t, first.prefixes, 4, "a boundary every affinityPromptChunk bytes, and the end")
	assert.Equal(t, []uint64{first.prefixes[2], first.prefixes[3]}, first.keep, "the last full chunk and the whole")
	// A prompt that grows (the history in the prompt) shares the boundaries.
	grown := conversationOf("/api/generate", "m:latest", []byte(fmt.Sprintf(`{"system":"s","prompt":%q}`, long+" answer and a new question")))
	assert.Equal(t, first.prefixes[:3], grown.prefixes[:3])
	assert.NotEqual(t, first.prefixes[3], grown.prefixes[3])
	other := conversationOf("/api/generate", "m:latest", []byte(fmt.Sprintf(`{"system":"t","prompt":%q}`, long)))
	assert.NotEqual(t, first.prefixes[0], other.prefixes[0], "another system prompt")

	// context: a boundary every affinityContextChunk tokens; the next
	// turn's context holds this one's, so it shares its full chunks.
	ctx := func(n int) string {
		var b strings.Builder
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprint(&b, 1000+i)
		}
		return b.String()
	}
	c1 := conversationOf("/api/generate", "m:latest", []byte(fmt.Sprintf(`{"context":[%s],"prompt":"q"}`, ctx(100))))
	c2 := conversationOf("/api/generate", "m:latest", []byte(fmt.Sprintf(`{"context":[%s],"prompt":"r"}`, ctx(200))))
	require.Len(t, c1.prefixes, 3) // 64 tokens, 100 tokens, the prompt
	assert.Equal(t, []prefixSize{{tokens: 64}, {tokens: 100}, {tokens: 100, chars: 1}}, c1.sizes)
	assert.True(t, c1.followUp, "a context is an earlier turn")
	assert.False(t, first.followUp)
	assert.Equal(t, prefixSize{chars: int32(len(long)) + 1}, first.sizes[3], "system prompt and prompt")
	assert.Equal(t, []uint64{c1.prefixes[0], c1.prefixes[2]}, c1.keep)
	assert.Equal(t, c1.prefixes[0], c2.prefixes[0])
	tab := newAffinityTable(10, time.Minute)
	tab.record(c1, "s1", 0, time.Now())
	server, id, depth := tab.lookup(c2, time.Now())
	assert.Equal(t, 0, depth, "c1's first chunk")
	assert.Equal(t, "s1", server)
	assert.NotZero(t, id)
}

func FuzzConversationOf(f *testing.F) {
	for _, s := range []string{
		`{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`,
		`{"MESSAGES":[{"Role":"user","content":[{"type":"text","text":"hi"}]}],"tools":[{"type":"function","function":{"name":"f"}}]}`,
		`{"messages":[{"role":"user","content":"a","content":null,"images":["aGk="]}],"messages":[]}`,
		`{"system":"s","context":[1,2,3],"prompt":"why is the sky blue"}`,
		`{"prompt":"\u00e9\ud800x","context":null}`, `{"messages":[1,"x",null,{}]}`, `{"messages":[{"role":"ſyſtem"}]}`,
		`{"messages":[`, `[]`, ``, `{"messages":[[[[[[]]]]]]}`,
	} {
		for path := range uint8(4) {
			f.Add([]byte(s), path)
		}
	}
	paths := []string{"/api/chat", "/v1/chat/completions", "/api/generate", "/v1/completions"}
	f.Fuzz(func(t *testing.T, body []byte, path uint8) {
		p := paths[int(path)%len(paths)]
		got := conversationOf(p, "m:latest", body)
		if again := conversationOf(p, "m:latest", body); !assert.ObjectsAreEqual(got, again) {
			t.Fatalf("not deterministic: %v then %v", got, again)
		}
		if len(got.keep) > 3 || len(got.keep) > 0 && got.keep[len(got.keep)-1] != got.prefixes[len(got.prefixes)-1] {
			t.Fatalf("records %v of %v: the whole request and at most two boundaries", got.keep, got.prefixes)
		}
		if len(got.sizes) != len(got.prefixes) {
			t.Fatalf("%d sizes for %d prefixes", len(got.sizes), len(got.prefixes))
		}
		for i := 1; i < len(got.sizes); i++ {
			if a, b := got.sizes[i-1], got.sizes[i]; b.chars < a.chars || b.tokens < a.tokens {
				t.Fatalf("a longer prefix holds less prompt: %v", got.sizes)
			}
		}
		if !json.Valid(body) || got.none() {
			return
		}
		variant := escapeLetters(body)
		if !json.Valid(variant) {
			t.Fatalf("escaping broke the body: %q -> %q", body, variant)
		}
		v := conversationOf(p, "m:latest", variant)
		if !assert.ObjectsAreEqual(got.prefixes, v.prefixes) {
			t.Fatalf("escaped letters and spaces changed the hashes:\n%q\n%q\n%v\n%v", body, variant, got.prefixes, v.prefixes)
		}
		if !assert.ObjectsAreEqual(got.sizes, v.sizes) || got.followUp != v.followUp {
			t.Fatalf("escaped letters and spaces changed the sizes or the turn:\n%q\n%q\n%v %v\n%v %v", body, variant, got.sizes, got.followUp, v.sizes, v.followUp)
		}
	})
}

// An application's system prompt, shared by every conversation it starts,
// is not a conversation: a first turn records only itself, so the next
// application user's first turn is a new conversation (spread, counted as
// one of its own), while a follow-up still finds its own history.
func TestASharedSystemPromptIsNoConversation(t *testing.T) {
	system := strings.Repeat("You are the assistant of a large product. ", 50)
	chatOf := func(msgs ...string) ([]byte, conversation) {
		var m []map[string]string
		for i, c := range msgs {
			role := []string{"system", "user", "assistant"}[min(i, 1+(i+1)%2)]
			m = append(m, map[string]string{"role": role, "content": c})
		}
		body := []byte(mustJSON(t, map[string]any{"model": "m", "messages": m}))
		return body, conversationOf("/api/chat", "m", body)
	}
	now := time.Now()
	a, b := ruleBackend("a", 0), ruleBackend("b", 0)
	h := &Handler{policy: pickLeastDelay, affinity: newAffinityTable(affinityMaxEntries, affinityTTL)}
	homes := map[string]bool{}
	var firstTurns []conversation
	for i := range 2 {
		body, c := chatOf(system, fmt.Sprint("question of user ", i))
		require.False(t, c.followUp)
		assert.Len(t, c.keep, 1, "the whole request only")
		key, _, _ := h.affinity.lookup(c, now)
		require.Empty(t, key, "user %d's first turn matches another user's system prompt", i)
		be, route, id := h.acquireConversation([]*backend{a, b}, c, newJob("m", apiOllama, body))
		require.NotNil(t, be)
		assert.Equal(t, routePolicy, route)
		assert.Zero(t, id)
		h.affinity.record(c, be.srv.key, id, now)
		homes[be.cfg.Name] = true
		firstTurns = append(firstTurns, c)
		be.release()
	}
	assert.Len(t, homes, 2, "two new conversations, two equal idle servers: spread")

	// The follow-up of user 1 finds its own first turn, and the one
	// before its last message is recorded (an edited question).
	_, next := chatOf(system, "question of user 1", "an answer", "more")
	require.True(t, next.followUp)
	assert.Len(t, next.keep, 2)
	key, _, depth := h.affinity.lookup(next, now)
	assert.NotEmpty(t, key)
	assert.Equal(t, len(next.prefixes)-3, depth, "user 1's first turn")
	assert.Equal(t, firstTurns[1].prefixes[len(firstTurns[1].prefixes)-1], next.prefixes[depth])
}
