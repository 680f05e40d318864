package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const ms = time.Millisecond

// final is the final chunk of a native completion: prompt evaluated in
// prompt, load in load_duration, and wait spent waiting for a parallel slot
// (real Ollama reports that only in total_duration). Generation takes no
// time: see finalGen.
func final(prompt, load, wait time.Duration, promptCount, evalCount int64) timings {
	return finalGen(prompt, 0, load, wait, promptCount, evalCount)
}

func finalGen(prompt, eval, load, wait time.Duration, promptCount, evalCount int64) timings {
	return timings{native: true, promptCount: promptCount, evalCount: evalCount,
		prompt: prompt, ev: eval, load: load, total: load + wait + prompt + eval}
}

// serve runs one request through the cost model: sent to b at at (with
// b's in-flight count as it stands, itself included), answered with tm.
func serve(b *backend, j *job, at time.Time, tm timings) (loaded, evicted bool) {
	return b.begin(j, at).learn(tm, at.Add(tm.total))
}

// hold sends n requests to b at at that stay in flight until the
// returned function ends them.
func hold(b *backend, n int, at time.Time) (release func()) {
	var tasks []*task
	for range n {
		b.srv.inFlight.Add(1)
		tasks = append(tasks, b.begin(&job{}, at))
	}
	return func() {
		for _, t := range tasks {
			t.endAt(at)
			b.srv.inFlight.Add(-1)
		}
	}
}

// psWith is a model snapshot as /api/ps lists models.
func psWith(models ...string) *modelSnapshot {
	snap := &modelSnapshot{known: true, present: map[string][]byte{}, loaded: map[string][]byte{}}
	for _, m := range models {
		snap.present[m] = []byte(`{}`)
		snap.loaded[m] = []byte(`{"name":"` + m + `"}`)
	}
	return snap
}

func TestNewJobReadsTheBodyAsOllamaDoes(t *testing.T) {
	j := newJob("m", apiOllama, []byte(`{"model":"m","Messages":[{"role":"system","CONTENT":"abcd"},{"role":"user","content":"efghij"}],"options":{"NUM_PREDICT":7},"max_tokens":99}`))
	assert.Equal(t, 10, j.promptChars, "keys match case-insensitively")
	assert.Equal(t, 7, j.maxOutput, "options.num_predict on the native API; max_tokens is not Ollama's")

	j = newJob("m", apiOllama, []byte(`{"prompt":"a long prompt","prompt":"\u0061b","system":"xyz"}`))
	assert.Equal(t, 5, j.promptChars, "the last duplicate wins, escapes decoded")
	assert.Zero(t, j.maxOutput)

	j = newJob("m", apiOpenAI, []byte(`{"messages":[{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"x"}}]}],"max_completion_tokens":12}`))
	assert.Equal(t, 5, j.promptChars, "content parts: the text ones")
	assert.Equal(t, 12, j.maxOutput)

	// encoding/json matches keys under Unicode simple folding: "ſ" (long
	// s) is an "s" to it, where lowercasing leaves it as it is.
	body := []byte(`{"ſystem":"abc","meſſages":[{"content":"defg"}],"max_tokenſ":6}`)
	var asOllama struct {
		System    string `json:"system"`
		MaxTokens int    `json:"max_tokens"`
	}
	require.NoError(t, json.Unmarshal(body, &asOllama))
	require.Equal(t, "abc", asOllama.System)
	require.Equal(t, 6, asOllama.MaxTokens)
	j = newJob("m", apiOpenAI, body)
	assert.Equal(t, 7, j.promptChars, "keys folded as encoding/json folds them")
	assert.Equal(t, 6, j.maxOutput)

	j = newJob("m", apiOllama, []byte(`{"prompt":"hi","options":{"num_predict":-1}}`))
	assert.Zero(t, j.maxOutput, "-1 is no cap")
	assert.Equal(t, 0, newJob("m", apiOllama, []byte(`not json`)).promptChars)
}

func TestSpeedLearnsRatesFromOllamaTimingsNotWallTime(t *testing.T) {
	b := testBackend("a", nil)
	now := time.Unix(1000, 0)
	_, ok := estimateDelay(b, &job{}, now)
	assert.False(t, ok, "nothing learned yet")

	// 100 prompt tokens in 200 ms (2 ms each), 50 tokens in 1 s (20 ms
	// each), from a 400-character prompt (4 characters a token). The
	// client took 10 s to read the answer: that is not the server's time.
	b.srv.inFlight.Store(1)
	tk := b.begin(&job{promptChars: 400}, now)
	tk.learn(finalGen(200*ms, time.Second, 0, 0, 100, 50), now.Add(10*time.Second))
	b.srv.inFlight.Store(0)

	d, ok := estimateDelay(b, &job{promptChars: 4000, maxOutput: 10}, now)
	require.True(t, ok)
	assert.InDelta(t, 2.0, d.prompt, 1e-9, "1000 tokens at 2 ms")
	assert.InDelta(t, 0.2, d.output, 1e-9, "the cap: 10 tokens at 20 ms")
	assert.Zero(t, d.wait)
	d, _ = estimateDelay(b, &job{promptChars: 40}, now)
	assert.InDelta(t, 0.02, d.prompt, 1e-9)
	assert.InDelta(t, 1.0, d.output, 1e-9, "no cap: the typical answer, 50 tokens")
}

func TestSpeedForgetsSoAChangedServerIsRelearned(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.inFlight.Store(1)
	clock := time.Unix(1000, 0)
	// 10 prompt tokens in 60 ms, 4 tokens generated in 40 ms.
	for range 20 {
		clock = clock.Add(50 * ms)
		serve(b, &job{}, clock, finalGen(60*ms, 40*ms, 0, 0, 10, 4))
	}
	d, _ := estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.1, d.total(), 1e-6)

	// It slows down four times: a handful of answers, at 20 a second,
	// re-learn it.
	for range 8 {
		clock = clock.Add(50 * ms)
		serve(b, &job{}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	}
	d, _ = estimateDelay(b, &job{}, clock)
	assert.Greater(t, d.total(), 0.36, "re-learned within 8 answers")

	// After a pause the first answer counts for nearly everything: its
	// generation shows the server is fast again, so its fast prompt is
	// not mistaken for a cached one.
	clock = clock.Add(30 * time.Second)
	serve(b, &job{}, clock, finalGen(60*ms, 40*ms, 0, 0, 10, 4))
	d, _ = estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.1, d.total(), 0.01)
}

func TestSlotsAreNeverLockedInByAQuietHistory(t *testing.T) {
	b := testBackend("a", nil)
	sp := &b.srv.speed
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	for range 50 { // a quiet hour: one request at a time
		clock = clock.Add(time.Second)
		serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
	}
	assert.Equal(t, 2, sp.slotsLocked(0, clock), "a second slot is not ruled out: tried when a second request comes")

	// The burst: 2, then 3, then 4 at once without a wait.
	for k := 2; k <= 4; k++ {
		clock = clock.Add(time.Second)
		servedTogether(b, k, clock)
		assert.Equal(t, k+1, sp.slotsLocked(0, clock))
	}
	// The fifth waited for a slot: it came with 4 at work and got one
	// when the first of them ended, 80 ms later. 4, for a while.
	clock = clock.Add(time.Second)
	waitedBehind(b, 4, clock, 80*ms)
	assert.Equal(t, 4, sp.slotsLo)
	assert.Equal(t, 4, sp.slotsLocked(0, clock))
	assert.Equal(t, 4, sp.slotsLocked(0, clock.Add(slotRetest/2)))
	assert.Equal(t, 5, sp.slotsLocked(0, clock.Add(slotRetest+time.Second)), "re-tested after slotRetest")
	assert.Equal(t, 8, sp.slotsLocked(8, clock), "max_parallel is trusted")

	// A server that lost a slot: waited with 3 at work.
	clock = clock.Add(time.Second)
	waitedBehind(b, 3, clock, 90*ms)
	assert.Equal(t, 3, sp.slotsLo, "waited with 3 at work: 3 slots")
}

// servedTogether runs n requests through b, sent at at and served at
// once: each worked 100 ms without a wait.
func servedTogether(b *backend, n int, at time.Time) {
	var tasks []*task
	for range n {
		b.srv.inFlight.Add(1)
		tasks = append(tasks, b.begin(&job{}, at))
	}
	for _, tk := range tasks {
		tk.learn(final(100*ms, 0, 0, 10, 1), at.Add(100*ms))
	}
	b.srv.inFlight.Store(0)
}

// waitedBehind runs one request through b that came at at, 50 ms after n
// others that were at work, and waited wait for the first of them to end
// (the rest end with it): a server with n slots, all taken.
func waitedBehind(b *backend, n int, at time.Time, wait time.Duration) {
	var ahead []*task
	for range n {
		b.srv.inFlight.Add(1)
		ahead = append(ahead, b.begin(&job{}, at.Add(-50*ms)))
	}
	b.srv.inFlight.Add(1)
	tk := b.begin(&job{}, at)
	ahead[0].learn(final(100*ms, 0, 0, 10, 1), at.Add(wait))
	tm := final(100*ms, 0, wait, 10, 1)
	tk.learn(tm, at.Add(tm.total))
	for _, o := range ahead[1:] {
		o.endAt(at.Add(tm.total))
	}
	b.srv.inFlight.Store(0)
}

func TestABurstReleasedAtOnceDoesNotInflateTheSlots(t *testing.T) {
	b, clock := servedOneAlone()
	sp := &b.srv.speed

	// Ten requests held in the queue go out at the same instant; the
	// server (2 slots) serves the first two at once and queues the rest.
	// The first answer had a slot at once, with ten in the proxy's count:
	// only the requests sent before it count.
	var burst []*task
	for range 10 {
		b.srv.inFlight.Add(1)
		burst = append(burst, b.begin(&job{}, clock))
	}
	done := clock.Add(100 * ms)
	burst[0].learn(final(100*ms, 0, 0, 10, 1), done)
	burst[1].learn(final(100*ms, 0, 0, 10, 1), done)
	assert.Equal(t, 2, sp.slotsLo, "two were served at once")
	// The third waited for one of them: the two ahead had ended when it
	// started, so it says nothing more than 2 of those 3.
	burst[2].learn(final(100*ms, 0, 100*ms, 10, 1), done.Add(100*ms))
	assert.Equal(t, 2, sp.slotsLo)
	// Sent with nine others at the same instant, it may have come last:
	// its wait rules out no third slot.
	assert.Equal(t, 3, sp.slotsLocked(0, done.Add(100*ms)))
	for _, tk := range burst[3:] {
		tk.end()
	}
}

func TestSlotsAreCountedFromTimesNotTheOrderOfSending(t *testing.T) {
	// A server of 2 slots. The proxy sees an answer end a moment after
	// the server freed its slot: C, sent as A's slot freed, was served at
	// once beside B while A still looked in flight. Counted by the order
	// of sending, that made a third slot (and a fourth planned), so
	// requests queued inside a server believed to have room.
	b := testBackend("a", nil)
	sp := &b.srv.speed
	c0 := time.Unix(1000, 0)
	c1 := c0.Add(100 * ms) // A's slot frees on the server
	b.srv.inFlight.Store(3)
	a, bb := b.begin(&job{}, c0), b.begin(&job{}, c0)
	c := b.begin(&job{}, c1)
	a.learn(final(100*ms, 0, 0, 10, 1), c1.Add(8*ms))
	c.learn(final(100*ms, 0, 0, 10, 1), c1.Add(105*ms))
	assert.LessOrEqual(t, sp.slotsLo, 2, "A had ended for the server when C came")
	bb.learn(final(200*ms, 0, 0, 10, 1), c1.Add(106*ms))
	assert.Equal(t, 2, sp.slotsLo, "B worked beside A, then beside C")

	// Sent at the same instant, U came before T and took the second
	// slot; T waited for X. By the order of sending T waited with one
	// ahead, which made the server a one-slot server for slotRetest.
	b = testBackend("b", nil)
	sp = &b.srv.speed
	b.srv.inFlight.Store(3)
	x := b.begin(&job{}, c0.Add(-50*ms))
	tk, u := b.begin(&job{}, c0), b.begin(&job{}, c0)
	x.learn(final(110*ms, 0, 0, 10, 1), c0.Add(60*ms))
	u.learn(final(100*ms, 0, 0, 10, 1), c0.Add(100*ms))
	assert.Equal(t, 2, sp.slotsLo, "U worked beside X")
	tk.learn(final(100*ms, 0, 60*ms, 10, 1), c0.Add(160*ms))
	assert.Equal(t, 2, sp.slotsLo, "T's wait does not take a slot away")
	assert.Equal(t, 2, sp.slotsHi, "X and U were there when it came")
	assert.Equal(t, 2, sp.slotsLocked(0, c0.Add(time.Second)))
}

func TestAQueueRunningLateShowsAsAWait(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 2 })
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
	b.srv.inFlight.Store(0)

	// Ten requests of 0.1 s sent a second ago to 2 slots: all past the
	// ends planned for them, because the server was slower. They are
	// still there, so the eight queued behind the two in service take
	// 4 × 0.1 s more at least.
	release := hold(b, 10, clock)
	defer release()
	d, _ := estimateDelay(b, &job{}, clock.Add(time.Second))
	assert.GreaterOrEqual(t, d.wait, 0.4, "a late queue is not an idle server")
}

func TestWaitFollowsTheWorkInFlight(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 2 })
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{}, clock, finalGen(10*ms, 200*ms, 0, 0, 10, 10)) // 1 ms a prompt token, 20 ms an output token
	b.srv.inFlight.Store(0)

	long := b.begin(&job{maxOutput: 100, promptChars: 40}, clock) // 2 s
	b.srv.inFlight.Add(1)
	short := b.begin(&job{maxOutput: 5, promptChars: 40}, clock) // 0.1 s
	b.srv.inFlight.Add(1)
	d, _ := estimateDelay(b, &job{maxOutput: 5, promptChars: 40}, clock)
	assert.InDelta(t, 0.11, d.wait, 1e-6, "both slots busy: the short one ends first")
	short.end()
	b.srv.inFlight.Add(-1)
	d, _ = estimateDelay(b, &job{maxOutput: 5, promptChars: 40}, clock)
	assert.Zero(t, d.wait, "a slot is free")
	long.end()
}

func TestColdLoadsAreLearnedWhateverTheirSize(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith("a"))
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "a"}, clock, final(100*ms, 0, 0, 10, 1))

	// A model that was not resident: its 80 ms load is learned.
	loaded, _ := serve(b, &job{model: "b"}, clock, final(100*ms, 80*ms, 0, 10, 1))
	assert.True(t, loaded)
	d, _ := estimateDelay(b, &job{model: "c"}, clock)
	assert.InDelta(t, 0.08, d.load, 1e-9, "an unseen model costs what loads cost here")
	d, _ = estimateDelay(b, &job{model: "b"}, clock)
	assert.Zero(t, d.load, "resident now")
}

func TestEvictionsAreNoticed(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith("a", "b")) // /api/ps listed both
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "b"}, clock, final(100*ms, 0, 0, 10, 1))
	serve(b, &job{model: "a"}, clock.Add(time.Second), final(100*ms, 0, 0, 10, 1))

	// "b" answers with a 300 ms load, a slot free: it had been evicted.
	loaded, evicted := serve(b, &job{model: "b"}, clock.Add(2*time.Second), final(100*ms, 300*ms, 0, 10, 1))
	require.True(t, loaded)
	require.True(t, evicted)
	b.srv.noticeEviction("b", clock.Add(2*time.Second))
	assert.True(t, b.srv.models.Load().isLoaded("b"))
	assert.False(t, b.srv.models.Load().isLoaded("a"), "it took a's place")
	assert.Equal(t, 1, b.srv.speed.room)

	// With room for one, a load of "c" evicts "b" in the model's belief
	// the moment it is sent.
	b.begin(&job{model: "c"}, clock.Add(3*time.Second)).end()
	assert.True(t, b.srv.models.Load().isLoaded("c"))
	assert.False(t, b.srv.models.Load().isLoaded("b"))

	// A model believed evicted that answers without a load: the server
	// has more room than believed.
	b.srv.inFlight.Store(1)
	loaded, _ = serve(b, &job{model: "b"}, clock.Add(4*time.Second), final(100*ms, 0, 0, 10, 1))
	assert.False(t, loaded)
	assert.Zero(t, b.srv.speed.room, "unknown again until /api/ps says")
}

func TestPlacementEvictsWhereItCostsLeast(t *testing.T) {
	h := &Handler{}
	clock := time.Now()
	var pool []*backend
	for _, name := range []string{"only-a", "b1", "b2"} {
		b := testBackend(name, nil)
		b.srv.inFlight.Store(1)
		serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
		b.srv.inFlight.Store(0)
		loaded := map[string]string{"only-a": "a", "b1": "b", "b2": "b"}[name]
		b.srv.models.Store(psWith(loaded))
		b.srv.speed.mu.Lock()
		b.srv.speed.ratesLocked(loaded).lastUsed = clock
		b.srv.speed.room = 1
		b.srv.speed.mu.Unlock()
		pool = append(pool, b)
	}
	assert.Greater(t, evictionCost(pool[0], "c", pool, clock), evictionCost(pool[1], "c", pool, clock))
	for range 10 {
		got := pickLeastDelay(h, pool, &job{model: "c"}).cfg.Name
		assert.Contains(t, []string{"b1", "b2"}, got, "evicting the only copy of a model in use costs a reload of it")
	}
	// A model nobody asked for lately costs nothing to evict.
	assert.Zero(t, evictionCost(pool[0], "c", pool, clock.Add(2*evictionHorizon)))
	// Where the model is resident, no load at all.
	assert.Equal(t, "only-a", pickLeastDelay(h, pool, &job{model: "a"}).cfg.Name)
}

// The learned state cannot be poisoned: what a client does, or a prompt
// cache, must not make a server look faster or slower than it is.

func TestASlowClientDoesNotMakeAServerLookSlow(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	// /v1 reports no durations: generation is the time after the first
	// byte. 20 tokens in 200 ms: 10 ms a token.
	oai := func(elapsed, clientWait time.Duration) timings {
		return timings{promptCount: 10, evalCount: 20, total: -1, load: -1, prompt: -1, ev: -1,
			ttfb: 50 * ms, elapsed: 50*ms + elapsed, streamed: true, clientWait: clientWait}
	}
	serve(b, &job{maxOutput: 20}, clock, oai(200*ms, 0))
	d, _ := estimateDelay(b, &job{maxOutput: 20}, clock)
	require.InDelta(t, 0.2, d.output, 1e-9)

	// A client that reads slowly stretches the same answer to 5 s: the
	// proxy's writes to it blocked for 4.8 s of those.
	for range 5 {
		clock = clock.Add(100 * ms)
		serve(b, &job{maxOutput: 20}, clock, oai(5*time.Second, 4800*ms))
	}
	d, _ = estimateDelay(b, &job{maxOutput: 20}, clock)
	assert.InDelta(t, 0.2, d.output, 1e-9, "the client's pace is not the server's")

	// On the native API the server's own eval_duration may carry the
	// back-pressure too, and total_duration the wait: no slot is ruled
	// out because a slow client held a stream open.
	release := hold(b, 2, clock)
	defer release()
	tm := finalGen(10*ms, 3*time.Second, 0, 2*time.Second, 10, 20)
	tm.clientWait = 4 * time.Second
	serve(b, &job{maxOutput: 20}, clock, tm)
	assert.Zero(t, b.srv.speed.slotsHi, "no wait for a slot is read into a held-back answer")
	d, _ = estimateDelay(b, &job{maxOutput: 20}, clock)
	assert.InDelta(t, 0.2, d.output, 1e-9)

	// The same answer with a client that kept up does teach the wait
	// (sent once the held-back one had ended, beside the two held).
	tm.clientWait = time.Millisecond
	tm.ev = 200 * ms
	tm.total = 10*ms + 200*ms + 2*time.Second
	serve(b, &job{maxOutput: 20}, clock.Add(6*time.Second), tm)
	assert.Equal(t, 2, b.srv.speed.slotsHi, "waited with 3 in flight: 2 slots")
}

func TestACancelledRequestTeachesNothing(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{maxOutput: 10}, clock, finalGen(50*ms, 100*ms, 0, 0, 10, 10))
	b.srv.inFlight.Store(0)
	before, _ := estimateDelay(b, &job{maxOutput: 10}, clock)
	sp := &b.srv.speed
	lo, hi, n := sp.slotsLo, sp.slotsHi, sp.all.genN

	// A request sent, then cancelled by its client after a long time:
	// the handler ends its task without learning (only a complete answer
	// teaches). It leaves nothing behind as work in flight either.
	b.srv.inFlight.Store(5)
	tk := b.begin(&job{maxOutput: 10}, clock)
	tk.end()
	tk.end() // safe twice
	b.srv.inFlight.Store(0)
	after, _ := estimateDelay(b, &job{maxOutput: 10}, clock.Add(time.Minute))
	assert.Equal(t, before, after)
	assert.Empty(t, sp.tasks)
	assert.Equal(t, []int{lo, hi, n}, []int{sp.slotsLo, sp.slotsHi, sp.all.genN})
}

func TestAnAnswerCutByNumPredictKeepsTheTypicalLength(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	// Uncapped answers run 200 tokens at 10 ms.
	for range 3 {
		clock = clock.Add(time.Second)
		serve(b, &job{}, clock, finalGen(10*ms, 2*time.Second, 0, 0, 10, 200))
	}
	// Many capped ones: 5 tokens, as asked.
	for range 20 {
		clock = clock.Add(100 * ms)
		serve(b, &job{maxOutput: 5}, clock, finalGen(10*ms, 50*ms, 0, 0, 10, 5))
	}
	d, _ := estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 2.0, d.output, 1e-9, "a request without a cap still expects the typical 200 tokens")
	d, _ = estimateDelay(b, &job{maxOutput: 5}, clock)
	assert.InDelta(t, 0.05, d.output, 1e-9, "a capped one its cap")
	d, _ = estimateDelay(b, &job{maxOutput: 1000}, clock)
	assert.InDelta(t, 2.0, d.output, 1e-9, "a cap above the typical length: the typical length")
}

func TestAPromptCacheDoesNotMakeAServerLookFaster(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	// Prompts evaluated in full: 10 ms fixed, 1 ms a token; 100 and 1000
	// tokens. Generation 10 ms a token.
	for i := range 6 {
		clock = clock.Add(200 * ms)
		n := int64([]int{100, 1000}[i%2])
		serve(b, &job{}, clock, finalGen(10*ms+time.Duration(n)*ms, 100*ms, 0, 0, n, 10))
	}
	long := &job{promptChars: 4 * 2000, maxOutput: 10}
	short := &job{promptChars: 4 * 50, maxOutput: 10}
	d, _ := estimateDelay(b, long, clock)
	require.InDelta(t, 2.01, d.prompt, 1e-6, "fixed + per-token, extrapolated to 2000 tokens")
	d, _ = estimateDelay(b, short, clock)
	require.InDelta(t, 0.06, d.prompt, 1e-6, "a short prompt is not charged the long ones' per-token average")

	// Follow-up turns found 990 of their 1000 tokens in the cache: Ollama
	// still reports prompt_eval_count 1000, with 20 ms of evaluation.
	for range cacheSuspectLimit - 1 {
		clock = clock.Add(100 * ms)
		serve(b, &job{}, clock, finalGen(20*ms, 100*ms, 0, 0, 1000, 10))
	}
	d, _ = estimateDelay(b, long, clock)
	assert.InDelta(t, 2.01, d.prompt, 1e-6, "cache hits are not taken for prompt speed")

	// A slower prompt always counts: a cache only makes one faster.
	clock = clock.Add(100 * ms)
	serve(b, &job{}, clock, finalGen(10*ms+2000*ms, 100*ms, 0, 0, 1000, 10))
	d, _ = estimateDelay(b, long, clock)
	assert.Greater(t, d.prompt, 2.5)

	// A server that really got twice as fast shows it in generation too:
	// its faster prompts are learned at once.
	before := d.prompt
	for range 4 {
		clock = clock.Add(100 * ms)
		n := int64(1000)
		serve(b, &job{}, clock, finalGen(5*ms+time.Duration(n)*ms/2, 50*ms, 0, 0, n, 10))
	}
	d, _ = estimateDelay(b, long, clock)
	assert.Less(t, d.prompt, before*0.6, "a real speed-up is re-learned within 4 answers")
}

func TestPromptCostIsThePerTokenPart(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	_, _, ok := b.srv.speed.promptCost("m")
	assert.False(t, ok, "nothing observed")
	for i := range 4 {
		clock = clock.Add(200 * ms)
		n := int64([]int{100, 1000}[i%2])
		serve(b, &job{model: "m"}, clock, finalGen(10*ms+time.Duration(n)*ms, 100*ms, 0, 0, n, 10))
	}
	perTok, _, ok := b.srv.speed.promptCost("m")
	require.True(t, ok)
	assert.InDelta(t, 0.001, perTok, 1e-9, "1 ms a cached token saves; the 10 ms fixed part is paid anyway")
	perTok, _, _ = b.srv.speed.promptCost("other")
	assert.InDelta(t, 0.001, perTok, 1e-9, "a model not seen: the server's fit")
}

func TestALateRequestHoldsItsSlotAsLongAgainAsItOverran(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	clock := time.Unix(1000, 0)
	serve(b, &job{}, clock.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	release := hold(b, 1, clock) // planned to end at 0.1 s
	defer release()
	d, _ := estimateDelay(b, &job{}, clock.Add(40*ms))
	assert.InDelta(t, 0.06, d.wait, 1e-6, "on time: what is left of its plan")
	d, _ = estimateDelay(b, &job{}, clock.Add(150*ms))
	assert.InDelta(t, 0.05, d.wait, 1e-6, "50 ms late: 50 ms more, not a tenth of its work")
	d, _ = estimateDelay(b, &job{}, clock.Add(101*ms))
	assert.InDelta(t, 0.01, d.wait, 1e-6, "just late: at least a tenth of its work")
	d, _ = estimateDelay(b, &job{}, clock.Add(3*time.Second))
	assert.InDelta(t, 0.1, d.wait, 1e-6, "far behind: at most its whole work again")
}

func TestAnUntriedSlotCountsHalf(t *testing.T) {
	b, clock := servedOneAlone()
	sp := &b.srv.speed
	require.Equal(t, 2, sp.slotsLocked(0, clock), "one slot seen, a second not ruled out")

	release := hold(b, 1, clock)
	d, _ := estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.05, d.wait, 1e-6, "the second slot is as likely missing as there")
	b.cfg.MaxParallel = 2
	d, _ = estimateDelay(b, &job{}, clock)
	assert.Zero(t, d.wait, "max_parallel says it is there")
	b.cfg.MaxParallel = 0
	release()

	d, _ = estimateDelay(b, &job{}, clock)
	assert.Zero(t, d.wait, "the slot seen is free")
}

func TestServerErrorsMakeAServerTheLastChoiceForAWhile(t *testing.T) {
	a, b := testBackend("a", nil), testBackend("b", nil)
	now := time.Now()
	for _, s := range []*backend{a, b} {
		s.srv.inFlight.Store(1)
		serve(s, &job{}, now.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
		s.srv.inFlight.Store(0)
	}
	h := &Handler{}
	all := []*backend{a, b}
	clean, _ := estimateDelay(a, &job{}, now)

	// a answers 500 at once, again and again: it looks idle, but each
	// error makes it costlier, within a bound.
	sp := &a.srv.speed
	sp.noteAnswer(503, now) // "server busy": back-pressure, not an error
	assert.Zero(t, sp.errorShare(now))
	for range 20 {
		sp.noteAnswer(500, now)
	}
	d, _ := estimateDelay(a, &job{}, now)
	assert.InDelta(t, clean.total()/(1-errorShareMax), d.total(), 1e-9, "bounded: at most 1/(1-%v) attempts", errorShareMax)
	assert.Equal(t, clean.prompt+clean.output, d.prompt+d.output, "an error teaches no speed")
	for range 4 {
		assert.Equal(t, "b", pickLeastDelay(h, all, &job{}).cfg.Name, "the idle server answering errors is not chosen")
	}

	// Honest traffic still reaches it while the other queues.
	release := hold(b, 10, time.Now())
	assert.Equal(t, "a", pickLeastDelay(h, all, &job{}).cfg.Name, "a queue costs more than a bounded penalty")
	release()

	// Forgotten within seconds, and sooner by answers that are not errors
	// (a client's 4xx is an answer).
	later, _ := estimateDelay(a, &job{}, now.Add(10*errorForget))
	assert.InDelta(t, clean.total(), later.total(), 1e-4)
	before := sp.errorShare(now)
	sp.noteAnswer(404, now)
	assert.Less(t, sp.errorShare(now), before)

	// A server not observed yet that answers only errors is not measured
	// with the next request: nothing would be learned, and it is always
	// free.
	fresh := testBackend("fresh", nil)
	for range 3 {
		fresh.srv.speed.noteAnswer(500, time.Now())
	}
	assert.Equal(t, "b", pickLeastDelay(h, []*backend{fresh, b}, &job{}).cfg.Name)
	fresh.srv.speed.errShare = 0
	assert.Equal(t, "fresh", pickLeastDelay(h, []*backend{fresh, b}, &job{}).cfg.Name, "measured once its errors are forgotten")
}

func TestASampleAfterASilenceReplacesTheEstimate(t *testing.T) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	for range 10 { // 4x slow: 0.4 s
		clock = clock.Add(50 * ms)
		serve(b, &job{}, clock, finalGen(200*ms, 200*ms, 0, 0, 10, 10))
	}
	// Re-measured a little later: one answer moves it part of the way.
	serve(b, &job{}, clock.Add(remeasureAfter/2), finalGen(50*ms, 50*ms, 0, 0, 10, 10))
	d, _ := estimateDelay(b, &job{}, clock)
	assert.Greater(t, d.total(), 0.11, "a sample soon after the last is weighed with it")
	// After a silence of remeasureAfter, the answer is all that is known
	// of the server now: it recovered.
	clock = clock.Add(remeasureAfter / 2)
	serve(b, &job{}, clock.Add(remeasureAfter), finalGen(50*ms, 50*ms, 0, 0, 10, 10))
	d, _ = estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.1, d.total(), 1e-9)
}

// servedOneAlone is a server that has answered one request (0.1 s of
// output) while it was the only one in flight, and the clock a second
// after that answer.
func servedOneAlone() (*backend, time.Time) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{}, clock.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	b.srv.inFlight.Store(0)
	return b, clock
}

func TestLeastDelayJoinsNoLoadBlindBeforeTheListsAreRead(t *testing.T) {
	// A fresh pool's first requests come before any /api/ps was read:
	// the first one sent to "slow" is not taken to load the model there
	// (TestARequestSentBeforeTheListsAreReadLoadsNothing).
	fast, slow := testBackend("fast", nil), testBackend("slow", nil)
	require.False(t, fast.srv.models.Load().known)
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	slow.srv.inFlight.Store(1)
	slow.srv.speed.startProbe(now)
	require.False(t, slow.begin(&job{model: "m"}, now).loader)

	assert.Equal(t, "fast", pickLeastDelay(h, []*backend{fast, slow}, &job{model: "m"}).cfg.Name, "measured first")
	fast.srv.inFlight.Store(1)
	fast.srv.speed.startProbe(now)
	for range 3 {
		assert.Nil(t, pickLeastDelay(h, []*backend{fast, slow}, &job{model: "m"}),
			"\"fast\" may hold the model (nothing is known of its lists): the request waits for its answer "+
				"instead of joining a load that may be a belief only, on a server nobody has timed")
	}
}

func TestLeastDelayJoinsNoLoadBlindWhileAServerHoldingTheModelIsMeasured(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	// "loading" is loading "m" for its first request; "warm" holds "m"
	// and its first request has not been answered yet.
	loading, warm := testBackend("loading", nil), testBackend("warm", nil)
	loading.srv.models.Store(psWith("x"))
	loading.srv.inFlight.Store(1)
	loading.begin(&job{model: "m"}, now)
	warm.srv.models.Store(psWith("m"))
	warm.srv.inFlight.Store(1)
	warm.srv.speed.startProbe(now)
	pool := []*backend{warm, loading}
	assert.Equal(t, "warm", pickLeastDelay(h, pool, &job{model: "m"}).cfg.Name,
		"a spare beside warm's measuring request (spare.go), not a share of the load")
	for range 3 {
		assert.Nil(t, pickLeastDelay(h, pool, &job{model: "m"}),
			"nothing observed: a load's rest weighed against nothing would draw every request there")
	}

	// Once "warm" has answered, joining is weighed against it.
	warm.srv.inFlight.Store(0)
	learned(warm, now)
	assert.Equal(t, "warm", pickLeastDelay(h, pool, &job{model: "m"}).cfg.Name)

	// With the model nowhere else, the load under way is still the one to
	// share (TestLeastDelayJoinsALoadUnderWay).
	cold := testBackend("cold", nil)
	cold.srv.models.Store(psWith("x"))
	cold.srv.inFlight.Store(1)
	cold.srv.speed.startProbe(now)
	assert.Equal(t, "loading", pickLeastDelay(h, []*backend{cold, loading}, &job{model: "m"}).cfg.Name)
}

func TestAConversationDoesNotWaitOnAServerNeverMeasured(t *testing.T) {
	h := &Handler{}
	busy := testBackend("busy", nil)
	measured, _ := servedOneAlone()
	conv := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"Write a long story."}]}`))
	require.False(t, conv.none())
	// The same first message went to "busy" a moment ago and is still
	// running there: nothing is cached there yet, nor is its speed known.
	// The measured server is busier, with slots of known speed.
	busy.srv.inFlight.Store(1)
	measured.srv.inFlight.Store(2)
	pool := []*backend{busy, measured}
	assert.Nil(t, keptBackend(h.keepsConversation(pool, busy.srv.key, conv, 0, &job{model: "m"}, 0)),
		"a second request on a server measured one at a time may wait behind a long first one")
	busy.srv.inFlight.Store(0)
	assert.Equal(t, "busy", keptBackend(h.keepsConversation(pool, busy.srv.key, conv, 0, &job{model: "m"}, 0)).cfg.Name,
		"idle, it keeps it")
}

func TestANonStreamedOpenAIAnswerMeasuresTheServer(t *testing.T) {
	// /v1/chat/completions without streaming: usage counts, no durations,
	// one elapsed time for the prompt and the answer together.
	openai := func(promptTokens, answerTokens int64, elapsed time.Duration) timings {
		return timings{promptCount: promptTokens, evalCount: answerTokens, total: -1, load: -1, prompt: -1, ev: -1,
			ttfb: elapsed, elapsed: elapsed}
	}
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	b.begin(&job{}, clock).learn(openai(12, 30, 160*ms), clock.Add(160*ms))
	b.srv.inFlight.Store(0)
	d, ok := estimateDelay(b, &job{}, clock.Add(time.Second))
	require.True(t, ok, "measured: else it is sent one request at a time while slower servers queue")
	assert.InDelta(t, 0.16, d.total(), 1e-6, "a request like it takes what it took")
	assert.Greater(t, d.output, d.prompt, "before anything else is known, the prompt counts as one step of the answer")

	// Twice as slow after a silence: the whole is re-learned, in the
	// proportion already known.
	clock = clock.Add(remeasureAfter + time.Second)
	b.srv.inFlight.Store(1)
	b.begin(&job{}, clock).learn(openai(12, 30, 320*ms), clock.Add(320*ms))
	b.srv.inFlight.Store(0)
	d2, _ := estimateDelay(b, &job{}, clock.Add(time.Second))
	assert.InDelta(t, 0.32, d2.total(), 1e-6)
	assert.InDelta(t, d.prompt/d.total(), d2.prompt/d2.total(), 1e-6)

	// One that waited for a slot (two in flight, one slot seen) says
	// nothing of the server's speed.
	b.srv.inFlight.Store(2)
	first := b.begin(&job{}, clock.Add(2*time.Second))
	b.begin(&job{}, clock.Add(2*time.Second)).learn(openai(12, 30, time.Second), clock.Add(3*time.Second))
	first.end()
	b.srv.inFlight.Store(0)
	d3, _ := estimateDelay(b, &job{}, clock.Add(3*time.Second))
	assert.InDelta(t, 0.32, d3.total(), 1e-6)
}

func TestAnUncappedAnswerIsPricedByTheModelsTypicalLength(t *testing.T) {
	table := &answerTable{}
	clock := time.Unix(1000, 0)
	// "capped" has answered only a request capped at 3 tokens (16 ms a
	// token); "other" answered one uncapped request of 30 tokens.
	capped, other := testBackend("capped", nil), testBackend("other", nil)
	capped.srv.inFlight.Store(1)
	other.srv.inFlight.Store(1)
	serve(capped, &job{model: "m", maxOutput: 3, answers: table}, clock, finalGen(160*ms, 48*ms, 0, 0, 12, 3))
	serve(other, &job{model: "m", answers: table}, clock, finalGen(40*ms, 120*ms, 0, 0, 12, 30))
	capped.srv.inFlight.Store(0)
	assert.InDelta(t, 30, table.typical("m"), 1e-9)

	uncapped := &job{model: "m", answers: table}
	d, _ := estimateDelay(capped, uncapped, clock.Add(time.Second))
	assert.InDelta(t, 30*0.016, d.output, 1e-6, "its own answers were all cut by their cap: the model's typical answer")
	d, _ = estimateDelay(capped, &job{model: "m", maxOutput: 3, answers: table}, clock.Add(time.Second))
	assert.InDelta(t, 3*0.016, d.output, 1e-6, "a cap below it bounds it")
	d, _ = estimateDelay(capped, &job{model: "m"}, clock.Add(time.Second))
	assert.Zero(t, d.output, "without the pool's lengths nothing is known of an uncapped answer here")

	// An answer that ended before its cap is an uncapped one's length;
	// one its cap cut is not.
	other.srv.inFlight.Store(1)
	serve(other, &job{model: "m", maxOutput: 100, answers: table}, clock.Add(remeasureAfter+time.Second), finalGen(40*ms, 80*ms, 0, 0, 12, 20))
	assert.InDelta(t, 20, table.typical("m"), 1e-9)
	serve(other, &job{model: "m", maxOutput: 5, answers: table}, clock.Add(2*remeasureAfter+2*time.Second), finalGen(40*ms, 20*ms, 0, 0, 12, 5))
	assert.InDelta(t, 20, table.typical("m"), 1e-9)
}

func TestTheTableOfAnswerLengthsIsBounded(t *testing.T) {
	table := &answerTable{}
	clock := time.Unix(1000, 0)
	for i := range maxAnswerModels + 10 {
		table.note(fmt.Sprintf("model-%d", i), 10, clock.Add(time.Duration(i)*time.Second))
	}
	n := 0
	table.m.Range(func(_, _ any) bool { n++; return true })
	assert.Equal(t, maxAnswerModels, n)
	assert.Zero(t, table.typical("model-0"), "the least recently answered made room")
	assert.InDelta(t, 10, table.typical(fmt.Sprintf("model-%d", maxAnswerModels+9)), 1e-9)
}

func TestNewConversationsAreNotSpreadOntoAServerBeingMeasured(t *testing.T) {
	h := &Handler{}
	busy := testBackend("busy", nil)
	measured, _ := servedOneAlone()
	// "busy" has its first request in flight, of unknown length; the
	// measured server is busier, at a known speed.
	busy.srv.inFlight.Store(1)
	measured.srv.inFlight.Store(2)
	list := names(h.nearBest(&scratch{}, []*backend{busy, measured}, &job{}, spreadFactor, spreadMargin))
	assert.NotContains(t, list, "busy", "a list of it alone would send the request there behind its first")
	busy.srv.inFlight.Store(0)
	list = names(h.nearBest(&scratch{}, []*backend{busy, measured}, &job{}, spreadFactor, spreadMargin))
	assert.Contains(t, list, "busy", "idle, it is measured with the next request")
}

// A server that answers mostly errors and was never measured is still sent
// a measuring request while the others queue, but at most one per
// errorProbeEvery: a client's crafted 500s cannot keep honest traffic off
// it, and a server that is really broken costs one request a second.
func TestAServerAnsweringErrorsIsMeasuredOnceASecondWhileOthersQueue(t *testing.T) {
	var sp speed
	t0 := time.Now()
	for range 8 {
		sp.noteAnswer(500, t0)
	}
	require.True(t, sp.mostlyErrors(t0))
	assert.True(t, sp.claimErrorProbe(t0), "the first is sent")
	assert.False(t, sp.claimErrorProbe(t0.Add(errorProbeEvery/2)), "a second within errorProbeEvery is not")
	assert.True(t, sp.claimErrorProbe(t0.Add(errorProbeEvery+time.Millisecond)), "one is sent again after errorProbeEvery")
}

// A stream on /v1 without stream_options.include_usage, as the OpenAI
// SDKs send it by default, has no token counts: its events are counted
// instead, and the server is measured by it. Before, nothing was learned
// from it, and a pool serving only such streams stayed unmeasured.
func TestAnOpenAIStreamWithoutUsageMeasuresTheServer(t *testing.T) {
	tiny := []string{"tiny-llama"}
	f := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Tokens: 12, TokenGap: 5 * ms})
	defer f.Close()
	loadCaddy(t, fmt.Sprintf("backend a %s", f.URL))
	waitKnown(t, []*fakeollama.Server{f})
	s := pooled(t, f.URL)
	_, ok := s.speed.serviceFor(nil)
	require.False(t, ok, "fresh")

	res, body := post(t, "/v1/chat/completions", `{"model":"tiny-llama","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	require.NotContains(t, body, `"usage"`)
	require.Eventually(t, func() bool { _, ok := s.speed.serviceFor(nil); return ok }, 2*time.Second, 5*ms,
		"its answer measured the server")
	s.speed.mu.Lock()
	genTok := s.speed.all.genTok
	s.speed.mu.Unlock()
	// 12 tokens, one event each, 5 ms apart: what the events took from
	// the first to the last, per token counted.
	assert.InDelta(t, 0.005, genTok, 0.004)
}

// OpenAI streams report no durations, yet show a server's slots: two
// streams generating at once had two slots; one whose first byte came only
// after the other, in flight when it was sent, had ended waited for the
// only one. Before, slots were learned from Ollama's total_duration only,
// and a server serving /v1 streams kept an untried slot forever
// (openai-stream: each single-slot slow server drew a second request to
// queue inside it, again and again, and the pool's p99 was two answers).
func TestOpenAIStreamsShowTheServersSlots(t *testing.T) {
	stream := func(ttfb, elapsed time.Duration) timings {
		return timings{streamed: true, promptCount: -1, evalCount: 50, total: -1, load: -1, prompt: -1, ev: -1,
			ttfb: ttfb, elapsed: elapsed}
	}
	j := func() *job { return &job{model: "m", promptChars: 48} }
	clock := time.Unix(1000, 0)
	slots := func(b *backend, at time.Time) (planned, lo, hi int) {
		b.srv.speed.mu.Lock()
		defer b.srv.speed.mu.Unlock()
		return b.srv.speed.slotsLocked(0, at), b.srv.speed.slotsLo, b.srv.speed.slotsHi
	}
	pair := func(name string, second timings, secondEnd time.Duration) *backend {
		b := testBackend(name, nil)
		b.srv.models.Store(psWith("m"))
		b.srv.inFlight.Store(2)
		first, next := b.begin(j(), clock), b.begin(j(), clock.Add(10*ms))
		first.learn(stream(80*ms, 530*ms), clock.Add(530*ms))
		next.learn(second, clock.Add(secondEnd))
		b.srv.inFlight.Store(0)
		return b
	}

	single := pair("single", stream(600*ms, 1050*ms), 1060*ms)
	planned, lo, hi := slots(single, clock.Add(1100*ms))
	assert.Equal(t, 1, planned, "the second's first byte came after the first ended: one slot, no untried one")
	assert.Equal(t, 1, lo)
	assert.Equal(t, 1, hi)

	double := pair("double", stream(75*ms, 525*ms), 535*ms)
	planned, lo, hi = slots(double, clock.Add(600*ms))
	assert.Equal(t, 2, lo, "both generated at once")
	assert.Equal(t, 0, hi)
	assert.Equal(t, 3, planned, "a third slot is not ruled out")

	// A first byte late, but before the other ended (a long prompt, a
	// busy machine), is no wait: nothing is ruled out.
	_, _, hi = slots(pair("slow-prompt", stream(400*ms, 850*ms), 860*ms), clock.Add(900*ms))
	assert.Equal(t, 0, hi)
	// Nor is one after a request that was about to end anyway: its first
	// token could not have come sooner than its prompt's time.
	b := testBackend("ending", nil)
	b.srv.models.Store(psWith("m"))
	b.srv.inFlight.Store(2)
	first := b.begin(j(), clock)
	second := b.begin(j(), clock.Add(520*ms))
	first.learn(stream(80*ms, 530*ms), clock.Add(530*ms))
	second.learn(stream(90*ms, 540*ms), clock.Add(1060*ms))
	_, _, hi = slots(b, clock.Add(1100*ms))
	assert.Equal(t, 0, hi)
}

// Requests a queue released at one instant are counted in flight before
// any of them begins: each is taken to need what the requests sent there
// lately did, not a typical uncapped answer's time. With every answer
// capped, no typical length is known, and that typical was the prompt
// alone: eight released onto two slots looked one answer deep.
func TestRequestsReleasedAtOnceWeighAsTheRequestsSentLately(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 2 })
	clock := time.Unix(1000, 0)
	capped := &job{maxOutput: 10, promptChars: 40}
	for range 4 { // 10 ms of prompt, 10 tokens at 10 ms
		clock = clock.Add(time.Second)
		b.srv.inFlight.Store(1)
		serve(b, capped, clock, finalGen(10*ms, 100*ms, 0, 0, 10, 10))
	}
	b.srv.inFlight.Store(0)
	one, _ := estimateDelay(b, capped, clock)
	require.InDelta(t, 0.11, one.prompt+one.output, 1e-6)

	// Two begun, six more dispatched with them that have not begun.
	release := func() func() {
		var ts []*task
		for range 2 {
			b.srv.inFlight.Add(1)
			ts = append(ts, b.begin(capped, clock))
		}
		return func() {
			for _, t := range ts {
				t.end()
			}
		}
	}()
	defer release()
	b.srv.inFlight.Add(6)
	d, _ := estimateDelay(b, capped, clock)
	assert.InDelta(t, 4*0.11, d.wait, 0.01, "eight ahead on two slots: four answers deep")
}

// A request queued whether an untried slot is there or not expects the
// mean of both waits, as one that would take it does: replayed as if the
// slot were sure, a server of one slot seen looked half as deep as it was.
func TestAnUntriedSlotCountsHalfInAQueueToo(t *testing.T) {
	b, clock := servedOneAlone() // 0.1 s a request, one slot seen
	release := hold(b, 3, clock)
	defer release()
	// One slot: three ahead, 0.3 s. Two: the second slot frees at 0.1 s.
	d, _ := estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.2, d.wait, 1e-6)
	assert.False(t, d.untried, "it would not take the untried slot: it queues")
	b.cfg.MaxParallel = 2
	d, _ = estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.1, d.wait, 1e-6, "max_parallel says the slot is there")
}
