package ollamaflow

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A fresh pool of two servers that differ by the kind of work: decode,
// measured, evaluates prompts slowly; prefill, still being measured, is
// busy with its first requests and not offered. A summary of a long
// document waits for prefill's first answer, at most a quarter of its
// expected time on decode, instead of taking decode at once; a request
// decode serves about as fast as its others is not held.
func TestARequestWaitsForAServerBeingMeasuredUpToAQuarterOfItsTimeOnTheBest(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	decode, prefill := testBackend("decode", nil), testBackend("prefill", nil)
	// decode: a short question (12 tokens, 100 generated at 1 ms) and a
	// summary (2,000 tokens at 0.4 ms).
	decode.srv.inFlight.Store(1)
	serve(decode, &job{promptChars: 48, maxOutput: 100}, now.Add(-2*time.Second), finalGen(5*ms, 100*ms, 0, 0, 12, 100))
	serve(decode, &job{promptChars: 8000, maxOutput: 5}, now.Add(-1500*ms), finalGen(800*ms, 5*ms, 0, 0, 2000, 5))
	decode.srv.inFlight.Store(0)
	summary := func() *job { return &job{promptChars: 8000, maxOutput: 5} }
	d, ok := h.expectedDelayOf(decode, summary())
	require.True(t, ok)
	require.Greater(t, d, 0.5, "a summary is slow on decode")

	// prefill's first requests went out 20 ms ago.
	measuring(prefill, summary(), now.Add(-20*ms))
	prefill.srv.inFlight.Add(1)

	j := summary()
	j.cands = []*backend{prefill, decode}
	assert.Nil(t, pickLeastDelay(h, []*backend{decode}, j), "held for prefill's first answer")
	require.False(t, j.heldSince.IsZero())
	assert.Nil(t, pickLeastDelay(h, []*backend{decode}, j), "still within a quarter of its time on decode")

	// Held for a quarter of its expected time: it takes decode.
	j.heldSince = time.Now().Add(-time.Duration(d * measuringHoldShare * float64(time.Second)))
	assert.Same(t, decode, pickLeastDelay(h, []*backend{decode}, j))

	// A question decode answers as fast as it answers most: not held.
	question := &job{promptChars: 48, maxOutput: 100, cands: []*backend{prefill, decode}}
	assert.Same(t, decode, pickLeastDelay(h, []*backend{decode}, question))
	assert.True(t, question.heldSince.IsZero())

	// With nothing being measured, nothing is waited for.
	other := summary()
	other.cands = []*backend{decode}
	assert.Same(t, decode, pickLeastDelay(h, []*backend{decode}, other))
}

// A fresh pool: fast answered its first request in 0.5 s; slow has run
// its measuring request for longer than that, with a spare beside it. The
// spare is about to be outrun and moved to fast, and was sent before the
// request now arriving: that request waits until slow is outrun (or
// answers) instead of taking fast's free slot ahead of the spare.
func TestARequestLetsTheSparesAboutToBeOutrunGoFirst(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	// pair is fast, which answered its one request in 0.5 s, and slow,
	// whose measuring request went out ran before now, a spare beside it.
	pair := func(name string, ran time.Duration) (fast, slow *backend) {
		fast, slow = testBackend(name+"-fast", nil), testBackend(name+"-slow", nil)
		fast.srv.inFlight.Store(1)
		serve(fast, &job{}, now.Add(-3*time.Second), final(500*ms, 0, 0, 10, 1))
		fast.srv.inFlight.Store(0)
		measuring(slow, &job{}, now.Add(-ran))
		slow.srv.inFlight.Add(1) // the spare
		return fast, slow
	}

	// slow's measuring request went out 0.52 s ago (fast took 0.5 s):
	// outrun at 0.55 s and the proxy's slack.
	fast, slow := pair("a", 520*ms)
	pool := []*backend{fast, slow}
	assert.Nil(t, pickLeastDelay(h, pool, &job{}), "held until the spare has moved")

	// Moved requests and requests where no spare waits are not held.
	assert.Same(t, fast, pickLeastDelay(h, pool, &job{moved: true}))
	slow.srv.inFlight.Add(-1)
	assert.Same(t, fast, pickLeastDelay(h, pool, &job{}), "no spare beside the measuring request")

	// slow has run for less than fast's time: it may answer as soon, and
	// its spare stays.
	fast, slow = pair("b", 300*ms)
	assert.Same(t, fast, pickLeastDelay(h, []*backend{fast, slow}, &job{}))

	// Once slow is outrun, the hold is over.
	fast, slow = pair("c", 600*ms)
	assert.Same(t, fast, pickLeastDelay(h, []*backend{fast, slow}, &job{}))
}
