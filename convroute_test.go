package ollamaflow

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ruleBackend is a server that has learned 1 ms per prompt token at 4
// characters a token and 1 ms per generated token, with one slot proven
// (two planned; a request that would take the second counts it half: see
// estimateLocked) and inFlight requests on it.
func ruleBackend(name string, inFlight int64) *backend {
	b := testBackend(name, nil)
	b.srv.models.Store(psWith("m"))
	now := time.Now()
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "m", promptChars: 400, maxOutput: 10}, now, finalGen(100*ms, 10*ms, 0, 0, 100, 10))
	b.srv.inFlight.Store(inFlight)
	return b
}

func TestAffinityKeepsWhatTheCacheSaves(t *testing.T) {
	h := &Handler{}
	history := longHistory() // 2000 chars of system prompt: 500 tokens, 0.5 s
	chatOf := func(msgs []map[string]string) ([]byte, conversation) { return chatTurn(t, msgs) }
	_, prevTurn := chatOf(history[:len(history)-1])
	body, conv := chatOf(append(slices.Clone(history), map[string]string{"role": "user", "content": "next question"}))
	j := newJob("m", apiOllama, body)
	tab := newAffinityTable(100, time.Hour)
	tab.record(prevTurn, "http://home:11434", 0, time.Now())
	key, _, depth := tab.lookup(conv, time.Now())
	require.Equal(t, "http://home:11434", key)
	require.Equal(t, len(conv.prefixes)-3, depth, "the previous turn's messages")
	require.True(t, conv.followUp)

	// home has eight requests in flight (about 0.4 s of wait on its two
	// slots, seen serving two and making a third wait), other none: home
	// still wins by the 0.5 s of prompt it need not evaluate.
	home, other := ruleBackend("home", 8), ruleBackend("other", 0)
	home.srv.speed.slotsLo, home.srv.speed.slotsHi, home.srv.speed.hiAt = 2, 2, time.Now()
	dHome, _ := h.estimateOf(home, j)
	dOther, _ := h.estimateOf(other, j)
	require.Greater(t, dHome.wait, 0.35)
	require.Greater(t, dHome.total(), dOther.total()*1.5+0.05, "beyond the old 1.5x + 50 ms rule")
	assert.Same(t, home, keptBackend(h.keepsConversation([]*backend{other, home}, key, conv, depth, j, 0)), "a long shared prefix stays despite a busier server")

	// The same turn with a short history saves little: it moves.
	short := []map[string]string{{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}}
	sbody, sconv := chatOf(short)
	_, sprev := chatOf(short[:1])
	tab.record(sprev, "http://home:11434", 0, time.Now())
	skey, _, sdepth := tab.lookup(sconv, time.Now())
	require.Equal(t, "http://home:11434", skey)
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{other, home}, skey, sconv, sdepth, newJob("m", apiOllama, sbody), 0)), "a short history is not worth the wait")

	// Without an earlier turn nothing is credited: the same long first
	// message from unrelated clients is kept on its server only on a tie,
	// and spreads as least_delay spreads.
	first, fconv := chatOf(history[:1])
	require.False(t, fconv.followUp)
	tab.record(fconv, "http://home:11434", 0, time.Now())
	fkey, _, fdepth := tab.lookup(fconv, time.Now())
	require.Equal(t, len(fconv.prefixes)-1, fdepth, "identical bodies: the whole request matches")
	fj := newJob("m", apiOllama, first)
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{other, home}, fkey, fconv, fdepth, fj, 0)), "busier: no preference")
	home.srv.inFlight.Store(0) // both idle: a tie
	assert.Same(t, home, keptBackend(h.keepsConversation([]*backend{other, home}, fkey, fconv, fdepth, fj, 0)), "a tie keeps it")
	home.srv.inFlight.Store(2) // the next one waits there
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{other, home}, fkey, fconv, fdepth, fj, 0)))

	// The saving is at most the prompt's time: a server slower at
	// everything by more than that loses the conversation.
	slow := testBackend("slow", nil)
	slow.srv.models.Store(psWith("m"))
	slow.srv.inFlight.Store(1)
	serve(slow, &job{model: "m", promptChars: 400, maxOutput: 10}, time.Now(), finalGen(100*ms, 2000*ms, 0, 0, 100, 10))
	slow.srv.inFlight.Store(0)
	tab.record(prevTurn, slow.srv.key, 0, time.Now())
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{other, slow}, slow.srv.key, conv, depth, j, 0)), "2 s more of generation outweighs 0.5 s of prompt")
	// Gone from the candidates (unhealthy, at its cap): the policy chooses.
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{other}, key, conv, depth, j, 0)))
	// Servers not observed: it stays while no busier than the least busy.
	fresh, fresh2 := testBackend("fresh", nil), testBackend("fresh2", nil)
	assert.Same(t, fresh, keptBackend(h.keepsConversation([]*backend{fresh2, fresh}, fresh.srv.key, conv, depth, j, 0)))
	fresh.srv.inFlight.Store(1)
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fresh2, fresh}, fresh.srv.key, conv, depth, j, 0)))
}

func TestIntegrationIdenticalFirstMessagesSpread(t *testing.T) {
	// The same one-message chat from unrelated clients in a burst is no
	// conversation: it spreads over both servers as least_delay spreads,
	// instead of piling onto the server that served it first.
	fs, byName, lines := affinityFakes(t, 2, fakeollama.Config{Tokens: 2, Parallel: 8, FirstByteDelay: 300 * time.Millisecond, PromptTokenCost: 100 * time.Microsecond}, "")
	loadCaddy(t, "name affinity-burst\n"+lines)
	waitKnown(t, fs)
	for i := range 2 { // both servers observed (two new conversations spread)
		_, body := post(t, "/api/chat", fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"warm up %d"}],"stream":false}`, i))
		require.Contains(t, body, `"done":true`)
	}
	for name, f := range byName {
		require.Equal(t, 1, f.Count("/api/chat"), name)
		f.ResetStats()
		f.Hold("/api/chat")
	}
	inFlight := func() int {
		n := 0
		for _, f := range fs {
			n += int(f.InFlight())
		}
		return n
	}
	// One at a time, each held in flight before the next is sent: every
	// choice sees the work the earlier ones left.
	const n = 8
	served := make(chan string, n)
	for i := range n {
		go func() {
			res, _ := post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"Why is the sky blue?"}],"stream":false}`)
			served <- res.Header.Get("X-OllamaFlow-Backend")
		}()
		require.Eventually(t, func() bool { return inFlight() == i+1 }, 10*time.Second, time.Millisecond)
		// A server with two in flight (its planned slots) makes the next
		// one wait a whole request: the other, idle or less busy, wins.
		a, b := byName["a"].InFlight(), byName["b"].InFlight()
		assert.LessOrEqual(t, max(a, b)-min(a, b), 2, "after %d: a %d, b %d in flight", i+1, a, b)
	}
	for _, f := range fs {
		f.Release()
	}
	count := map[string]int{}
	for range n {
		count[<-served]++
	}
	assert.GreaterOrEqual(t, count["a"], 3, "%v", count)
	assert.GreaterOrEqual(t, count["b"], 3, "%v", count)
}

// With the breaker effectively off (a fail_threshold no server reaches),
// servers that answer only errors stay candidates and hold no conversation
// (each failed turn is recorded again where it is retried): the spreading
// of new conversations, which prefers the servers holding the fewest, must
// not send them there. Some failing servers were observed before they
// failed (their error share prices them), some never answered at all; the
// pool is above largePool, so the sampled path is the one tried.
func TestNewConversationsAvoidFailingServers(t *testing.T) {
	h := selectionPool(80, "least_delay")
	h.affinity = newAffinityTable(affinityMaxEntries, affinityTTL)
	now := time.Now()
	failing := map[string]bool{}
	for i, b := range h.backends {
		b.srv.models.Store(psWith("m"))
		switch {
		case i%10 == 3: // observed, then failing
			b.srv.failStreak.Store(40)
			for range 20 {
				b.srv.speed.noteAnswer(http.StatusInternalServerError, now)
			}
			failing[b.cfg.Name] = true
		case i%10 == 7: // never answered but with errors
			fresh := testBackend(b.cfg.Name, nil)
			fresh.srv.models.Store(psWith("m"))
			fresh.srv.state.Store(int32(stateHealthy))
			fresh.pos.Store(int64(i))
			fresh.srv.failStreak.Store(40)
			for range 20 {
				fresh.srv.speed.noteAnswer(http.StatusInternalServerError, now)
			}
			h.backends[i] = fresh
			failing[b.cfg.Name] = true
		default: // healthy, each holding a few conversations already
			for k := range 3 {
				c := conversationOf("/api/chat", "m", []byte(fmt.Sprintf(`{"messages":[{"role":"user","content":"old %d %d"}]}`, i, k)))
				h.affinity.record(c, b.srv.key, 0, now)
			}
		}
	}
	require.Len(t, failing, 16)
	avail := slices.Clone(h.backends)
	sentToFailing := 0
	for i := range 300 {
		body := []byte(fmt.Sprintf(`{"model":"m","messages":[{"role":"user","content":"new conversation %d"}]}`, i))
		c := conversationOf("/api/chat", "m", body)
		b, route, _ := h.acquireConversation(avail, c, newJob("m", apiOllama, body))
		require.NotNil(t, b)
		require.Equal(t, routePolicy, route)
		if failing[b.cfg.Name] {
			sentToFailing++
		}
		h.affinity.record(c, b.srv.key, 0, now)
		b.release()
	}
	assert.Zero(t, sentToFailing, "new conversations sent to servers answering only errors")
}

// A new conversation goes where it evicts least: a server holding fewer
// conversations than it has slots evicts none; when every server is full,
// the one whose conversation to evict has been idle longest (most likely
// ended), not one whose user is reading its last answer.
func TestNewConversationsEvictTheLongestIdle(t *testing.T) {
	now := time.Now()
	one := func(name string) *backend {
		return testBackend(name, func(c *Backend) { c.MaxParallel = 1 })
	}
	a, b, c := one("a"), one("b"), testBackend("c", func(c *Backend) { c.MaxParallel = 3 })
	tab := newAffinityTable(100, time.Hour)
	rec := func(p uint64, s *backend, at time.Time) {
		p *= 16 // distinct conversation ids (a record's id is its hash | 1)
		tab.record(conversation{prefixes: []uint64{p}, keep: []uint64{p}}, s.srv.key, 0, at)
	}
	rec(1, a, now.Add(-30*time.Second)) // ended, most likely
	rec(2, b, now.Add(-time.Second))    // its user is reading
	rec(3, c, now)
	rec(4, c, now)
	assert.Equal(t, []string{"c"}, names(tab.keepLeastHosting([]*backend{a, b, c}, now)), "c has a slot no conversation holds")
	rec(5, c, now)
	assert.Equal(t, []string{"a"}, names(tab.keepLeastHosting([]*backend{a, b, c}, now)), "a's conversation has been idle longest")
	assert.Equal(t, []string{"b"}, names(tab.keepLeastHosting([]*backend{b, c}, now)), "b's, idle for a second, before c's, busy now")
	// Idle alike: the fewest recent conversations decide, as before.
	rec(6, a, now.Add(-time.Second))
	assert.Equal(t, []string{"b"}, names(tab.keepLeastHosting([]*backend{a, b, c}, now)), "a had two conversations in the last half minute")
	rec(7, b, now.Add(-time.Second))
	assert.Equal(t, []string{"a"}, names(tab.keepLeastHosting([]*backend{a, b, c}, now)), "two each: a's older one weighs less")
}

// When every slot holds a conversation still going, a new one goes where a
// conversation already misses its cache, not where each finds its own.
func TestNewConversationsCrowdWhereACacheIsMissedAlready(t *testing.T) {
	now := time.Now()
	two := func(name string) *backend {
		return testBackend(name, func(c *Backend) { c.MaxParallel = 2 })
	}
	a, b, c := two("a"), two("b"), two("c")
	tab := newAffinityTable(100, time.Hour)
	rec := func(p uint64, s *backend, at time.Time) *convActivity {
		p *= 16
		return tab.record(conversation{prefixes: []uint64{p}, keep: []uint64{p}}, s.srv.key, 0, at)
	}
	rec(1, a, now.Add(-time.Second))
	rec(2, a, now)
	rec(3, b, now.Add(-time.Second))
	rec(4, b, now)
	rec(5, c, now.Add(-time.Second))
	rec(6, c, now)
	list := []*backend{a, b, c}
	assert.Equal(t, []string{"a", "b", "c"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "full alike, no cache missed: idle and weight decide")
	rec(7, b, now).found.Store(turnMissed)
	assert.Equal(t, []string{"b"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "b's conversations evict each other already")
	assert.Equal(t, []string{"a", "c"}, names(tab.keepLeastHosting([]*backend{a, c}, now)), "neither misses: as before")
	// Conversations that ended (idle for abandonedAfter) are evicted
	// first: nobody's next turn needs their cache.
	later := now.Add(abandonedAfter + time.Second)
	rec(11, b, later).found.Store(turnMissed)
	rec(12, c, later)
	rec(13, c, later)
	assert.Equal(t, []string{"a"}, names(tab.keepLeastHosting(slices.Clone(list), later)), "a's conversations ended")
	// A miss that long ago says nothing of now.
	again := later.Add(abandonedAfter + time.Second)
	for i, s := range list {
		rec(uint64(20+2*i), s, again)
		rec(uint64(21+2*i), s, again)
	}
	assert.NotContains(t, names(tab.keepLeastHosting(slices.Clone(list), again)), "b", "b's conversations weigh most, and its miss is old")
}

// A burst of one prompt on a fresh pool: the server the first request was
// recorded for keeps the next ones only as the request that measures it
// (claimProbe), so the burst does not pile onto it before the first of
// them has taken its slot.
func TestAffinityKeepsAnUnmeasuredServerOneRequestAtATime(t *testing.T) {
	h := &Handler{}
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"Why is the sky blue?"}]}`)
	conv := conversationOf("/api/chat", "m", body)
	tab := newAffinityTable(100, time.Hour)
	home, other := testBackend("home", nil), testBackend("other", nil) // neither measured yet
	tab.record(conv, home.srv.key, 0, time.Now())
	key, _, depth := tab.lookup(conv, time.Now())
	require.Equal(t, home.srv.key, key)
	all := []*backend{other, home}
	assert.Same(t, home, keptBackend(h.keepsConversation(all, key, conv, depth, newJob("m", apiOllama, body), 0)))
	// Its slot not taken yet: the next identical request is not kept.
	assert.Nil(t, keptBackend(h.keepsConversation(all, key, conv, depth, newJob("m", apiOllama, body), 0)))
}

// When every server about as fast as the best would evict a conversation's
// cache, a slower server with a free cache slot takes the new conversation
// if it costs less than the eviction (the evicted conversation's next turn
// evaluates its whole prompt again), and only then.
// learnedOneSlot is a server of one slot holding model m that has served
// one request of 100 prompt tokens (400 characters) and 10 answer tokens at
// the given seconds per token, a second before now.
func learnedOneSlot(name string, promptPerTok, genPerTok time.Duration, now time.Time) *backend {
	b := testBackend(name, func(c *Backend) { c.MaxParallel = 1 })
	b.srv.models.Store(psWith("m"))
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "m", promptChars: 400, maxOutput: 10}, now.Add(-time.Second), finalGen(100*promptPerTok, 10*genPerTok, 0, 0, 100, 10))
	b.srv.inFlight.Store(0)
	return b
}

func TestNewConversationWeighsTheEvictionAgainstASlowerServer(t *testing.T) {
	now := time.Now()
	fast, slower := learnedOneSlot("fast", ms, ms, now), learnedOneSlot("slower", 4*ms, 4*ms, now)
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"a new question of forty characters...."}],"options":{"num_predict":10}}`)
	j := newJob("m", apiOllama, body)
	dFast, _ := h.expectedDelayOf(fast, j)
	dSlower, _ := h.expectedDelayOf(slower, j)
	require.Greater(t, dSlower, dFast*spreadFactor+spreadMargin, "slower is outside the spreading band")
	require.Equal(t, []string{"fast"}, names(h.nearBest(&scratch{}, []*backend{fast, slower}, j, spreadFactor, spreadMargin)))

	// fast's one slot holds a conversation of 2,000 characters (500
	// tokens, 0.5 s to evaluate again): worth the slower server's extra.
	long := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"`+strings.Repeat("Be brief and exact. ", 100)+`"}]}`))
	h.affinity.record(long, fast.srv.key, 0, now)
	fresh := conversationOf("/api/chat", "m", body)
	b, route, _ := h.acquireConversation([]*backend{fast, slower}, fresh, j)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, routePolicy, route)
	assert.Equal(t, "slower", b.cfg.Name, "a 0.5 s eviction costs more than the slower server")

	// A short conversation there (10 tokens) is cheaper to evict than the
	// slower server's extra: the new one goes to fast.
	h.affinity = newAffinityTable(100, time.Hour)
	short := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"a short question of forty characters..."}]}`))
	h.affinity.record(short, fast.srv.key, 0, now)
	b, _, _ = h.acquireConversation([]*backend{fast, slower}, fresh, j)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "fast", b.cfg.Name)
}

// Where follow-up turns are known to be rare, a new conversation is placed
// as the policy places any request: the cache it would evict belongs to a
// conversation that most likely has no next turn, and gathering where a
// cache is missed already (keepLeastHosting) made requests wait for a slot
// on a server of one while a wide server had slots free (slots-unequal:
// 74.6-83.5 req/s in some runs, 90-92 once the policy chose).
func TestSingleTurnTrafficIsPlacedByThePolicy(t *testing.T) {
	now := time.Now()
	fast, slower := learnedOneSlot("fast", ms, ms, now), learnedOneSlot("slower", 4*ms, 4*ms, now)
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"a new question of forty characters...."}],"options":{"num_predict":10}}`)
	long := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"`+strings.Repeat("Be brief and exact. ", 100)+`"}]}`))
	h.affinity.record(long, fast.srv.key, 0, now)
	fresh := conversationOf("/api/chat", "m", body)
	place := func() string {
		b, route, _ := h.acquireConversation([]*backend{fast, slower}, fresh, newJob("m", apiOllama, body))
		require.NotNil(t, b)
		b.release()
		assert.Equal(t, routePolicy, route)
		return b.cfg.Name
	}
	// Not known yet (a fresh pool's first conversations are all first
	// turns): the eviction of fast's long conversation is weighed.
	for range int(1/followWeight) - 2 {
		h.affinity.noteTurn(false)
	}
	require.False(t, h.affinity.singleTurn())
	assert.Equal(t, "slower", place(), "the eviction is weighed while the traffic is not known")
	// place noted one more first turn; one more makes the window full.
	h.affinity.noteTurn(false)
	require.True(t, h.affinity.singleTurn())
	assert.Equal(t, "fast", place(), "single-turn: nothing of fast's cache is used again")
	// Follow-ups come back: conversations are priced as such again.
	for range 8 {
		h.affinity.noteTurn(true)
	}
	require.False(t, h.affinity.singleTurn())
	assert.Equal(t, "slower", place())
}

// The same first message again (a prompt many clients send, a retried
// request) is no conversation either where follow-ups are rare: the
// policy places it, queue relief and all, not the server it went to last
// (mixed: "Say hi." from every client kept on the fast server's slots,
// 185 of 300 requests, while the slow servers idled and long answers
// queued behind them).
func TestARepeatedFirstMessageIsPlacedByThePolicyInSingleTurnTraffic(t *testing.T) {
	now := time.Now()
	one, two := learnedOneSlot("one", ms, ms, now), learnedOneSlot("two", ms, ms, now)
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"Say hi."}],"options":{"num_predict":10}}`)
	again := conversationOf("/api/chat", "m", body)
	h.affinity.record(again, one.srv.key, 0, now)
	route := func() string {
		b, route, _ := h.acquireConversation([]*backend{one, two}, again, newJob("m", apiOllama, body))
		require.NotNil(t, b)
		b.release()
		return route
	}
	require.False(t, h.affinity.singleTurn())
	assert.Equal(t, routeAffinityHit, route(), "while the traffic is not known, its server keeps it on a tie")
	for range int(1 / followWeight) {
		h.affinity.noteTurn(false)
	}
	require.True(t, h.affinity.singleTurn())
	assert.Equal(t, routePolicy, route(), "single-turn: the policy places it")
	h.LBPolicy, h.policy = "least_conn", pickLeastConn
	assert.Equal(t, routeAffinityHit, route(), "least_conn, blind to speed, keeps the pull")
	h.LBPolicy, h.policy = "least_delay", pickLeastDelay
	for range 8 {
		h.affinity.noteTurn(true)
	}
	require.False(t, h.affinity.singleTurn())
	assert.Equal(t, routeAffinityHit, route())
}

// keptBackend is keepsConversation's backend, without the saving.
func keptBackend(b *backend, _ float64) *backend { return b }

// twoConversations is conversation A, its previous turn (prevA) and the
// follow-up at hand (bodyA, followA), with a long history; and an
// unrelated conversation B: the pair a counted-out test places on one
// server.
func twoConversations(t *testing.T) (prevA conversation, bodyA []byte, followA, convB conversation) {
	history := longHistory()
	_, prevA = chatTurn(t, history[:len(history)-1])
	bodyA, followA = chatTurn(t, append(slices.Clone(history), map[string]string{"role": "user", "content": "next question"}))
	_, convB = chatTurn(t, []map[string]string{{"role": "system", "content": strings.Repeat("Other things entirely. ", 80)}, {"role": "user", "content": "hello"}})
	return prevA, bodyA, followA, convB
}

// Two conversations on a server of one slot evict each other's cache and
// queue behind each other for good: each turn of one is counted out, yet
// stays, because the other servers are no faster for it at that moment
// (conversations-unequal: two such pairs on the single-slot servers while
// the four-slot server held two conversations; 22.9 req/s and a p99 of
// 0.95 s against the oracle's 30 and 0.23). A counted-out follow-up moves
// to a server where it evicts nothing, or only a conversation idle long
// enough to have ended, when that serves it no later than staying plus
// what staying costs the conversation it evicts there.
func TestACountedOutConversationLeavesAServerItShares(t *testing.T) {
	now := time.Now()
	prevA, bodyA, followA, convB := twoConversations(t)

	setup := func(bigHostsActive bool) (*Handler, *backend, *backend) {
		small := ruleBackend("small", 0)
		small.cfg.MaxParallel = 1
		big := ruleBackend("big", 0)
		big.cfg.MaxParallel = 2
		h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
		h.affinity.record(prevA, small.srv.key, 0, now.Add(-time.Second))
		h.affinity.record(convB, small.srv.key, 0, now.Add(-500*ms)) // A is counted out on small
		idle := now.Add(-30 * time.Second)                           // ended, most likely
		if bigHostsActive {
			idle = now.Add(-200 * ms) // its user is reading
		}
		for i, at := range []time.Time{idle, now.Add(-100 * ms)} {
			_, c := chatTurn(t, []map[string]string{{"role": "user", "content": fmt.Sprint("big's conversation ", i)}})
			h.affinity.record(c, big.srv.key, 0, at)
		}
		return h, small, big
	}

	h, small, big := setup(false)
	_, id, _ := h.affinity.lookup(followA, now)
	require.True(t, h.affinity.evictedFrom(small, id, now), "B came after A to a server of one slot")
	got, route, gotID := h.acquireConversation([]*backend{small, big}, followA, newJob("m", apiOllama, bodyA))
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "big", got.cfg.Name, "big's other conversation has been idle for half a minute")
	assert.Equal(t, routeAffinityEvicted, route)
	assert.Equal(t, id, gotID)

	// Both of big's conversations are active: moving would evict one of
	// them, so A stays (and takes its chance with its cache).
	h, small, big = setup(true)
	got, route, _ = h.acquireConversation([]*backend{small, big}, followA, newJob("m", apiOllama, bodyA))
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "small", got.cfg.Name)
	assert.Equal(t, routeAffinityHit, route)
}

// Two conversations on a server of one slot, each counted out at every
// turn, queue behind each other for good while they last; moving one to a
// server with a free cache slot costs it one turn of its whole prompt
// there, but its next turns find their cache, where staying re-evaluates
// the whole prompt again at every turn. So the saving a cache would bring
// on its server counts for the move too: with it, a conversation leaves
// for a server twice as slow (random-28: two conversations on the single
// slot of a fast server for five turns each, p99 1.0 s against
// least_conn's 0.6), though not for one three times as slow, nor for one
// where it would evict a conversation, even one that has ended (on a pool
// of more conversations than slots that passes the eviction on).
func TestACountedOutConversationLeavesForASlowerServerWithRoom(t *testing.T) {
	now := time.Now()
	prevA, bodyA, followA, convB := twoConversations(t)
	for _, c := range []struct {
		slower float64
		ended  bool // roomy's one slot holds a conversation that has ended
		want   string
		route  string
	}{{2, false, "roomy", routeAffinityEvicted}, {3, false, "shared", routeAffinityHit}, {2, true, "shared", routeAffinityHit}} {
		shared := ruleBackend("shared", 0)
		shared.cfg.MaxParallel = 1
		roomy := testBackend("roomy", nil)
		roomy.cfg.MaxParallel = 1
		roomy.srv.models.Store(psWith("m"))
		roomy.srv.inFlight.Store(1)
		d := func(x time.Duration) time.Duration { return time.Duration(c.slower * float64(x)) }
		serve(roomy, &job{model: "m", promptChars: 400, maxOutput: 10}, now, finalGen(d(100*ms), d(10*ms), 0, 0, 100, 10))
		roomy.srv.inFlight.Store(0)
		h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
		h.affinity.record(prevA, shared.srv.key, 0, now.Add(-time.Second))
		h.affinity.record(convB, shared.srv.key, 0, now.Add(-500*ms))
		if c.ended {
			_, old := chatTurn(t, []map[string]string{{"role": "user", "content": "a conversation over long ago"}})
			h.affinity.record(old, roomy.srv.key, 0, now.Add(-30*time.Second))
			require.True(t, h.affinity.evictsOnlyIdle(roomy, now))
		}
		_, id, _ := h.affinity.lookup(followA, now)
		require.True(t, h.affinity.evictedFrom(shared, id, now))
		got, route, _ := h.acquireConversation([]*backend{shared, roomy}, followA, newJob("m", apiOllama, bodyA))
		require.NotNil(t, got)
		got.release()
		assert.Equal(t, c.want, got.cfg.Name, "roomy %v× slower, ended %v", c.slower, c.ended)
		assert.Equal(t, c.route, route, "roomy %v× slower, ended %v", c.slower, c.ended)
	}
}

// A counted-out follow-up whose server means a wait for a slot leaves it
// for a server with a slot free and a cache slot no conversation holds
// when that takes it within what the pool already takes (relievesQueue),
// though the turn alone would end sooner where it is. A slot planned for
// there but never seen in use is priced as there: the move tests it.
// Weighed turn by turn, with that slot at half a wait, six conversations
// stayed on a fast server of three slots, each turn behind another's and
// evaluating its whole history again, while a server three times as slow
// had three slots idle (random-365: 11 req/s against least_conn's 16.5).
func TestACountedOutConversationRelievesAQueueOntoAnUntriedSlot(t *testing.T) {
	now := time.Now()
	prevA, bodyA, followA, convB := twoConversations(t)
	_, convC := chatTurn(t, []map[string]string{{"role": "user", "content": "slow's own conversation"}})

	setup := func() (h *Handler, shared, slow *backend, release func()) {
		shared = ruleBackend("shared", 0)
		shared.srv.speed.mu.Lock()
		shared.srv.speed.slotsHi, shared.srv.speed.hiAt = 1, now // seen with a queue: one slot
		shared.srv.speed.mu.Unlock()
		slow = testBackend("slow", nil)
		slow.srv.models.Store(psWith("m"))
		slow.srv.inFlight.Store(1)
		serve(slow, &job{model: "m", promptChars: 400, maxOutput: 10}, now, finalGen(300*ms, 30*ms, 0, 0, 100, 10))
		slow.srv.inFlight.Store(0)
		h = &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay", served: &servedDelays{}}
		h.affinity.record(prevA, shared.srv.key, 0, now.Add(-time.Second))
		h.affinity.record(convB, shared.srv.key, 0, now.Add(-800*ms))
		h.affinity.record(convC, slow.srv.key, 0, now.Add(-500*ms))
		relShared := hold(shared, 1, now.Add(-20*ms)) // its slot is busy: staying waits
		relSlow := hold(slow, 1, now.Add(-20*ms))     // its one slot seen is busy, a second is untried
		return h, shared, slow, func() { relShared(); relSlow() }
	}

	h, shared, slow, release := setup()
	j := newJob("m", apiOllama, bodyA)
	stay, _ := h.estimateOf(shared, j)
	there, _ := h.estimateOf(slow, j)
	require.Positive(t, stay.wait, "staying means a wait for a slot")
	require.True(t, there.untried, "the request would take slow's untried slot")
	require.Positive(t, there.wait, "priced with half a wait")
	free := there.total() - there.wait
	require.Less(t, stay.total(), free, "the turn alone ends sooner where it is")
	_, id, _ := h.affinity.lookup(followA, now)
	require.True(t, h.affinity.evictedFrom(shared, id, now))

	// The pool's clients have lately waited longer than the move takes
	// with the slot there, not longer than with half a wait.
	served := (free + there.total()) / 2
	for range 2 * servedMin {
		h.served.note(served, time.Now())
	}
	got, route, _ := h.acquireConversation([]*backend{shared, slow}, followA, j)
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "slow", got.cfg.Name, "the queue is relieved onto slow's untried slot")
	assert.Equal(t, routeAffinityEvicted, route)
	release()

	// With no lasting queue to relieve (nothing served that long), it stays.
	h, _, _, release = setup()
	defer release()
	got, route, _ = h.acquireConversation([]*backend{shared, slow}, followA, newJob("m", apiOllama, bodyA))
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "shared", got.cfg.Name)
	assert.Equal(t, routeAffinityHit, route)
}

// A server seen serving two at once, a third slot not ruled out, is
// planned with three (slotsLocked): it has a cache slot for a third
// conversation too. Counted as full at two, a server of four slots seen
// with two at once looked full to every conversation that had to move,
// and those moved onto servers of one slot, two by two.
func TestAServerWhoseSlotsAreNotRuledOutHasRoomForOneMoreConversation(t *testing.T) {
	now := time.Now()
	b := testBackend("b", nil)
	servedTogether(b, 2, now.Add(-time.Second))
	slots, bounded := b.cacheSlots()
	require.Equal(t, 2, slots)
	require.False(t, bounded)
	tab := newAffinityTable(100, time.Hour)
	for i := range 2 {
		tab.record(conversation{prefixes: []uint64{uint64(16 * (i + 1))}, keep: []uint64{uint64(16 * (i + 1))}}, b.srv.key, 0, now)
	}
	assert.True(t, tab.hasFreeSlot(b, now), "a third slot is not ruled out")
	tab.record(conversation{prefixes: []uint64{48}, keep: []uint64{48}}, b.srv.key, 0, now)
	assert.False(t, tab.hasFreeSlot(b, now))

	// Once a request is seen waiting with two at work, two is all.
	waitedBehind(b, 2, now, 100*ms)
	slots, bounded = b.cacheSlots()
	require.True(t, bounded)
	require.Equal(t, 2, slots)
	tab2 := newAffinityTable(100, time.Hour)
	for i := range 2 {
		tab2.record(conversation{prefixes: []uint64{uint64(16 * (i + 1))}, keep: []uint64{uint64(16 * (i + 1))}}, b.srv.key, 0, now)
	}
	assert.False(t, tab2.hasFreeSlot(b, now))
}

// A first message recorded on a server that is no longer a candidate
// (removed from the pool, down) is new to every server it may go to: the
// policy places it and says so, instead of reporting an overflow of a
// conversation nobody is having. (The affinity table outlives a reload,
// and unrelated clients send the same first message.)
func TestAFirstMessageSeenOnAServerThatLeftIsNew(t *testing.T) {
	now := time.Now()
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	gone, a, b := ruleBackend("gone", 0), ruleBackend("a", 0), ruleBackend("b", 0)
	body, first := chatTurn(t, []map[string]string{{"role": "user", "content": "hello"}})
	h.affinity.record(first, gone.srv.key, 0, now.Add(-time.Second))
	got, route, id := h.acquireConversation([]*backend{a, b}, first, newJob("m", apiOllama, body))
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, routePolicy, route)
	assert.Zero(t, id, "a new conversation")

	// Its follow-up, its server gone, overflows: the conversation goes on.
	history := []map[string]string{{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}}
	_, prev := chatTurn(t, history)
	h.affinity.record(prev, gone.srv.key, 0, now.Add(-time.Second))
	body, follow := chatTurn(t, append(history, map[string]string{"role": "user", "content": "and then?"}))
	got, route, id = h.acquireConversation([]*backend{a, b}, follow, newJob("m", apiOllama, body))
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, routeAffinityOverflow, route)
	assert.NotZero(t, id)
}

// A conversation whose client sends each turn right after the answer has
// ended once its last answer is four of its pauses old, and at least a
// quarter second: clients that start the next conversation at once left
// a server of four slots holding more ended conversations than slots, each
// idle for under 2 s, and a conversation counted out on a server of one
// slot never found a server that evicted only an ended one. One whose
// client pauses longer, or whose answer has not ended, keeps the 2 s.
func TestAConversationOfQuickTurnsIsTakenAsEndedSooner(t *testing.T) {
	now := time.Now()
	big := ruleBackend("big", 0)
	big.cfg.MaxParallel = 1
	turn := func(n int, content string) conversation {
		msgs := []map[string]string{{"role": "user", "content": content}}
		for i := 1; i < n; i++ {
			msgs = append(msgs, map[string]string{"role": "assistant", "content": "answer"}, map[string]string{"role": "user", "content": fmt.Sprint("next ", i)})
		}
		_, c := chatTurn(t, msgs)
		return c
	}
	setup := func(pause time.Duration, answered bool) *affinityTable {
		tab := newAffinityTable(100, time.Hour)
		// Two turns: the first answered at -1 s, the second sent pause
		// after, answered (or not) 100 ms later.
		a := tab.record(turn(1, "quick conversation"), big.srv.key, 0, now.Add(-time.Second-100*ms))
		a.answered.Store(now.Add(-time.Second).UnixNano())
		_, id, _ := tab.lookup(turn(2, "quick conversation"), now)
		require.NotZero(t, id)
		a = tab.record(turn(2, "quick conversation"), big.srv.key, id, now.Add(-time.Second+pause))
		require.Equal(t, pause, a.pause)
		if answered {
			a.answered.Store(now.Add(-time.Second + pause + 100*ms).UnixNano())
		}
		return tab
	}
	// Its answer ended 0.9 s ago; its client took 10 ms to reply before.
	assert.True(t, setup(10*ms, true).evictsOnlyIdle(big, now), "four pauses (40 ms), at least 250 ms: ended")
	assert.False(t, setup(10*ms, false).evictsOnlyIdle(big, now), "its answer is still being written: not ended")
	assert.False(t, setup(300*ms, true).evictsOnlyIdle(big, now), "a client that paused 0.3 s may come back after 1.2 s")
	assert.True(t, setup(300*ms, true).evictsOnlyIdle(big, now.Add(time.Second)), "its answer is now 1.6 s old")
	// A pause of 0.6 s: four of them (2.4 s) outlast abandonedAfter, which
	// counts from its last turn (sent at -0.4 s).
	assert.False(t, setup(600*ms, true).evictsOnlyIdle(big, now.Add(1500*ms)))
	assert.True(t, setup(600*ms, true).evictsOnlyIdle(big, now.Add(1610*ms)), "2 s after its last turn, any conversation is taken as ended")
}

// slowHomeFastOther is a handler whose affinity table holds prevTurn on
// home, a server of one slot 4x slower than fast, and, when onFast is not
// nil, that conversation on fast's one slot with its turn at at; and
// conv's server key and depth as looked up there.
func slowHomeFastOther(t *testing.T, prevTurn, conv conversation, onFast *conversation, at, now time.Time) (*Handler, *backend, *backend, string, int) {
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	home, fast := learnedOneSlot("home", 4*ms, 4*ms, now), learnedOneSlot("fast", ms, ms, now)
	h.affinity.record(prevTurn, home.srv.key, 0, now)
	if onFast != nil {
		h.affinity.record(*onFast, fast.srv.key, 0, at)
	}
	key, _, depth := h.affinity.lookup(conv, now)
	require.Equal(t, home.srv.key, key)
	return h, home, fast, key, depth
}

// briefFollowUp is a conversation's previous turn (a system prompt of
// 1,000 characters, 250 tokens, and one exchange) and the follow-up that
// asks next, with its body; answers of 150 tokens.
func briefFollowUp(t *testing.T, next string) (prevTurn conversation, body []byte, conv conversation) {
	history := []map[string]string{
		{"role": "system", "content": strings.Repeat("Be brief and exact. ", 50)},
		{"role": "user", "content": "the first question"}, {"role": "assistant", "content": "the first answer"}}
	turn := func(msgs []map[string]string) ([]byte, conversation) {
		body := []byte(mustJSON(t, map[string]any{"model": "m", "messages": msgs, "options": map[string]any{"num_predict": 150}}))
		return body, conversationOf("/api/chat", "m", body)
	}
	_, prevTurn = turn(history)
	body, conv = turn(append(history, map[string]string{"role": "user", "content": next}))
	return prevTurn, body, conv
}

// A follow-up whose server slowed down stays there, cached, while moving
// it to a faster server would evict the cache of a conversation active
// there: that conversation's next turn evaluates its prompt again, which
// counts against the move (conversations-slowdown: six conversations on
// three servers of two slots, one turning 4x slower; moving its two
// evicted two of the others' caches, turn after turn, 15.6 req/s against
// least_conn's 21.6, which leaves them where they are).
func TestAFollowUpStaysWhereMovingItEvictsAnActiveConversation(t *testing.T) {
	now := time.Now()
	prevTurn, body, conv := briefFollowUp(t, strings.Repeat("More detail. ", 15))
	j := newJob("m", apiOllama, body)
	other := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"`+strings.Repeat("Another user's document. ", 160)+`"}]}`))

	setup := func(victim bool) (*Handler, *backend, *backend, string, int) {
		if victim {
			return slowHomeFastOther(t, prevTurn, conv, &other, now, now) // its one cache slot, in use
		}
		return slowHomeFastOther(t, prevTurn, conv, nil, now, now)
	}

	// Nothing cached on fast: its speed wins over home's cache.
	h, home, fast, key, depth := setup(false)
	dHome, _ := h.estimateOf(home, j)
	dFast, _ := h.estimateOf(fast, j)
	require.Greater(t, dHome.total()-dHome.prompt, dFast.total()*(1+affinityTie)+affinityTieMargin, "home is slower even with its whole prompt cached")
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, 0)), "moves to the faster server")

	// fast's slot holds another conversation of 4,000 characters (1,000
	// tokens, 1 s to evaluate again there): the move costs more than it
	// saves.
	h, home, fast, key, depth = setup(true)
	assert.Same(t, home, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, 0)), "stays: moving evicts an active cache")
	// A follow-up whose own cache is doubtful (counted out, or its last
	// turn missed) has less to keep: the charge is not weighed for it.
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, classOf(true, false))))
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, classOf(false, true))))
}

// evictsOnlyIdle reports whether a new conversation on b evicts none, or
// one that has most likely ended (abandoned).
func (t *affinityTable) evictsOnlyIdle(b *backend, now time.Time) bool {
	_, idleOnly, _ := t.evicts(b, b, now)
	return idleOnly
}
