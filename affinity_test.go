package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func TestAffinityTableIsBounded(t *testing.T) {
	tab := newAffinityTable(6, time.Minute)
	now := time.Now()
	conv := func(keys ...uint64) conversation { return conversation{prefixes: keys, keep: keys} }
	serverOf := func(c conversation, at time.Time) string {
		s, _, _ := tab.lookup(c, at)
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
	assert.Equal(t, []string{"b", "c"}, names(tab.keepLeastHosting(slices.Clone(list), now)))
	// The next turn carries the conversation's id: still one conversation.
	server, id, depth := tab.lookup(conversation{prefixes: []uint64{1, 2, 3, 4}}, now)
	require.Equal(t, 1, depth)
	require.Equal(t, a.srv.key, server)
	require.NotZero(t, id)
	turn2 := conversation{prefixes: []uint64{1, 2, 3, 4}, keep: []uint64{3, 4}}
	tab.record(turn2, a.srv.key, id, now)
	tab.record(conversation{prefixes: []uint64{9}, keep: []uint64{9}}, b.srv.key, 0, now)
	assert.Equal(t, []string{"c"}, names(tab.keepLeastHosting(slices.Clone(list), now)))
	// It moved to c (an overflow): a holds none now.
	tab.record(conversation{prefixes: []uint64{5}, keep: []uint64{5}}, c.srv.key, id, now)
	assert.Equal(t, []string{"a"}, names(tab.keepLeastHosting(slices.Clone(list), now)))
	assert.Len(t, tab.hosting, 2, "a holds none")
	assert.Equal(t, 1, tab.hosting[c.srv.key].recent.Len())
	// A conversation weighs less as its last turn ages: b's, a minute old,
	// weighs half of a new one on c.
	later := now.Add(recentHalfLife)
	tab.record(conversation{prefixes: []uint64{20}, keep: []uint64{20}}, c.srv.key, 0, later)
	tab.record(conversation{prefixes: []uint64{30}, keep: []uint64{30}}, a.srv.key, 0, later)
	assert.InDelta(t, 0.5, tab.hosting[b.srv.key].weight(later), 1e-9)
	assert.InDelta(t, 1.5, tab.hosting[c.srv.key].weight(later), 1e-9)
	assert.Equal(t, []string{"b"}, names(tab.keepLeastHosting(slices.Clone(list), later)), "a holds one conversation as new as c's newest, b an older one")
	// Idle conversations stop counting.
	assert.Equal(t, []string{"a", "b", "c"}, names(tab.keepLeastHosting(slices.Clone(list), later.Add(activeWindow+time.Second))))
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
	// policy's spread; the proxy lets two in at once. Their prompt time
	// (20 ms, and 2 ms a token not cached) is what the servers' speeds
	// are learned from, not a millisecond of scheduling noise: with none,
	// a follow-up whose server had one answer slowed by a loaded machine
	// looked more than a tie slower than the others and overflowed (4 in
	// 25 runs beside three CPU burners on two cores; 0 in 25 with these
	// times), and the cache its server holds is worth the 2 ms a token it
	// saves.
	fs, byName, lines := affinityFakes(t, 3, fakeollama.Config{Tokens: 3, Parallel: 6, MultiUserCache: true,
		FirstByteDelay: 20 * time.Millisecond, PromptTokenCost: 2 * time.Millisecond}, "max_parallel 2")
	loadCaddy(t, "name affinity-test\n"+lines)
	waitKnown(t, fs)
	hits := max(scrape(t, `ollamaflow_affinity_total{frontend="affinity-test",outcome="hit"}`), 0)
	run := time.Now().UnixNano()

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
		// The run's own mark keeps a repeated run (-count) from finding
		// the last one's conversations in the frontend's table, which
		// outlives a reload on purpose.
		system := fmt.Sprintf("%s is your name run%d", []string{"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}[i], run)
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
	assert.Equal(t, 6*(5+1)+18*2, evaluated, "first turns evaluated whole, follow-ups only their question")

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

// The affinity step of a completion's routing, per request (README,
// "Conversation affinity"):
//
//	go test -run '^$' -bench BenchmarkAffinity -benchmem .
//
// new: a conversation not seen before, spread over the servers about as
// fast as the best that hold the fewest recent conversations; next: a
// follow-up turn weighed against the best server. Every server has been
// observed and the table holds 300 conversations.
func BenchmarkAffinity(b *testing.B) {
	for _, n := range []int{3, 10, 100} {
		h := selectionPool(n, "least_delay")
		h.affinity = newAffinityTable(affinityMaxEntries, affinityTTL)
		now := time.Now()
		for i := range 300 {
			c := conversationOf("/api/chat", "tiny-llama:latest", []byte(fmt.Sprintf(`{"messages":[{"role":"user","content":"hello %d"}]}`, i)))
			h.affinity.record(c, h.backends[i%n].srv.key, 0, now)
		}
		var avail []*backend
		for _, be := range h.backends {
			if be.srv.models.Load().isLoaded("tiny-llama:latest") {
				avail = append(avail, be)
			}
		}
		body := `{"messages":[{"role":"system","content":"` + strings.Repeat("Be brief. ", 50) + `"},{"role":"user","content":"new question"}]}`
		fresh := conversationOf("/api/chat", "tiny-llama:latest", []byte(body))
		j := newJob("tiny-llama:latest", apiOllama, []byte(body))
		b.Run(fmt.Sprintf("new/backends=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				be, _, _ := h.acquireConversation(avail, fresh, j)
				if be == nil {
					b.Fatal("no backend")
				}
				be.srv.release()
			}
		})
		first := conversationOf("/api/chat", "tiny-llama:latest", []byte(`{"messages":[{"role":"user","content":"hi"}]}`))
		h.affinity.record(first, avail[0].srv.key, 0, now)
		next := conversationOf("/api/chat", "tiny-llama:latest", []byte(`{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}`))
		b.Run(fmt.Sprintf("next/backends=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				be, _, _ := h.acquireConversation(avail, next, j)
				if be == nil {
					b.Fatal("no backend")
				}
				be.srv.release()
			}
		})
	}
}

func TestCacheHitsDoNotTeachThePromptRate(t *testing.T) {
	home, other := ruleBackend("home", 0), ruleBackend("other", 0)
	rate := func(b *backend) float64 {
		r, _, ok := b.srv.speed.promptCost("m")
		require.True(t, ok)
		return r
	}
	require.InDelta(t, 0.001, rate(home), 1e-9)
	// A follow-up affinity sent to its cache: Ollama counts all 1000
	// prompt tokens but evaluated a few in 5 ms.
	hit := &job{model: "m", promptChars: 4000, maxOutput: 10}
	hit.cachedOn = &home.srv.speed
	home.srv.inFlight.Store(1)
	serve(home, hit, time.Now(), finalGen(5*ms, 10*ms, 0, 0, 1000, 10))
	assert.InDelta(t, 0.001, rate(home), 1e-9, "a cache hit's timing is not the server's prompt rate")
	// The same request on another server (a retry) evaluated its prompt.
	other.srv.inFlight.Store(1)
	serve(other, hit, time.Now().Add(time.Minute), finalGen(2000*ms, 10*ms, 0, 0, 1000, 10))
	assert.InDelta(t, 0.002, rate(other), 1e-9)
}

func TestIntegrationAffinityWithAPromptCache(t *testing.T) {
	// Servers whose prompt evaluation costs 200 µs a token, except what a
	// cache slot holds (Ollama's default slot choice).
	fs, byName, lines := affinityFakes(t, 2, fakeollama.Config{Tokens: 3, Parallel: 4, PromptTokenCost: 200 * time.Microsecond}, "")
	loadCaddy(t, "name affinity-cache\n"+lines)
	waitKnown(t, fs)

	// Two conversations with a 1,000-token system prompt: one per server,
	// and each follow-up turn back to its cache, which spares the history.
	type conv struct {
		msgs []map[string]string
		home string
	}
	var convs []*conv
	for _, name := range []string{"alpha", "beta"} {
		c := &conv{msgs: []map[string]string{{"role": "system", "content": name + " " + fakeollama.Text(1000)}}}
		var route string
		c.home, route = turn(t, "/api/chat", &c.msgs, "hello")
		require.Equal(t, routePolicy, route)
		convs = append(convs, c)
	}
	require.NotEqual(t, convs[0].home, convs[1].home, "new conversations spread")
	for round := range 3 {
		for i, c := range convs {
			got, route := turn(t, "/api/chat", &c.msgs, fmt.Sprintf("question %d", round))
			assert.Equal(t, c.home, got, "conversation %d moved on turn %d", i, round+2)
			assert.Equal(t, routeAffinityHit, route)
		}
	}
	for name, f := range byName {
		st := f.PromptCacheStats()
		assert.Equal(t, 4, st.Lookups, name)
		assert.Equal(t, 3, st.Hits, "%s: every follow-up found its history", name)
		assert.GreaterOrEqual(t, st.CachedTokens, 3*1000, name)
		assert.Less(t, st.EvaluatedTokens, 1000+3*20, "%s: the history was evaluated once", name)
	}
	// The hits did not teach the servers that prompts are free: each still
	// reckons its 1,000-token first turn's rate (200 µs a token or more).
	for _, f := range fs {
		rate, _, ok := pooled(t, f.URL).speed.promptCost("tiny-llama:latest")
		require.True(t, ok)
		assert.GreaterOrEqual(t, rate, 150e-6, f.URL)
	}
}

// A server keeps one conversation's cache per parallel slot: once as many
// other conversations as it has slots were sent there after a
// conversation's last turn, that cache is gone, and the next turn is
// placed as a new conversation (where it evicts no other's cache), not
// kept on its old server for a saving it will not get.
func TestAffinityKnowsWhenTheCacheWasEvicted(t *testing.T) {
	now := time.Now()
	two := func(name string) *backend {
		return testBackend(name, func(c *Backend) { c.MaxParallel = 2 })
	}
	a, b := two("a"), two("b")
	tab := newAffinityTable(100, time.Hour)
	convA := conversation{prefixes: []uint64{1}, keep: []uint64{1}}
	tab.record(convA, a.srv.key, 0, now)
	_, idA, _ := tab.lookup(conversation{prefixes: []uint64{1, 2}}, now)
	require.NotZero(t, idA)
	tab.record(conversation{prefixes: []uint64{10}, keep: []uint64{10}}, a.srv.key, 0, now)
	assert.False(t, tab.evictedFrom(a, idA, now), "one other conversation on two slots: both are cached")
	tab.record(conversation{prefixes: []uint64{20}, keep: []uint64{20}}, b.srv.key, 0, now)
	assert.False(t, tab.evictedFrom(a, idA, now), "another server's conversation takes no slot here")
	tab.record(conversation{prefixes: []uint64{30}, keep: []uint64{30}}, a.srv.key, 0, now)
	assert.True(t, tab.evictedFrom(a, idA, now), "two others since on two slots: evicted")
	assert.False(t, tab.evictedFrom(b, idA, now), "its last turn went to a, not b")
	// A turn of an old conversation takes a slot as a new one does: the
	// conversation 10, sent again, makes 30 and 10 the two cached.
	_, id10, _ := tab.lookup(conversation{prefixes: []uint64{10, 11}}, now)
	tab.record(conversation{prefixes: []uint64{10, 11}, keep: []uint64{11}}, a.srv.key, id10, now)
	assert.False(t, tab.evictedFrom(a, id10, now))

	// Slots learned only from a quiet history bound nothing: the server
	// may have more than were ever in use, so nothing is taken for evicted.
	learned := testBackend("learned", nil)
	learned.srv.inFlight.Store(1)
	serve(learned, &job{}, now.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	learned.srv.inFlight.Store(0)
	slots, bounded := learned.cacheSlots()
	require.False(t, bounded)
	require.Equal(t, 1, slots, "the slots seen in use")
	tab.record(conversation{prefixes: []uint64{40}, keep: []uint64{40}}, learned.srv.key, 0, now)
	_, id40, _ := tab.lookup(conversation{prefixes: []uint64{40, 41}}, now)
	for k := range 3 {
		tab.record(conversation{prefixes: []uint64{uint64(50 + k)}, keep: []uint64{uint64(50 + k)}}, learned.srv.key, 0, now)
	}
	assert.False(t, tab.evictedFrom(learned, id40, now))
	// One request seen waiting behind one in flight: one slot at most.
	release := hold(learned, 1, now)
	learned.srv.inFlight.Add(1)
	serve(learned, &job{}, now, final(100*ms, 0, 100*ms, 10, 1))
	learned.srv.inFlight.Add(-1)
	release()
	slots, bounded = learned.cacheSlots()
	require.True(t, bounded)
	require.Equal(t, 1, slots)
	assert.True(t, tab.evictedFrom(learned, id40, now))

	// Through acquireConversation: the follow-up of the evicted
	// conversation is routed as evicted, to the server where it evicts
	// nobody (b holds one conversation on two slots; a is full).
	h := &Handler{affinity: tab, policy: pickLeastDelay, LBPolicy: "least_delay"}
	next := conversation{prefixes: []uint64{1, 2}, keep: []uint64{2}, followUp: true, sizes: []prefixSize{{400, 0}, {500, 0}}}
	got, route, id := h.acquireConversation([]*backend{a, b}, next, &job{})
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, routeAffinityEvicted, route)
	assert.Equal(t, idA, id, "still the same conversation")
	assert.Equal(t, "b", got.cfg.Name)
}
