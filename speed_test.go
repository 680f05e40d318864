package ollamaflow

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

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

// slowAtPrompts is a server that answered six requests of 12 prompt
// tokens and one output token in 300 ms each (nothing but the prompt
// tells its speed: a model that shared the GPU still loaded), one in
// flight, and the time of its last answer.
func slowAtPrompts() (*backend, time.Time) {
	b := testBackend("a", nil)
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	for range 6 {
		clock = clock.Add(200 * ms)
		serve(b, &job{}, clock, finalGen(300*ms, 0, 0, 0, 12, 1))
	}
	return b, clock
}

func TestAServerFasterAtPromptsAloneIsReLearnedAfterALimitOfAnswers(t *testing.T) {
	b, clock := slowAtPrompts()
	j := &job{promptChars: 4 * 12, maxOutput: 1}
	d, _ := estimateDelay(b, j, clock)
	require.InDelta(t, 0.3, d.prompt, 0.01)

	// The other model left: every prompt now takes 100 ms. Until
	// cacheSuspectLimit of them in a row they may be cache hits.
	for range cacheSuspectLimit - 1 {
		clock = clock.Add(200 * ms)
		serve(b, &job{}, clock, finalGen(100*ms, 0, 0, 0, 12, 1))
	}
	d, _ = estimateDelay(b, j, clock)
	assert.InDelta(t, 0.3, d.prompt, 0.01, "a few fast prompts may be a cache")
	// The limit reached, the server is what the answers say, not an
	// average with what it was: averaged in, the answer moved the
	// estimate to 0.25 s, and each limit of answers after it as little
	// again (bench/workloads speedup-prompt: a server recovered from 3×
	// slower still believed slow 4 s later).
	clock = clock.Add(200 * ms)
	serve(b, &job{}, clock, finalGen(100*ms, 0, 0, 0, 12, 1))
	d, _ = estimateDelay(b, j, clock)
	assert.InDelta(t, 0.1, d.prompt, 0.01, "re-learned after %d answers", cacheSuspectLimit)
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
