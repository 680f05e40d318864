package ollamaflow

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// steady is a server that has answered 20 requests a tenth of a second
// apart: 10 prompt tokens in 60 ms and 4 tokens generated in 40 ms each.
func steady() (*backend, time.Time) {
	return steadyAt(60*ms, 40*ms)
}

func steadyAt(prompt, eval time.Duration) (*backend, time.Time) {
	b := testBackend("a", nil)
	b.srv.inFlight.Store(1)
	clock := time.Unix(1000, 0)
	for range 20 {
		clock = clock.Add(100 * ms)
		serve(b, &job{}, clock, finalGen(prompt, eval, 0, 0, 10, 4))
	}
	return b, clock
}

// idleEstimate is what a request would take on b with nothing in flight.
func idleEstimate(b *backend, clock time.Time) delay {
	d, _ := b.srv.speed.estimate(&job{}, 0, 0, false, clock)
	return d
}

func TestTwoAnswersThatDisagreeTheSameWayReplaceTheEstimate(t *testing.T) {
	b, clock := steady()
	d := idleEstimate(b, clock)
	assert.InDelta(t, 0.1, d.total(), 1e-6)

	// It turned four times slower: its next two answers, moments apart,
	// say so. Averaged in at the EWMA's weight they left it at 0.23 s,
	// and it drew requests at a speed it no longer had.
	clock = clock.Add(10 * ms)
	serve(b, &job{}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	d = idleEstimate(b, clock)
	assert.Less(t, d.total(), 0.2, "one answer alone is weighed as usual")
	clock = clock.Add(10 * ms)
	serve(b, &job{}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	d = idleEstimate(b, clock)
	assert.InDelta(t, 0.4, d.total(), 1e-6, "the second confirms it: what it does now")

	// It recovers: two answers that generate four times faster bring it
	// back at once, although its fast prompts alone could be a cache's.
	for range 2 {
		clock = clock.Add(10 * ms)
		serve(b, &job{}, clock, finalGen(60*ms, 40*ms, 0, 0, 10, 4))
	}
	d = idleEstimate(b, clock)
	assert.InDelta(t, 0.1, d.total(), 1e-6)
}

func TestOneOutlierOrScatteredOnesDoNotReplaceTheEstimate(t *testing.T) {
	b, clock := steady()
	// A slow answer, an ordinary one, a slow one: no two in a row.
	for _, slow := range []bool{true, false, true} {
		clock = clock.Add(10 * ms)
		tm := finalGen(60*ms, 40*ms, 0, 0, 10, 4)
		if slow {
			tm = finalGen(240*ms, 160*ms, 0, 0, 10, 4)
		}
		serve(b, &job{}, clock, tm)
	}
	d := idleEstimate(b, clock)
	assert.Less(t, d.total(), 0.25, "averaged in, not taken as the server's speed")

	// Two slow answers far apart (longer than shiftWithin) are no shift
	// either: each is weighed by its time since the one before.
	b, clock = steady()
	clock = clock.Add(10 * ms)
	serve(b, &job{}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	clock = clock.Add(shiftWithin + 100*ms)
	serve(b, &job{}, clock, finalGen(90*ms, 60*ms, 0, 0, 10, 4))
	clock = clock.Add(shiftWithin + 100*ms)
	serve(b, &job{}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	d = idleEstimate(b, clock)
	assert.Less(t, d.total(), 0.4*0.99)

	// Microseconds of scheduling noise on a fast generation are no
	// surprise, however large a factor they make: 4 tokens in 40 µs,
	// then twice in 100 µs.
	b, clock = steadyAt(60*ms, 40*time.Microsecond)
	for range 2 {
		clock = clock.Add(10 * ms)
		serve(b, &job{}, clock, finalGen(60*ms, 100*time.Microsecond, 0, 0, 10, 4))
	}
	d = idleEstimate(b, clock)
	assert.Less(t, d.output, 90e-6, "averaged in, not taken as a shift")
}

func TestAnAnswerSentToItsCacheStillShowsAServerThatSlowedDown(t *testing.T) {
	b, clock := steady()
	// Conversation affinity sends each request to its prompt cache here
	// (identical prompts): a fast prompt then says nothing of the
	// server's rate, but one four times slower than the whole prompt
	// would take says the server is slower, whatever its cache held.
	for range 2 {
		clock = clock.Add(10 * ms)
		serve(b, &job{cachedOn: &b.srv.speed}, clock, finalGen(240*ms, 160*ms, 0, 0, 10, 4))
	}
	d := idleEstimate(b, clock)
	assert.InDelta(t, 0.4, d.total(), 1e-6)

	// A prompt served from the cache, faster than the fit, still teaches
	// nothing of the prompt rate.
	b, clock = steady()
	for range 4 {
		clock = clock.Add(10 * ms)
		serve(b, &job{cachedOn: &b.srv.speed}, clock, finalGen(6*ms, 40*ms, 0, 0, 10, 4))
	}
	d = idleEstimate(b, clock)
	assert.InDelta(t, 0.06, d.prompt, 1e-6)
}
