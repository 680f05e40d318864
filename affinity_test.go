package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func TestConversationHashReadsBodiesAsOllama(t *testing.T) {
	const base = `{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`
	want := conversationOf("/api/chat", "m:latest", []byte(base))
	require.Len(t, want.prefixes, 2, "one boundary per message")
	assert.Equal(t, []uint64{want.prefixes[0], want.prefixes[1]}, want.keep, "the whole and the one before are recorded")

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
	assert.Equal(t, []uint64{c1.prefixes[0], c1.prefixes[2]}, c1.keep)
	assert.Equal(t, c1.prefixes[0], c2.prefixes[0])
	tab := newAffinityTable(10, time.Minute)
	tab.record(c1, "s1", 0, time.Now())
	server, id := tab.lookup(c2, time.Now())
	assert.Equal(t, "s1", server)
	assert.NotZero(t, id)
}

func TestAffinityTableIsBounded(t *testing.T) {
	tab := newAffinityTable(6, time.Minute)
	now := time.Now()
	conv := func(keys ...uint64) conversation { return conversation{prefixes: keys, keep: keys} }
	serverOf := func(c conversation, at time.Time) string {
		s, _ := tab.lookup(c, at)
		return s
	}
	convs := make([]conversation, 10)
	for i := range convs {
		convs[i] = conv(uint64(100+2*i), uint64(101+2*i))
		tab.record(convs[i], fmt.Sprintf("server-%d", i), 0, now)
		assert.LessOrEqual(t, tab.len(), 6)
		assert.LessOrEqual(t, tab.active.Len(), 6)
	}
	assert.Equal(t, 6, tab.len(), "two entries per record, the oldest out first")
	assert.Equal(t, 6, tab.active.Len(), "as many conversations at most")
	assert.Equal(t, "", serverOf(convs[0], now), "recorded first: evicted")
	assert.Equal(t, "server-9", serverOf(convs[9], now))
	assert.Equal(t, "server-7", serverOf(conv(convs[7].prefixes[0], 999, 998), now), "the longest recorded prefix")

	// Recording again refreshes an entry: it is not the next one out.
	tab.record(convs[7], "server-7b", 0, now)
	tab.record(conv(1, 2), "x", 0, now)
	tab.record(conv(3, 4), "x", 0, now)
	assert.Equal(t, "server-7b", serverOf(convs[7], now))
	assert.Equal(t, "", serverOf(convs[8], now))

	// Entries expire.
	assert.Equal(t, "", serverOf(conv(1, 2), now.Add(time.Minute+time.Second)))
	assert.Equal(t, 4, tab.len(), "an expired entry found is dropped")

	// A request probes at most affinityMaxProbes prefixes.
	long := make([]uint64, affinityMaxProbes+5)
	for i := range long {
		long[i] = uint64(10_000 + i)
	}
	tab.record(conv(long[0]), "deep", 0, now)
	assert.Equal(t, "", serverOf(conv(long...), now))
	assert.Equal(t, "deep", serverOf(conv(long[:affinityMaxProbes]...), now))
}

func TestAffinityTableCountsConversationsPerServer(t *testing.T) {
	tab := newAffinityTable(100, time.Hour)
	now := time.Now()
	a, b, c := testBackend("a", nil), testBackend("b", nil), testBackend("c", nil)
	list := []*backend{a, b, c}
	turn1 := conversation{prefixes: []uint64{1, 2}, keep: []uint64{1, 2}}
	tab.record(turn1, a.srv.key, 0, now)
	assert.Equal(t, []string{"b", "c"}, names(tab.leastHosting(list, now)))
	// The next turn carries the conversation's id: still one conversation.
	server, id := tab.lookup(conversation{prefixes: []uint64{1, 2, 3, 4}}, now)
	require.Equal(t, a.srv.key, server)
	require.NotZero(t, id)
	turn2 := conversation{prefixes: []uint64{1, 2, 3, 4}, keep: []uint64{3, 4}}
	tab.record(turn2, a.srv.key, id, now)
	tab.record(conversation{prefixes: []uint64{9}, keep: []uint64{9}}, b.srv.key, 0, now)
	assert.Equal(t, []string{"c"}, names(tab.leastHosting(list, now)))
	// It moved to c (an overflow): a holds none now.
	tab.record(conversation{prefixes: []uint64{5}, keep: []uint64{5}}, c.srv.key, id, now)
	assert.Equal(t, []string{"a"}, names(tab.leastHosting(list, now)))
	assert.Len(t, tab.hosting, 2, "a holds none")
	assert.Equal(t, 1, tab.hosting[c.srv.key].n)
	// A conversation weighs less as its last turn ages: b's, a minute old,
	// weighs half of a new one on c.
	later := now.Add(recentHalfLife)
	tab.record(conversation{prefixes: []uint64{20}, keep: []uint64{20}}, c.srv.key, 0, later)
	tab.record(conversation{prefixes: []uint64{30}, keep: []uint64{30}}, a.srv.key, 0, later)
	assert.InDelta(t, 0.5, tab.hosting[b.srv.key].weight(later), 1e-9)
	assert.InDelta(t, 1.5, tab.hosting[c.srv.key].weight(later), 1e-9)
	assert.Equal(t, []string{"b"}, names(tab.leastHosting(list, later)), "a holds one conversation as new as c's newest, b an older one")
	// Idle conversations stop counting.
	assert.Equal(t, []string{"a", "b", "c"}, names(tab.leastHosting(list, later.Add(activeWindow+time.Second))))
	assert.Empty(t, tab.hosting)
	assert.Zero(t, tab.active.Len())
}

func TestCaddyfileConversationAffinity(t *testing.T) {
	for in, want := range map[string]bool{"": true, " on": true, " true": true, " off": false, " false": false} {
		d := caddyfile.NewTestDispenser("ollamaflow {\n\tconversation_affinity" + in + "\n\tbackend a localhost\n}")
		var h Handler
		require.NoError(t, h.UnmarshalCaddyfile(d), in)
		require.NotNil(t, h.ConversationAffinity, in)
		assert.Equal(t, want, *h.ConversationAffinity, in)
	}
	for _, in := range []string{" maybe", " on off"} {
		d := caddyfile.NewTestDispenser("ollamaflow {\n\tconversation_affinity" + in + "\n\tbackend a localhost\n}")
		var h Handler
		err := h.UnmarshalCaddyfile(d)
		require.Error(t, err, in)
		assert.Contains(t, err.Error(), "conversation_affinity: want", in)
		assert.Contains(t, err.Error(), "Testfile:2", in)
	}
}

// turn is one request of a conversation through the proxy: the messages so
// far plus a new question; it returns the answer's backend, route and text.
func turn(t *testing.T, path string, msgs *[]map[string]string, question string, hdr ...string) (backend, route string) {
	t.Helper()
	*msgs = append(*msgs, map[string]string{"role": "user", "content": question})
	body, err := json.Marshal(map[string]any{"model": "tiny-llama", "messages": *msgs, "stream": false})
	require.NoError(t, err)
	res, answer := post(t, path, string(body), hdr...)
	require.Equal(t, http.StatusOK, res.StatusCode, answer)
	text := gjson.Get(answer, "message.content").String()
	if path == "/v1/chat/completions" {
		text = gjson.Get(answer, "choices.0.message.content").String()
	}
	require.NotEmpty(t, text)
	*msgs = append(*msgs, map[string]string{"role": "assistant", "content": text})
	return res.Header.Get("X-OllamaFlow-Backend"), res.Header.Get("X-OllamaFlow-Route")
}

func affinityFakes(t *testing.T, n int, cfg fakeollama.Config, block string) ([]*fakeollama.Server, map[string]*fakeollama.Server, string) {
	t.Helper()
	cfg.Models = []string{"tiny-llama"}
	var fs []*fakeollama.Server
	byName := map[string]*fakeollama.Server{}
	var lines []string
	for i := range n {
		f := fakeollama.New(cfg)
		t.Cleanup(f.Close)
		name := string(rune('a' + i))
		fs = append(fs, f)
		byName[name] = f
		lines = append(lines, fmt.Sprintf("backend %s %s {\n%s\n}", name, f.URL, block))
	}
	return fs, byName, strings.Join(lines, "\n")
}

func TestIntegrationConversationAffinity(t *testing.T) {
	// Each fake has a cache slot for every conversation, whatever the
	// policy's spread; the proxy lets two in at once.
	fs, byName, lines := affinityFakes(t, 3, fakeollama.Config{Tokens: 3, Parallel: 6, MultiUserCache: true}, "max_parallel 2")
	loadCaddy(t, "name affinity-test\n"+lines)
	waitKnown(t, fs)
	hits := max(scrape(t, `ollamaflow_affinity_total{frontend="affinity-test",outcome="hit"}`), 0)

	// Six conversations of four turns, interleaved, on both APIs: every
	// follow-up goes where its first turn went, without any header.
	type conv struct {
		path string
		msgs []map[string]string
		home string
	}
	var convs []*conv
	for i := range 6 {
		path := "/api/chat"
		if i%2 == 1 {
			path = "/v1/chat/completions"
		}
		// Distinct from the first token: conversations share no prefix.
		system := []string{"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}[i] + " is your name"
		c := &conv{path: path, msgs: []map[string]string{{"role": "system", "content": system}}}
		var route string
		c.home, route = turn(t, path, &c.msgs, "hello")
		assert.Equal(t, routePolicy, route, "a new conversation")
		convs = append(convs, c)
	}
	homes := map[string]int{}
	for _, c := range convs {
		homes[c.home]++
	}
	assert.Equal(t, map[string]int{"a": 2, "b": 2, "c": 2}, homes, "new conversations spread over servers about as fast")
	for round := range 3 {
		for i, c := range convs {
			got, route := turn(t, c.path, &c.msgs, fmt.Sprintf("question %d", round))
			assert.Equal(t, c.home, got, "conversation %d moved on turn %d", i, round+2)
			assert.Equal(t, routeAffinityHit, route)
		}
	}
	assert.Equal(t, hits+18, scrape(t, `ollamaflow_affinity_total{frontend="affinity-test",outcome="hit"}`))

	// Each fake found every follow-up in its cache.
	var lookups, hitsInCache, evaluated int
	for _, f := range byName {
		st := f.PromptCacheStats()
		lookups += st.Lookups
		hitsInCache += st.Hits
		evaluated += st.EvaluatedTokens
	}
	assert.Equal(t, 24, lookups)
	assert.Equal(t, 18, hitsInCache, "every follow-up reused its conversation's prefix")
	assert.Equal(t, 6*(4+1)+18*2, evaluated, "first turns evaluated whole, follow-ups only their question")

	// A case variant of the same conversation is the same conversation.
	c := convs[0]
	variant := strings.ReplaceAll(strings.ReplaceAll(mustJSON(t, map[string]any{"model": "tiny-llama", "messages": append(c.msgs, map[string]string{"role": "user", "content": "again"}), "stream": false}), `"role"`, `"ROLE"`), `"content"`, `"Content"`)
	res, body := post(t, "/api/chat", variant)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, c.home, res.Header.Get("X-OllamaFlow-Backend"))
	assert.Equal(t, routeAffinityHit, res.Header.Get("X-OllamaFlow-Route"))

	// The conversation's server at its cap: the next turn overflows to
	// another server, and that one is its server from then on.
	home := byName[c.home]
	home.Hold("/api/chat")
	filler := mustJSON(t, map[string]any{"model": "tiny-llama", "messages": append(c.msgs, map[string]string{"role": "user", "content": "filler"}), "stream": false})
	held := make(chan string, 2)
	for range 2 {
		go func() {
			res, body := post(t, "/api/chat", filler)
			held <- res.Header.Get("X-OllamaFlow-Backend") + " " + body[:0]
		}()
	}
	require.Eventually(t, func() bool { return home.InFlight() == 2 }, 10*time.Second, 5*time.Millisecond, "both fillers go home")
	got, route := turn(t, c.path, &c.msgs, "while busy")
	assert.Equal(t, routeAffinityOverflow, route)
	assert.NotEqual(t, c.home, got)
	home.Release()
	assert.Equal(t, c.home+" ", <-held)
	assert.Equal(t, c.home+" ", <-held)
	// The proxy frees a slot just after the client has the last byte: wait
	// until every server is idle, so that the comparison below is between
	// idle servers and not a race with a release.
	require.Eventually(t, func() bool {
		for name := range byName {
			if scrape(t, fmt.Sprintf(`ollamaflow_backend_in_flight{backend=%q,frontend="affinity-test"}`, name)) != 0 {
				return false
			}
		}
		return true
	}, 10*time.Second, 5*time.Millisecond, "every slot released")
	again, route := turn(t, c.path, &c.msgs, "after")
	assert.Equal(t, got, again, "recorded where it overflowed to")
	assert.Equal(t, routeAffinityHit, route)
	assert.Positive(t, scrape(t, `ollamaflow_affinity_total{frontend="affinity-test",outcome="overflow"}`))
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return string(b)
}

func TestIntegrationConversationAffinityOffAndSticky(t *testing.T) {
	fs, _, lines := affinityFakes(t, 3, fakeollama.Config{Tokens: 2}, "")
	loadCaddy(t, "lb_policy round_robin\n"+lines) // off by default with round_robin
	waitKnown(t, fs)
	msgs := []map[string]string{{"role": "system", "content": "s"}}
	seen := map[string]bool{}
	for i := range 3 {
		b, route := turn(t, "/api/chat", &msgs, fmt.Sprint("q", i))
		assert.Equal(t, routePolicy, route)
		seen[b] = true
	}
	assert.Len(t, seen, 3, "round robin, no affinity: the turns go around")

	loadCaddy(t, "lb_policy least_conn\nconversation_affinity off\n"+lines)
	waitKnown(t, fs)
	msgs = []map[string]string{{"role": "system", "content": "s"}}
	for i := range 3 {
		_, route := turn(t, "/api/chat", &msgs, fmt.Sprint("q", i))
		assert.Equal(t, routePolicy, route, "off")
	}

	// Sticky sessions win when the request carries a key; without one,
	// affinity applies.
	loadCaddy(t, "lb_policy round_robin\nconversation_affinity\nsticky {\n headers x-conversation-id\n}\n"+lines)
	waitKnown(t, fs)
	msgs = []map[string]string{{"role": "system", "content": "s"}}
	first, route := turn(t, "/api/chat", &msgs, "q", "X-Conversation-Id", "c1")
	assert.Equal(t, routeStickyHit, route)
	for i := range 3 {
		b, route := turn(t, "/api/chat", &msgs, fmt.Sprint("q", i), "X-Conversation-Id", "c1")
		assert.Equal(t, routeStickyHit, route)
		assert.Equal(t, first, b)
	}
	msgs = []map[string]string{{"role": "system", "content": "t"}}
	first, route = turn(t, "/api/chat", &msgs, "q")
	assert.Equal(t, routePolicy, route)
	for i := range 3 {
		b, route := turn(t, "/api/chat", &msgs, fmt.Sprint("q", i))
		assert.Equal(t, routeAffinityHit, route)
		assert.Equal(t, first, b, "round robin would have moved it")
	}
	res, _ := post(t, "/api/chat", chatFor("tiny-llama"))
	assert.Equal(t, "none", res.Header.Get("X-OllamaFlow-Sticky"))
}

func TestNearBestKeepsServersAboutAsFast(t *testing.T) {
	fast, slow, fresh, busy := testBackend("fast", nil), testBackend("slow", nil), testBackend("fresh", nil), testBackend("busy", nil)
	now := time.Now()
	fast.srv.inFlight.Store(1)
	serve(fast, &job{}, now, final(100*time.Millisecond, 0, 0, 10, 1))
	fast.srv.inFlight.Store(2) // the second of two waited: one slot
	serve(fast, &job{}, now, final(100*time.Millisecond, 0, 100*time.Millisecond, 10, 1))
	fast.srv.inFlight.Store(0)
	slow.srv.inFlight.Store(1)
	serve(slow, &job{}, now, final(400*time.Millisecond, 0, 0, 10, 1))
	slow.srv.inFlight.Store(0)
	busy.srv.inFlight.Store(1)
	list := []*backend{fast, slow, fresh, busy}
	h := &Handler{}
	assert.Equal(t, []string{"fast", "fresh"}, names(h.nearBest(list, &job{}, affinityFactor, affinityMargin)),
		"never a server four times slower; an unobserved idle one is a candidate")
	slowish := testBackend("slowish", nil)
	slowish.srv.inFlight.Store(1)
	serve(slowish, &job{}, now, final(200*time.Millisecond, 0, 0, 10, 1))
	slowish.srv.inFlight.Store(0)
	assert.Equal(t, []string{"fast", "slowish"}, names(h.nearBest([]*backend{fast, slowish, slow}, &job{}, affinityFactor, affinityMargin)),
		"within 1.5x the best plus 50ms")
	fast.srv.inFlight.Store(3) // 4 rounds of 0.1s
	assert.Equal(t, []string{"fast", "slow"}, names(h.nearBest([]*backend{fast, slow}, &job{}, affinityFactor, affinityMargin)))
	assert.Equal(t, []string{"fresh"}, names(h.nearBest([]*backend{fresh, busy}, &job{}, affinityFactor, affinityMargin)), "no speeds: the least busy")
}

func TestConversationAffinityDefaultsByPolicy(t *testing.T) {
	on, off := true, false
	for _, c := range []struct {
		policy string
		set    *bool
		want   bool
	}{
		{"least_delay", nil, true}, {"least_conn", nil, true},
		{"round_robin", nil, false}, {"random", nil, false}, {"first", nil, false},
		{"least_delay", &off, false}, {"round_robin", &on, true},
	} {
		h := &Handler{LBPolicy: c.policy, ConversationAffinity: c.set}
		assert.Equal(t, c.want, h.affinityOn(), "%s %v", c.policy, c.set)
	}
}

// escapeLetters rewrites every ASCII letter inside the JSON strings of s
// (keys and values) as a \u escape, and puts a space after every ':' and
// ',' outside strings: the same document to encoding/json.
func escapeLetters(s []byte) []byte {
	var out []byte
	in, esc, hex := false, false, 0
	for _, c := range s {
		switch {
		case hex > 0: // the digits of a \u escape stay as they are
			hex--
			out = append(out, c)
		case in && esc:
			esc = false
			if c == 'u' {
				hex = 4
			}
			out = append(out, c)
		case in && c == '\\':
			esc = true
			out = append(out, c)
		case in && c == '"':
			in = false
			out = append(out, c)
		case in && (c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'):
			out = fmt.Appendf(out, `\u%04x`, c)
		case !in && c == '"':
			in = true
			out = append(out, c)
		case !in && (c == ':' || c == ','):
			out = append(out, c, ' ')
		default:
			out = append(out, c)
		}
	}
	return out
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
		if !json.Valid(body) || got.none() {
			return
		}
		variant := escapeLetters(body)
		if !json.Valid(variant) {
			t.Fatalf("escaping broke the body: %q -> %q", body, variant)
		}
		if v := conversationOf(p, "m:latest", variant); !assert.ObjectsAreEqual(got.prefixes, v.prefixes) {
			t.Fatalf("escaped letters and spaces changed the hashes:\n%q\n%q\n%v\n%v", body, variant, got.prefixes, v.prefixes)
		}
	})
}
