package ollamaflow

import (
	"testing"
	"time"

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
	for range 20 {
		clock = clock.Add(50 * ms)
		serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
	}
	d, _ := estimateDelay(b, &job{}, clock)
	assert.InDelta(t, 0.1, d.total(), 1e-6)

	// It slows down four times: a handful of answers, at 20 a second,
	// re-learn it.
	for range 8 {
		clock = clock.Add(50 * ms)
		serve(b, &job{}, clock, final(400*ms, 0, 0, 10, 1))
	}
	d, _ = estimateDelay(b, &job{}, clock)
	assert.Greater(t, d.total(), 0.36, "re-learned within 8 answers")

	// After a pause the first answer counts for nearly everything.
	clock = clock.Add(30 * time.Second)
	serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
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
	for k := int64(2); k <= 4; k++ {
		b.srv.inFlight.Store(k)
		serve(b, &job{}, clock, final(100*ms, 0, 0, 10, 1))
		assert.Equal(t, int(k)+1, sp.slotsLocked(0, clock))
	}
	// The fifth waited for a slot: 4, for a while.
	b.srv.inFlight.Store(5)
	serve(b, &job{}, clock, final(100*ms, 0, 80*ms, 10, 1))
	assert.Equal(t, 4, sp.slotsLocked(0, clock))
	assert.Equal(t, 4, sp.slotsLocked(0, clock.Add(slotRetest/2)))
	assert.Equal(t, 5, sp.slotsLocked(0, clock.Add(slotRetest+time.Second)), "re-tested after slotRetest")
	assert.Equal(t, 8, sp.slotsLocked(8, clock), "max_parallel is trusted")

	// A server that lost a slot: waited with 4 in flight.
	b.srv.inFlight.Store(4)
	serve(b, &job{}, clock, final(100*ms, 0, 90*ms, 10, 1))
	assert.Equal(t, 3, sp.slotsLo, "waited with 4 in flight: 3 slots")
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
