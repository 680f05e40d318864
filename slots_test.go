package ollamaflow

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

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
func servedTogether(b *backend, n int, at time.Time) { servedTogetherIn(b, n, at, 100*ms) }

// servedTogetherIn runs n requests through b, sent at at and served at
// once, each working took without a wait.
func servedTogetherIn(b *backend, n int, at time.Time, took time.Duration) {
	var tasks []*task
	for range n {
		b.srv.inFlight.Add(1)
		tasks = append(tasks, b.begin(&job{}, at))
	}
	for _, tk := range tasks {
		tk.learn(final(took, 0, 0, 10, 1), at.Add(took))
	}
	b.srv.inFlight.Store(0)
}

// waitedBehind runs one request through b that came at at, 50 ms after n
// others that were at work, and waited wait for the first of them to end
// (the rest end with it): a server with n slots, all taken.
func waitedBehind(b *backend, n int, at time.Time, wait time.Duration) {
	waitedBehindIn(b, n, at, wait, 100*ms)
}

// waitedBehindIn is waitedBehind with each request working took.
func waitedBehindIn(b *backend, n int, at time.Time, wait, took time.Duration) {
	var ahead []*task
	for range n {
		b.srv.inFlight.Add(1)
		ahead = append(ahead, b.begin(&job{}, at.Add(-50*ms)))
	}
	b.srv.inFlight.Add(1)
	tk := b.begin(&job{}, at)
	ahead[0].learn(final(took, 0, 0, 10, 1), at.Add(wait))
	tm := final(took, 0, wait, 10, 1)
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
