package ollamaflow

import (
	"fmt"
	"math"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testBackend is a backend view over a detached server (no probe loop).
func testBackend(name string, mutate func(*Backend)) *backend {
	cfg := &Backend{Name: name, URL: "127.0.0.1:1"}
	if mutate != nil {
		mutate(cfg)
	}
	if err := cfg.provision(); err != nil {
		panic(err)
	}
	base, _ := url.Parse("http://" + name + ":11434")
	b := newBackendView(cfg, base)
	b.srv = &server{key: base.String(), base: base}
	b.srv.models.Store(&modelSnapshot{})
	return b
}

func names(list []*backend) []string {
	var out []string
	for _, b := range list {
		out = append(out, b.cfg.Name)
	}
	return out
}

func TestCandidatesFilterAndExplain(t *testing.T) {
	noEmbed := false
	gpu := testBackend("gpu", func(c *Backend) { c.Labels = []string{"GPU", "eu"} })
	cpu := testBackend("cpu", func(c *Backend) { c.Labels = []string{"cpu"}; c.AllowEmbeddings = &noEmbed })
	off := testBackend("off", func(c *Backend) { c.Disabled = true; c.Labels = []string{"gpu", "eu"} })
	h := &Handler{backends: []*backend{gpu, cpu, off}}

	got, why := h.candidates(kindCompletion, nil)
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu", "cpu"}, names(got), "disabled backends are never candidates")

	got, why = h.candidates(kindEmbedding, nil)
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu"}, names(got), "a backend that disallows embeddings is skipped")

	got, why = h.candidates(kindCompletion, []string{"gpu", "eu"})
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu"}, names(got), "labels match exactly and case-insensitively")

	_, why = h.candidates(kindCompletion, []string{"europe"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "europe", "labels never match by substring")

	_, why = h.candidates(kindEmbedding, []string{"cpu"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "labels cpu")

	h2 := &Handler{backends: []*backend{cpu}}
	_, why = h2.candidates(kindEmbedding, nil)
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "embedding")

	gpu.srv.state.Store(int32(stateUnhealthy))
	_, why = h.candidates(kindCompletion, []string{"gpu"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "no healthy backend")
}

func TestAcquireRespectsCaps(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 2 })
	h := &Handler{backends: []*backend{a, b}, policy: pickLeastConn}
	cands := []*backend{a, b}

	var got []string
	for i := 0; i < 3; i++ {
		picked := h.acquire(cands, &job{})
		require.NotNil(t, picked, "slot %d", i)
		got = append(got, picked.cfg.Name)
	}
	assert.ElementsMatch(t, []string{"a", "b", "b"}, got)
	assert.Nil(t, h.acquire(cands, &job{}), "every candidate is at its cap")
	assert.EqualValues(t, 1, a.srv.inFlight.Load())
	assert.EqualValues(t, 2, b.srv.inFlight.Load())

	b.srv.release()
	picked := h.acquire(cands, &job{})
	require.NotNil(t, picked)
	assert.Equal(t, "b", picked.cfg.Name, "a freed slot is taken at once")
}

func TestLeastConnPrefersLowestLoadRatio(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 4 })
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 2 })
	a.srv.inFlight.Store(2) // 2/4
	b.srv.inFlight.Store(1) // 1/2: equal ratio, equal weight: round-robin
	h := &Handler{}
	seen := map[string]int{}
	for i := 0; i < 10; i++ {
		seen[pickLeastConn(h, []*backend{a, b}, &job{}).cfg.Name]++
	}
	assert.Equal(t, 5, seen["a"])
	assert.Equal(t, 5, seen["b"])

	a.srv.inFlight.Store(1) // 1/4 beats 1/2
	assert.Equal(t, "a", pickLeastConn(h, []*backend{a, b}, &job{}).cfg.Name)

	heavy := testBackend("heavy", func(c *Backend) { c.Weight = 3; c.MaxParallel = 2 })
	heavy.srv.inFlight.Store(1) // 1/2, ties with b but weighs more
	for i := 0; i < 4; i++ {
		assert.Equal(t, "heavy", pickLeastConn(h, []*backend{b, heavy}, &job{}).cfg.Name)
	}
}

func TestWeightedPolicies(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.Weight = 3 })
	b := testBackend("b", nil)
	h := &Handler{}
	rr := map[string]int{}
	for i := 0; i < 400; i++ {
		rr[pickRoundRobin(h, []*backend{a, b}, &job{}).cfg.Name]++
	}
	assert.Equal(t, map[string]int{"a": 300, "b": 100}, rr)

	rnd := map[string]int{}
	for i := 0; i < 4000; i++ {
		rnd[pickRandom(h, []*backend{a, b}, &job{}).cfg.Name]++
	}
	assert.InDelta(t, 3000, rnd["a"], 200)
	assert.InDelta(t, 1000, rnd["b"], 200)

	for i := 0; i < 5; i++ {
		assert.Equal(t, "b", pickFirst(h, []*backend{b, a}, &job{}).cfg.Name)
	}
}

func TestLeastConnAvoidsFailingBackends(t *testing.T) {
	fast := testBackend("fast-failer", nil)
	ok := testBackend("ok", nil)
	ok.srv.inFlight.Store(5) // busier, but answering
	fast.srv.failStreak.Store(2)
	h := &Handler{}
	for i := 0; i < 5; i++ {
		assert.Equal(t, "ok", pickLeastConn(h, []*backend{fast, ok}, &job{}).cfg.Name)
	}
	fast.srv.failStreak.Store(0)
	assert.Equal(t, "fast-failer", pickLeastConn(h, []*backend{fast, ok}, &job{}).cfg.Name, "recovered: the least loaded again")
}

func TestLeastDelayPrefersTheFastServer(t *testing.T) {
	fast := testBackend("fast", nil)
	slow1 := testBackend("slow1", nil)
	slow2 := testBackend("slow2", nil)
	h := &Handler{}
	all := []*backend{fast, slow1, slow2}

	// No observations: least_conn, which spreads the load.
	slow1.srv.inFlight.Store(1)
	slow2.srv.inFlight.Store(1)
	assert.Equal(t, "fast", pickLeastDelay(h, all, &job{}).cfg.Name)

	ms := time.Millisecond
	now := time.Now()
	for k := 1; k <= 4; k++ { // 4 at once without a wait: 4 slots
		now = now.Add(time.Second)
		servedTogether(fast, k, now)
	}
	now = now.Add(time.Second)
	waitedBehind(fast, 4, now, 50*ms) // a fifth waited: no more than 4
	slow1.srv.inFlight.Store(1)
	serve(slow1, &job{}, now, final(400*ms, 0, 0, 5, 1))
	slow2.srv.inFlight.Store(1)
	serve(slow2, &job{}, now, final(400*ms, 0, 0, 5, 1))
	slow1.srv.inFlight.Store(0)
	slow2.srv.inFlight.Store(0)

	// Idle slow servers do not win against a fast one with work queued,
	// as long as the fast one would still finish first.
	for n := int64(0); n < 12; n++ {
		fast.srv.inFlight.Store(n)
		assert.Equal(t, "fast", pickLeastDelay(h, all, &job{}).cfg.Name, "fast with %d in flight", n)
	}
	fast.srv.inFlight.Store(16) // 4 rounds to wait and its own 100ms: 0.5s > 0.4s
	assert.Contains(t, []string{"slow1", "slow2"}, pickLeastDelay(h, all, &job{}).cfg.Name)

	// A cold model costs more than a busy warm server.
	fast.srv.inFlight.Store(4)
	fast.srv.models.Store(&modelSnapshot{known: true, loaded: map[string][]byte{}})
	slow1.srv.models.Store(&modelSnapshot{known: true, loaded: map[string][]byte{"m:latest": nil}})
	assert.Equal(t, "slow1", pickLeastDelay(h, all, &job{model: "m:latest"}).cfg.Name)
}

func TestTailKeeper(t *testing.T) {
	var tk tailKeeper
	tk.keep([]byte(`{"response":"a","done":false}` + "\n"))
	tk.keep([]byte(strings.Repeat("x", 5000)))
	tk.keep([]byte(`{"done":true,"context":[1,2,3],"total_duration":123,"load_duration":2500000000,"eval_count":17}` + "\n"))
	assert.EqualValues(t, 2500000000, tk.number("load_duration"))
	assert.EqualValues(t, 17, tk.number("eval_count"))
	assert.EqualValues(t, -1, tk.number("prompt_eval_count"))
	var big tailKeeper
	big.keep([]byte(strings.Repeat("y", 10000) + `"usage":{"prompt_tokens":5,"completion_tokens":9}`))
	assert.EqualValues(t, 9, big.number("completion_tokens"))
}

// An OpenAI stream without usage: its events counted whatever the reads
// split them at, one token each but the final event and [DONE].
func TestTailKeeperCountsTheEventsOfAStream(t *testing.T) {
	var stream strings.Builder
	for i := range 7 {
		fmt.Fprintf(&stream, "data: {\"choices\":[{\"delta\":{\"content\":\"t%d data: \\n\"}}]}\n\n", i)
	}
	stream.WriteString("data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n")
	body := []byte(stream.String())
	for _, size := range []int{1, 2, 3, 5, 6, 7, 13, 64, len(body)} {
		var tk tailKeeper
		tk.countSSE()
		for p := body; len(p) > 0; {
			n := min(size, len(p))
			tk.keep(p[:n])
			p = p[n:]
		}
		assert.EqualValues(t, 7, tk.sseTokens(), "reads of %d bytes", size)
	}
	var ndjson tailKeeper
	ndjson.keep(body)
	assert.EqualValues(t, -1, ndjson.sseTokens(), "only an OpenAI stream's events are counted")
}

func TestLeastDelayMeasuresUnknownServersOneAtATime(t *testing.T) {
	fast := testBackend("fast", nil)
	slow1 := testBackend("slow1", nil)
	slow2 := testBackend("slow2", nil)
	h := &Handler{}
	h.queue = newQueue(h)
	all := []*backend{fast, slow1, slow2}
	ms := time.Millisecond
	sent := time.Now().Add(-100 * ms) // the fresh pool's requests went out 0.1 s ago
	var fastTasks []*task
	take := func() *backend {
		b := pickLeastDelay(h, all, &job{})
		if b != nil {
			b.srv.inFlight.Add(1) // its slot, then its task, as the handler does
			tk := b.begin(&job{}, sent)
			if b == fast {
				fastTasks = append(fastTasks, tk)
			}
		}
		return b
	}

	// A fresh pool: one request to each server measures it, and one more
	// each is a spare beside it (spare.go); the next waits for the first
	// answer instead of piling onto servers of unknown speed.
	seen := map[string]bool{}
	for range 3 {
		seen[take().cfg.Name] = true
	}
	assert.Len(t, seen, 3)
	spares := map[string]bool{}
	for range 3 {
		spares[take().cfg.Name] = true
	}
	assert.Len(t, spares, 3, "one spare per server")
	assert.Nil(t, take(), "held back: every server is being measured, a spare beside each")

	// The first answer comes from the fast one: it takes the requests
	// while the slow ones are still being measured, their first requests
	// running longer than the fast one took (while they might still be as
	// fast, see TestHeldRequestsDoNotQueueBehindTheFirstAnswer), until its
	// queue is longer than a spare beside a slow one's measuring request
	// is expected to take (1.5× the 0.22 s it has run): then each slow one
	// takes one more as a spare, moved if fast would serve it sooner.
	fastTasks[0].learn(final(100*ms, 0, 0, 5, 1), time.Now())
	fast.srv.inFlight.Add(-1)
	sent = time.Now()
	slow1.srv.speed.probing = time.Now().Add(-220 * ms)
	slow2.srv.speed.probing = time.Now().Add(-220 * ms)
	for range 4 {
		assert.Equal(t, "fast", take().cfg.Name)
	}
	raced := map[string]bool{}
	for range 2 {
		j := &job{}
		b := pickLeastDelay(h, all, j)
		require.NotNil(t, b)
		b.srv.inFlight.Add(1)
		b.begin(j, time.Now())
		assert.Same(t, b.srv, j.spareOn, "a spare: moved if it would end sooner on fast")
		raced[b.cfg.Name] = true
	}
	assert.Equal(t, map[string]bool{"slow1": true, "slow2": true}, raced)
	for range 6 {
		take()
	}
	for _, slow := range []*backend{slow1, slow2} {
		assert.EqualValues(t, queuedSpareLimit, slow.srv.inFlight.Load(), "spares beside a measuring request, up to the limit")
	}

	// A server with configured slots is measured with all of them.
	capped := testBackend("capped", func(c *Backend) { c.MaxParallel = 2 })
	for range 2 {
		assert.Equal(t, "capped", pickLeastDelay(h, []*backend{capped, fast}, &job{}).cfg.Name)
		capped.srv.inFlight.Add(1)
		capped.begin(&job{}, time.Now())
	}
	capped.srv.speed.probing = time.Now().Add(-200 * ms) // longer than fast takes
	assert.Equal(t, "fast", pickLeastDelay(h, []*backend{capped, fast}, &job{}).cfg.Name)

	// A cold unobserved server is not measured at the price of a model
	// load when a warm observed one would answer sooner.
	warm := &modelSnapshot{known: true, loaded: map[string][]byte{"m:latest": nil}}
	fast.srv.models.Store(warm)
	fast.srv.inFlight.Store(0)
	fresh := testBackend("fresh", nil)
	fresh.srv.models.Store(&modelSnapshot{known: true, loaded: map[string][]byte{}})
	assert.Equal(t, "fast", pickLeastDelay(h, []*backend{fresh, fast}, &job{model: "m:latest"}).cfg.Name)
	assert.Equal(t, "fresh", pickLeastDelay(h, []*backend{fresh, fast}, &job{}).cfg.Name, "warm for a request without a model: measured")

	// No answer within bootstrapHold: least_conn, as before.
	a, b := testBackend("a", nil), testBackend("b", nil)
	a.srv.inFlight.Store(1)
	b.srv.inFlight.Store(2)
	a.srv.speed.startProbe(time.Now().Add(-2 * bootstrapHold))
	b.srv.speed.startProbe(time.Now().Add(-2 * bootstrapHold))
	assert.Equal(t, "a", pickLeastDelay(h, []*backend{a, b}, &job{}).cfg.Name)
	// A single candidate is never held back: there is nothing to choose.
	assert.Equal(t, "b", pickLeastDelay(h, []*backend{b}, &job{}).cfg.Name)
}

func TestHugeWeightsAreRefusedAndSumsCannotOverflow(t *testing.T) {
	cfg := &Backend{Name: "huge", URL: "127.0.0.1:1", Weight: math.MaxInt}
	err := cfg.provision()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "weight")
	cfg = &Backend{Name: "top", URL: "127.0.0.1:1", Weight: maxWeight}
	require.NoError(t, cfg.provision(), "the largest weight allowed")

	// A view built without Provision's check (weights near the integer
	// maximum) must still pick without a panic, in proportion.
	list := []*backend{testBackend("a", nil), testBackend("b", nil), testBackend("c", nil)}
	for _, b := range list {
		b.cfg.Weight = math.MaxInt
	}
	h := &Handler{}
	rr := map[string]int{}
	for i := 0; i < 3*maxWeight/1000; i++ {
		rr[pickRoundRobin(h, list, &job{}).cfg.Name]++
		pickRandom(h, list, &job{})
	}
	assert.Len(t, rr, 1, "round robin walks each weight in turn: the first of the cycle")
	list[1].cfg.Weight, list[2].cfg.Weight = 1, 1
	rnd := map[string]int{}
	for i := 0; i < 1000; i++ {
		rnd[pickRandom(h, list, &job{}).cfg.Name]++
	}
	assert.Greater(t, rnd["a"], 990, "a weighs a million times more: %v", rnd)
}

func TestARepeatedPromptDoesNotKeepLeastDelayFromMeasuringAServer(t *testing.T) {
	h := &Handler{}
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"Why is the sky blue?"}],"options":{"num_predict":100}}`)
	conv := conversationOf("/api/chat", "m", body)
	j := newJob("m", apiOllama, body)
	tab := newAffinityTable(100, time.Hour)
	// A quiet history sent the prompt to slow; fast was never tried.
	slow, fast := ruleBackend("slow", 0), testBackend("fast", nil)
	tab.record(conv, slow.srv.key, 0, time.Now())
	key, _, depth := tab.lookup(conv, time.Now())
	require.Equal(t, slow.srv.key, key)
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, slow}, key, conv, depth, j, 0)),
		"an idle server not observed yet may be faster: the policy measures it")
	fast.srv.inFlight.Store(1) // being measured: nothing more to learn from it now
	assert.Same(t, slow, keptBackend(h.keepsConversation([]*backend{fast, slow}, key, conv, depth, j, 0)))
}

func TestLeastDelayRemeasuresAServerBelievedSlow(t *testing.T) {
	two := func(c *Backend) { c.MaxParallel = 2 }
	fast, slow := testBackend("fast", two), testBackend("slow", two)
	h := &Handler{}
	all := []*backend{fast, slow}
	ms := time.Millisecond
	now := time.Now()
	serve(fast, &job{}, now.Add(-200*ms), finalGen(50*ms, 50*ms, 0, 0, 5, 5))
	// slow was measured at 4× the time, long enough ago to be due again.
	serve(slow, &job{}, now.Add(-2*remeasureAfter), finalGen(200*ms, 200*ms, 0, 0, 5, 5))

	assert.Equal(t, "fast", pickLeastDelay(h, all, &job{}).cfg.Name,
		"with a free fast slot nothing is worth re-measuring")
	release := hold(fast, 2, time.Now())
	defer release()
	assert.Equal(t, "slow", pickLeastDelay(h, all, &job{}).cfg.Name,
		"the fast server queues: the idle one not measured for a while is measured again")
	assert.Equal(t, "fast", pickLeastDelay(h, all, &job{}).cfg.Name,
		"one re-measurement at a time: until it answers, slow is still believed slow")

	// It has recovered (its generation too, so this is no prompt cache):
	// the one sample after the long gap counts at once.
	serve(slow, &job{}, time.Now(), finalGen(50*ms, 50*ms, 0, 0, 5, 5))
	assert.Equal(t, "slow", pickLeastDelay(h, all, &job{}).cfg.Name,
		"a recovered server takes traffic again instead of a queue")
}

// Requests that choose at the same instant all see an unobserved server
// idle until the first of them takes its slot: the measuring request is
// claimed under the server's lock, so they spread over the servers being
// measured and the rest wait for the first answer, instead of several
// landing on one server of unknown speed.
func TestMeasuringRequestsAreClaimedBeforeTheyAreSent(t *testing.T) {
	a, b := testBackend("a", nil), testBackend("b", nil)
	h := &Handler{}
	h.queue = newQueue(h)
	all := []*backend{a, b}
	// No slot taken between the picks: they chose at the same instant.
	first := pickLeastDelay(h, all, &job{})
	second := pickLeastDelay(h, all, &job{})
	require.NotNil(t, first)
	require.NotNil(t, second)
	assert.NotSame(t, first, second, "one measuring request per server")
	// Both are being measured: the third is no third measuring request but
	// a spare beside one, claimed before it is sent as well
	// (TestAFreshPoolSendsASpareRequestBesideEachMeasuringOne).
	third := &job{}
	spare := pickLeastDelay(h, all, third)
	require.NotNil(t, spare)
	assert.Same(t, spare.srv, third.spareOn, "a spare, not a measuring request")
	first = a
	if spare == a {
		first = b
	}

	// A claimed request takes its slot and begins: the slot counter holds
	// it from then on, still one.
	first.srv.inFlight.Add(1)
	first.begin(&job{}, time.Now())
	assert.False(t, first.srv.speed.claimProbe(1, &first.srv.inFlight, time.Now()))
	first.srv.inFlight.Add(-1)
	assert.True(t, first.srv.speed.claimProbe(1, &first.srv.inFlight, time.Now()), "its request ended without a sample: measured again")

	// A claim whose request never began (its slot was lost) lapses.
	now := time.Now()
	assert.False(t, second.srv.speed.claimProbe(1, &second.srv.inFlight, now))
	assert.True(t, second.srv.speed.claimProbe(1, &second.srv.inFlight, now.Add(probeClaimTTL)))

	// The configured slots of a server are all used to measure it.
	capped := testBackend("capped", func(c *Backend) { c.MaxParallel = 2 })
	assert.True(t, capped.srv.speed.claimProbe(2, &capped.srv.inFlight, now))
	assert.True(t, capped.srv.speed.claimProbe(2, &capped.srv.inFlight, now))
	assert.False(t, capped.srv.speed.claimProbe(2, &capped.srv.inFlight, now))
}

// On a fresh pool of equal servers the first to answer must not draw every
// request held back for the first answer into its queue while the others,
// measured with requests sent at the same moment, are about to answer:
// a request that would wait for one of its slots waits in the queue
// instead, until another answers or has run longer than the first took.
func TestHeldRequestsDoNotQueueBehindTheFirstAnswer(t *testing.T) {
	now := time.Now()
	first, other := testBackend("first", nil), testBackend("other", nil)
	h := &Handler{}
	h.queue = newQueue(h)
	all := []*backend{first, other}
	first.srv.inFlight.Store(1)
	serve(first, &job{}, now.Add(-500*ms), final(500*ms, 0, 0, 10, 1)) // answered now, alone: 0.5 s
	first.srv.inFlight.Store(0)
	other.srv.inFlight.Store(1) // its first request, sent with first's
	other.srv.speed.startProbe(now.Add(-400 * ms))

	release := hold(first, 1, now)
	assert.Nil(t, pickLeastDelay(h, all, &job{}),
		"other's answer is due before the untried slot's half wait: it may be as fast, its slots free")
	other.srv.speed.probing = now.Add(-100 * ms)
	assert.Same(t, first, pickLeastDelay(h, all, &job{}), "other's answer is due later: the untried slot is tried")
	other.srv.speed.probing = now.Add(-400 * ms)
	release()

	release = hold(first, 2, now) // every slot it is planned to have
	defer release()
	assert.Nil(t, pickLeastDelay(h, all, &job{}), "other may answer before a slot frees on first")
	wake := time.Unix(0, h.queue.wakeNext.Load())
	assert.WithinDuration(t, now.Add(150*ms), wake, 20*ms, "the queue tries again once other has run 10% longer than first took")

	// other ran longer than first takes: slower, not worth waiting for,
	// but raced with a spare while staying there (1.5× the 0.7 s it has
	// run) is expected to end before first's queue (0.75 s) and answer do.
	other.srv.speed.probing = now.Add(-700 * ms)
	j := &job{}
	assert.Same(t, other, pickLeastDelay(h, all, j), "a spare beside other's measuring request")
	assert.Same(t, other.srv, j.spareOn)
	other.srv.speed.probing = now.Add(-1100 * ms)
	assert.Same(t, first, pickLeastDelay(h, all, &job{}), "measured for longer than bootstrapHold: nothing is raced there")

	other.srv.speed.probing = now.Add(-400 * ms)
	other.srv.models.Store(psWith("another-model"))
	first.srv.models.Store(psWith("m"))
	assert.Same(t, first, pickLeastDelay(h, all, &job{model: "m"}), "other must load the model first")
}
