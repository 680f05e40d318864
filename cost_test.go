package ollamaflow

import (
	"encoding/json"
	"fmt"
	"math"
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

// hold sends n requests to b at at that stay in flight until the
// returned function ends them.
func hold(b *backend, n int, at time.Time) (release func()) { return holdFor(b, "", n, at) }

// holdFor is hold with requests for model.
func holdFor(b *backend, model string, n int, at time.Time) (release func()) {
	var tasks []*task
	for range n {
		b.srv.inFlight.Add(1)
		tasks = append(tasks, b.begin(&job{model: model}, at))
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

// listedAt stores in b what a list read at at showed loaded: models.
func listedAt(b *backend, at time.Time, models ...string) *modelSnapshot {
	snap := psWith(models...)
	snap.at = at
	b.srv.models.Store(snap)
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

// The learned state cannot be poisoned: what a client does, or a prompt
// cache, must not make a server look faster or slower than it is.

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

// A request sent behind others at the server is on time until the end
// planned for it when it was sent, its wait there counted: once the
// requests ahead of it are done and gone from the replay, it is not a
// request running late.
func TestARequestQueuedAtTheServerIsNotLateBeforeItsPlannedEnd(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 2 })
	clock := time.Unix(1000, 0)
	serve(b, &job{}, clock.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	var first, queued []*task
	for i := range 4 { // two served at once, two queued behind them: due at 0.2 s
		b.srv.inFlight.Add(1)
		tk := b.begin(&job{}, clock)
		if i < 2 {
			first = append(first, tk)
		} else {
			queued = append(queued, tk)
		}
	}
	for _, tk := range first {
		tk.endAt(clock.Add(100 * ms))
		b.srv.inFlight.Add(-1)
	}
	defer func() {
		for _, tk := range queued {
			tk.endAt(clock)
			b.srv.inFlight.Add(-1)
		}
	}()
	now := clock.Add(180 * ms)
	d, _ := estimateDelay(b, &job{}, now)
	assert.InDelta(t, 0.02, d.wait, 1e-6, "what is left of the plan, not 80 ms more for 80 ms past a start at once")
	assert.InDelta(t, 0.2, b.srv.speed.longestDelay(2, 2, now), 1e-6, "its delay as planned: 0.1 s queued, 0.1 s served")
	d, _ = estimateDelay(b, &job{}, clock.Add(250*ms))
	assert.InDelta(t, 0.05, d.wait, 1e-6, "50 ms past its planned end: 50 ms more")
}

// Requests sent to a server before it was measured were priced at
// nothing. Once its first answer is in, one sent with it is due a tenth
// of its work after that answer (beside it in a slot of its own); not
// answered by then, it waited behind it on a server of one slot, and is
// what a new request waits for: it began when that answer ended and takes
// as long as the server has shown it takes.
func TestRequestsSentBeforeTheFirstAnswerWaitBehindIt(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Add(2)
	first, second := b.begin(&job{}, clock), b.begin(&job{}, clock)
	first.learn(final(100*ms, 0, 0, 10, 1), clock.Add(100*ms))
	b.srv.inFlight.Add(-1)
	defer func() { second.endAt(clock); b.srv.inFlight.Add(-1) }()
	d, ok := estimateDelay(b, &job{}, clock.Add(105*ms))
	require.True(t, ok)
	assert.InDelta(t, 0.01, d.wait, 1e-6, "due beside the first answer at 0.11 s: a tenth of its work left at most")
	d, _ = estimateDelay(b, &job{}, clock.Add(120*ms))
	assert.InDelta(t, 0.08, d.wait, 1e-6, "not answered by then: begun at 0.1 s, behind the first answer, for 0.1 s")
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
	assert.InDelta(t, 20, table.typical("m"), 1e-9, "cut at 5: longer than 5, which the typical 20 is")

	// Cut at 100, it is longer than 100: the typical length is raised
	// toward it, here and on the server, and a request capped at 100 is
	// priced at more than 20 tokens.
	other.srv.inFlight.Store(1)
	serve(other, &job{model: "m", maxOutput: 100, answers: table}, clock.Add(2*remeasureAfter+2*time.Second+100*ms), finalGen(40*ms, 400*ms, 0, 0, 12, 100))
	assert.Greater(t, table.typical("m"), 20.0)
	assert.LessOrEqual(t, table.typical("m"), 100.0)
	other.srv.speed.mu.Lock()
	out := other.srv.speed.all.outTokens
	other.srv.speed.mu.Unlock()
	assert.Greater(t, out, 20.0, "the server's own typical answer too")
	d, _ = estimateDelay(other, &job{model: "m", maxOutput: 100}, clock.Add(2*remeasureAfter+3*time.Second))
	assert.Greater(t, d.output, 20*0.004*1.01, "priced above 20 tokens")
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

// A request sent while another loads its model waits for that load, and
// is priced, when sent, with what the load was expected to take (2 s
// before any load was seen). Once the loading request's answer shows the
// load over, it starts from the load's end: on a server whose load took
// 1 s it is no longer expected to run a second more (two-models: requests
// that joined a first load made their server look 1.5 s away once it had
// loaded, and a second copy of the model was loaded on another server,
// evicting a model in use there).
func TestRequestsThatJoinedALoadStartWhenItEnded(t *testing.T) {
	b := testBackend("a", func(c *Backend) { c.MaxParallel = 2 })
	b.srv.models.Store(psWith("a"))
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "a"}, clock.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	b.srv.inFlight.Store(0)

	b.srv.inFlight.Add(1)
	loader := b.begin(&job{model: "b"}, clock)
	require.True(t, loader.loader)
	b.srv.inFlight.Add(1)
	joined := b.begin(&job{model: "b"}, clock.Add(100*ms))
	require.True(t, joined.cold && !joined.loader, "it joins the load under way")
	require.Greater(t, joined.work, 1.5, "priced with the rest of the load, at the 2 s prior")
	defer func() {
		joined.endAt(clock)
		b.srv.inFlight.Add(-1)
	}()
	endOf := func(now time.Time) float64 {
		sp := &b.srv.speed
		sp.mu.Lock()
		defer sp.mu.Unlock()
		end := math.NaN()
		sp.replayLocked(int(b.srv.inFlight.Load()), 2, 0.1, now, func(tk *task, e float64) {
			if tk == joined {
				end = e
			}
		})
		return end
	}
	assert.InDelta(t, 1.6, endOf(clock.Add(500*ms)), 0.01, "the load under way is taken to last the 2 s prior")

	loaded, _ := loader.learn(final(100*ms, time.Second, 0, 10, 1), clock.Add(1100*ms))
	require.True(t, loaded)
	loader.endAt(clock.Add(1100 * ms))
	b.srv.inFlight.Add(-1)
	assert.Less(t, endOf(clock.Add(1200*ms)), 0.15, "the load ended at 1 s, and its 0.1 s of work with it: only a share of its work is left")
}

// A server timed on short prompts only is priced at a long one on the
// shape of another server's fit, scaled to what it took for the short
// ones: not in proportion to tokens, which takes its fixed part (most of a
// short prompt's time) as paid per token.
func TestALongPromptIsPricedOnTheShapeAnotherServerLearned(t *testing.T) {
	clock := time.Unix(1000, 0)
	ref := testBackend("ref", nil) // 50 ms + 0.2 ms a token: 100 and 1000 tokens seen
	clock = servedPrompts(ref, clock, 50*ms, 200*time.Microsecond, 100, 1000, 100, 1000)
	short := testBackend("short", nil) // 12 tokens in 97 ms, nothing longer
	clock = servedPrompts(short, clock, 97*ms, 0, 12, 12, 12)

	long := &job{model: "m", promptChars: int(1000 * charsPerToken), maxOutput: 1}
	d, ok := short.srv.speed.estimate(long, 0, 0, false, clock)
	require.True(t, ok)
	assert.InDelta(t, 0.097/12*1000, d.prompt, 0.01, "no other server's fit: in proportion to tokens")

	notePromptRefs([]*backend{short, ref}, long)
	require.Equal(t, 1, long.refs.n, "ref's fit separates its parts; short's does not")
	d, _ = short.srv.speed.estimate(long, 0, 0, false, clock)
	k := 0.097 / (0.050 + 12*0.0002) // how much slower short is at its own prompts
	assert.InDelta(t, k*(0.050+1000*0.0002), d.prompt, 0.01, "ref's shape, scaled")
	dRef, _ := ref.srv.speed.estimate(long, 0, 0, false, clock)
	assert.InDelta(t, 0.250, dRef.prompt, 0.005, "a server with a fit of its own keeps it")

	shortJob := &job{model: "m", promptChars: int(12 * charsPerToken), maxOutput: 1}
	notePromptRefs([]*backend{ref}, shortJob)
	d, _ = short.srv.speed.estimate(shortJob, 0, 0, false, clock)
	assert.InDelta(t, 0.097, d.prompt, 0.002, "the size it has seen: what it took")
}

// The routing this changes: a long prompt goes to an idle server timed
// on short prompts only, a little slower at those, rather than waiting
// behind a long answer on the one server that was timed on a long prompt
// (random-31: long prompts queued on a server of one slot).
func TestALongPromptIsNotQueuedBehindTheOnlyServerTimedOnOne(t *testing.T) {
	now := time.Now().Add(-10 * time.Second)
	timed := testBackend("timed", func(b *Backend) { b.MaxParallel = 1 })
	now = servedPrompts(timed, now, 50*ms, 200*time.Microsecond, 12, 600, 12, 600)
	other := testBackend("other", func(b *Backend) { b.MaxParallel = 4 })
	servedPrompts(other, now, 90*ms, 0, 12, 12, 12)
	timed.srv.inFlight.Store(1)
	busy := timed.begin(&job{model: "m", promptChars: int(5000 * charsPerToken)}, time.Now()) // a prompt of a second under way
	defer busy.endAt(time.Now())

	long := &job{model: "m", promptChars: int(600 * charsPerToken), maxOutput: 1}
	notePromptRefs([]*backend{timed, other}, long)
	h := &Handler{}
	assert.Equal(t, "other", pickLeastDelay(h, []*backend{timed, other}, long).cfg.Name,
		"other is about 1.7x timed's speed at 600 tokens (0.3 s), not 7.5 s as 90 ms per 12 tokens would have it")
}

// servedPrompts has b answer, alone and 200 ms apart from clock on, one
// request for model m per size (prompt tokens), each prompt evaluated in
// fixed plus perTok a token, and returns the clock after the last.
func servedPrompts(b *backend, clock time.Time, fixed, perTok time.Duration, sizes ...int64) time.Time {
	for _, n := range sizes {
		clock = clock.Add(200 * ms)
		b.srv.inFlight.Store(1)
		serve(b, &job{model: "m"}, clock, finalGen(fixed+time.Duration(n)*perTok, 10*ms, 0, 0, n, 1))
	}
	b.srv.inFlight.Store(0)
	return clock
}
