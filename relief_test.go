package ollamaflow

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// scoredAt prices j on b at now as pickLeastDelay does (weight 1, warm).
func scoredAt(b *backend, j *job, now time.Time) (scored, delay) {
	d, _ := estimateDelay(b, j, now)
	return scored{b: b, cost: d.total(), service: d.prompt + d.output, wait: d.wait,
		free: d.slotFree()}, d
}

// measuredAlone is a server that served one request of work alone, 10 s
// before clock (long enough ago to be due a re-measurement).
func measuredAlone(name string, work time.Duration, maxParallel int, clock time.Time) *backend {
	b := testBackend(name, func(c *Backend) { c.MaxParallel = maxParallel })
	b.srv.inFlight.Store(1)
	serve(b, &job{}, clock.Add(-10*time.Second), final(work, 0, 0, 10, 1))
	b.srv.inFlight.Store(0)
	return b
}

// fastBusySlowIdle is a fast server (0.1 s, one slot) busy for 80 ms more
// and an idle slow one (0.3 s, two slots), both measured alone; release
// frees the fast one's slot.
func fastBusySlowIdle(clock time.Time) (fast, slow *backend, release func()) {
	fast = measuredAlone("fast", 100*ms, 1, clock)
	slow = measuredAlone("slow", 300*ms, 2, clock)
	return fast, slow, hold(fast, 1, clock.Add(-20*ms))
}

func TestALastingQueueIsRelievedOntoASlowerFreeSlotWithinTheTail(t *testing.T) {
	clock := time.Unix(1000, 0)
	// The fast server is busy for 80 ms more; the slow one runs a request
	// the pool chose, expected to take its 0.3 s, and has a slot free.
	fast, slow, releaseFast := fastBusySlowIdle(clock)
	defer releaseFast()
	j := &job{}
	releaseSlow := hold(slow, 1, clock.Add(-20*ms))
	f, fd := scoredAt(fast, j, clock)
	s, sd := scoredAt(slow, j, clock)
	require.InDelta(t, 0.08, fd.wait, 1e-6)
	require.Less(t, fd.total(), sd.total(), "alone, the request ends sooner in the fast queue")
	assert.InDelta(t, 0.3, slow.srv.speed.longestDelay(2, 1, clock), 1e-6, "the tail the pool has: the slow server's request")
	assert.Same(t, slow, queueRelief([]scored{f, s}, fd.wait, 0, clock),
		"its 0.3 s is no longer than a request the pool already runs: the free slot serves while the queue waits")
	assert.Nil(t, queueRelief([]scored{f, s}, 0, 0, clock), "no queue to relieve")
	releaseSlow()

	// Nothing in flight takes as long as the slow server would: a queue
	// of one request at the fast one (the fast/slow pool's burst) keeps
	// its tail there.
	f, fd = scoredAt(fast, j, clock)
	s, _ = scoredAt(slow, j, clock)
	assert.InDelta(t, 0.1, expectedTailOf(clock, fast, slow), 1e-6)
	assert.Nil(t, queueRelief([]scored{f, s}, fd.wait, 0, clock), "0.3 s would be the pool's worst: the request queues")

	// A re-measurement of the slow server was sent to learn, not because
	// the pool accepts its delay: it sets no tail.
	require.Equal(t, remeasureRequest, slow.srv.speed.claimRemeasure(clock, nil, false))
	releaseSlow = hold(slow, 1, clock.Add(-20*ms))
	defer releaseSlow()
	assert.Zero(t, slow.srv.speed.longestDelay(2, 1, clock))
	f, fd = scoredAt(fast, j, clock)
	s, _ = scoredAt(slow, j, clock)
	assert.Nil(t, queueRelief([]scored{f, s}, fd.wait, 0, clock))
}

func TestAQueueIsRelievedOntoAnUntriedSlotAtItsHalfWait(t *testing.T) {
	for _, c := range []struct {
		long    time.Duration // a request in flight elsewhere takes this: the pool's tail
		relieve bool
	}{
		{1000 * ms, true}, // 0.44 s is within the tail
		{400 * ms, false}, // 0.44 s is not, though the slot alone (0.3 s) would be
	} {
		clock := time.Unix(1000, 0)
		fast := measuredAlone("fast", 100*ms, 1, clock)
		slow := measuredAlone("slow", 300*ms, 0, clock) // one slot seen, a second not ruled out
		mid := measuredAlone("mid", c.long, 1, clock)   // full
		j := &job{}
		releaseFast := hold(fast, 1, clock.Add(-20*ms))
		releaseSlow := hold(slow, 1, clock.Add(-20*ms))
		releaseMid := hold(mid, 1, clock.Add(-20*ms))
		f, fd := scoredAt(fast, j, clock)
		s, sd := scoredAt(slow, j, clock)
		m, _ := scoredAt(mid, j, clock)
		require.True(t, sd.untried)
		require.InDelta(t, 0.14, sd.wait, 1e-6, "half the 0.28 s left of the request in its one slot seen")
		require.Less(t, fd.total(), sd.total(), "alone, the request ends sooner in the fast queue")
		got := queueRelief([]scored{f, s, m}, fd.wait, 0, clock)
		if c.relieve {
			assert.Same(t, slow, got, "a slot never seen in use is tried where the pool's queue would hold the request")
		} else {
			assert.Nil(t, got, "the untried slot is priced with half the wait, as everywhere")
		}
		releaseFast()
		releaseSlow()
		releaseMid()
	}
}

// expectedTailOf is the longest delay expected in flight on any of list.
func expectedTailOf(clock time.Time, list ...*backend) float64 {
	tail := 0.0
	for _, b := range list {
		tail = max(tail, b.longestDelay(clock))
	}
	return tail
}

func TestALastingQueueIsRelievedWithinTheDelaysClientsHadLately(t *testing.T) {
	clock := time.Unix(1000, 0)
	fast, slow, releaseFast := fastBusySlowIdle(clock)
	defer releaseFast()
	j := &job{}
	f, fd := scoredAt(fast, j, clock)
	s, _ := scoredAt(slow, j, clock)
	require.Greater(t, fd.wait, 0.0)
	require.Less(t, expectedTailOf(clock, fast, slow), 0.3, "nothing in flight takes as long as the slow server")

	// delays notes 200 requests over the last 4 s, those numbered in slow
	// taking as long as the slow server does.
	delays := func(slow ...int) *servedDelays {
		var s servedDelays
		for i := range 200 {
			d := 0.12
			if slices.Contains(slow, i) {
				d = 0.31
			}
			s.note(d, clock.Add(-time.Duration(200-i)*20*ms))
		}
		return &s
	}
	// Two in each 2 s half (more than 1 in 100): the slow server's 0.3 s
	// is within the p99 the clients have had for a while.
	served := delays(30, 60, 130, 160)
	require.InDelta(t, 0.31, served.p99(clock), 1e-9)
	assert.Same(t, slow, queueRelief([]scored{f, s}, fd.wait, served.p99(clock), clock),
		"the pool's clients already have 0.3 s delays: the free slot serves while the queue waits")

	// One in 100 is beyond the p99; and slow delays of a moment (in one
	// half only: the requests on a server as it slowed down) are no
	// tail the pool has: the request queues.
	for _, slowOnes := range [][]int{{60, 160}, {130, 140, 160}} {
		p99 := delays(slowOnes...).p99(clock)
		require.InDelta(t, 0.12, p99, 1e-9, "slow ones %v", slowOnes)
		assert.Nil(t, queueRelief([]scored{f, s}, fd.wait, p99, clock))
	}

	// Too few delays, or old ones, say nothing.
	assert.Zero(t, served.p99(clock.Add(4*time.Second)), "every delay older than servedWindow")
	assert.Zero(t, served.p99(clock.Add(2*time.Second)), "fewer than twice servedMin left in the window")
	var few servedDelays
	for i := range 2*servedMin - 1 {
		few.note(1, clock.Add(-time.Duration(i%2)*3*time.Second))
	}
	assert.Zero(t, few.p99(clock), "halves short of servedMin")
	few.note(1, clock.Add(-3*time.Second))
	assert.Zero(t, few.p99(clock.Add(servedFresh/2)), "computed at most every servedFresh")
	assert.Equal(t, 1.0, few.p99(clock.Add(servedFresh)))
	// Memory is bounded: above servedRing requests in the window, the
	// latest servedRing are what counts.
	var busy servedDelays
	for i := range servedRing + 100 {
		d := 0.12
		if i < 100 {
			d = 5
		}
		busy.note(d, clock)
	}
	assert.InDelta(t, 0.12, busy.p99(clock), 1e-9)
	var none *servedDelays // a handler not provisioned
	none.note(1, clock)
	assert.Zero(t, none.p99(clock))
}
