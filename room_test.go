package ollamaflow

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// roomTestPool is models-104's shape: slow, one slot, three times as slow,
// holding model-a and busy with it; big, four slots, holding model-b with a
// slot free, its lists never having shown more than one model.
func roomTestPool(now time.Time, bigSlots int, bigTakes time.Duration) (h *Handler, slow, big *backend) {
	slow = testBackend("slow", func(c *Backend) { c.MaxParallel = 1 })
	big = testBackend("big", func(c *Backend) { c.MaxParallel = bigSlots })
	slow.srv.models.Store(psWith("a"))
	big.srv.models.Store(psWith("b"))
	learnedTaking(slow, now.Add(-time.Second), 300*ms)
	learnedTaking(big, now.Add(-time.Second), bigTakes)
	slow.srv.inFlight.Add(1)
	slow.begin(&job{model: "a"}, now.Add(-10*ms))
	h = &Handler{backends: []*backend{slow, big}}
	h.queue = newQueue(h)
	return h, slow, big
}

// While a model's requests queue on its one copy, a server that would
// serve it far sooner, whose room is only what its lists showed, gets a
// load copy of a request: the request itself goes where it was priced.
func TestAQueueForAModelTestsTheRoomOfAServerThatWouldServeItSooner(t *testing.T) {
	now := time.Now()
	h, slow, big := roomTestPool(now, 4, 100*ms)
	j := &job{model: "a", copyable: true, cands: h.backends}
	got := pickLeastDelay(h, []*backend{slow}, j)
	if got != nil {
		assert.Same(t, slow, got, "the request waits for slow or goes there, not to a load")
	}
	require.Same(t, big, j.loadTo, "a load copy tests whether big has room for a beside b")

	j2 := &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j2)
	assert.Nil(t, j2.loadTo, "the load is under way: one at a time")
	big.srv.speed.unplanLoad("a") // the copy failed
	pickLeastDelay(h, []*backend{slow}, j2)
	assert.Nil(t, j2.loadTo, "one test per server per roomTestEvery")
	big.srv.speed.roomTested = now.Add(-roomTestEvery)
	j3 := &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j3)
	assert.Same(t, big, j3.loadTo, "tested again once roomTestEvery has passed")

	// An eviction showed big's room: nothing to test.
	h, slow, big = roomTestPool(now, 4, 100*ms)
	big.srv.speed.room, big.srv.speed.roomAt = 1, now.Add(-time.Minute)
	j = &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Nil(t, j.loadTo)

	// Not twice what the copy serves: not worth an eviction, should the
	// room be one.
	h, slow, _ = roomTestPool(now, 1, 200*ms) // 5 requests a second against slow's 3.3
	j = &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Nil(t, j.loadTo)

	// Of two that could be tested, only the one that would serve most.
	h, slow, big = roomTestPool(now, 4, 100*ms)
	mid := testBackend("mid", func(c *Backend) { c.MaxParallel = 2 })
	mid.srv.models.Store(psWith("c"))
	learnedTaking(mid, now.Add(-time.Second), 100*ms)
	h.backends = []*backend{slow, mid, big}
	big.srv.inFlight.Store(4)
	j = &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Nil(t, j.loadTo, "big, which would serve a most, has no slot free: mid is not tested instead")
	big.srv.inFlight.Store(0)
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Same(t, big, j.loadTo)

	// A test that passed (big's lists showed one model more than when it
	// was tested) leaves big open to the next: its room may be larger
	// still. One whose outcome is not seen yet does not.
	h, slow, big = roomTestPool(now, 4, 100*ms)
	big.srv.models.Store(psWith("b", "c"))
	big.srv.speed.roomTested, big.srv.speed.roomTestedAt = now.Add(-time.Second), 2
	j = &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Nil(t, j.loadTo, "tested a second ago with two models showing: no larger room seen yet")
	big.srv.speed.roomTestedAt = 1
	pickLeastDelay(h, []*backend{slow}, j)
	assert.Same(t, big, j.loadTo, "the room grew from one to two since the test: tested again")

	// Nothing queues for the model: no test.
	h, slow, big = roomTestPool(now, 4, 100*ms)
	slow.srv.inFlight.Add(-1)
	for _, tk := range slow.srv.speed.tasks {
		tk.endAt(now)
	}
	j = &job{model: "a", copyable: true, cands: h.backends}
	assert.Same(t, slow, pickLeastDelay(h, []*backend{slow, big}, j))
	assert.Nil(t, j.loadTo)
}

// A load that was to evict a model the lists showed, followed by a list
// showing the model loaded and the other gone, shows the server's room as
// an eviction would: the server is not tested for more. One whose next
// list shows both held more than its lists had shown.
func TestALoadThatSwappedAListedModelShowsTheRoom(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		after []string
		room  int
		shown bool
	}{
		{[]string{"a"}, 1, true},
		{[]string{"a", "b"}, 2, false},
	} {
		b := testBackend("s", nil)
		before := listedAt(b, now.Add(-time.Second), "b")
		learned(b, now.Add(-time.Second))
		sp := &b.srv.speed
		require.True(t, sp.roomUntested(before, "a", now), "one model listed: its room may be larger")
		b.srv.inFlight.Add(1)
		task := b.begin(&job{model: "a"}, now)
		require.True(t, task.loader)
		require.False(t, b.srv.models.Load().isLoaded("b"), "a is taken to evict b")

		sp.noticeSwap(psWith(tc.after...)) // a list from before the load (no time): nothing learned
		require.True(t, sp.roomUntested(before, "c", now))
		after := psWith(tc.after...)
		after.at = now.Add(time.Second)
		b.srv.models.Store(after)
		sp.noticeSwap(after)
		assert.Equal(t, !tc.shown, sp.roomUntested(after, "c", now.Add(time.Second)), "after %v", tc.after)
		sp.mu.Lock()
		assert.Equal(t, tc.room, sp.roomLocked(after, 0), "after %v", tc.after)
		sp.mu.Unlock()
		task.endAt(now)
		b.srv.inFlight.Add(-1)
	}
}

// A list read while another model's load is under way on the server
// does not show that model yet (Ollama lists it when its runner has
// started, for a llama model at the end of the load): counted with it,
// the swap seen there shows the room the server had, not one less.
func TestASwapSeenWhileAnotherLoadIsUnderWayCountsThatLoad(t *testing.T) {
	now := time.Now()
	b := testBackend("s", nil)
	listedAt(b, now.Add(-time.Second), "a", "b", "c")
	learned(b, now.Add(-time.Second))
	sp := &b.srv.speed
	b.srv.inFlight.Add(2)
	x := b.begin(&job{model: "x"}, now) // taken to evict a
	d := b.begin(&job{model: "d"}, now) // taken to evict b
	require.True(t, x.loader && d.loader)
	after := psWith("c", "d") // d loaded, b gone; x still loading
	after.at = now.Add(time.Second)
	b.srv.models.Store(after)
	sp.noticeSwap(after)
	sp.mu.Lock()
	assert.Equal(t, 3, sp.roomLocked(after, 0), "c, d and x: room three")
	sp.mu.Unlock()
	x.endAt(now)
	d.endAt(now)
	b.srv.inFlight.Add(-2)
}

// A server whose lists showed three models at once holds what Ollama
// holds by default (OLLAMA_MAX_LOADED_MODELS, three per GPU): it is not
// tested for a fourth, whose failure would evict a model in use there
// (models-274: three loads of models asked most followed one test). One
// that showed two may hold more.
func TestAServerHoldingThreeModelsIsNotTestedForAFourth(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		listed []string
		tested bool
	}{
		{[]string{"a", "b"}, true},
		{[]string{"a", "b", "c"}, false},
	} {
		b := testBackend("s", nil)
		snap := listedAt(b, now.Add(-time.Second), tc.listed...)
		learned(b, now.Add(-time.Second))
		assert.Equal(t, tc.tested, b.srv.speed.roomUntested(snap, "d", now), "listed %v", tc.listed)
	}
}

// A room test that fails swaps the model the tested server held for the
// one tested, so it is sent only when that swap is bearable: models-259's
// shape, big (three slots) holding model-b, one and two (one slot each)
// holding model-a, two model-b as well, model-a's requests queueing.
func TestARoomTestIsSentOnlyWhereItsFailureWouldBeABearableSwap(t *testing.T) {
	now := time.Now()
	pool := func(twoHolds []string, asked map[string]int) (*Handler, []*backend, *backend) {
		big := testBackend("big", func(c *Backend) { c.MaxParallel = 3 })
		one := testBackend("one", func(c *Backend) { c.MaxParallel = 1 })
		two := testBackend("two", func(c *Backend) { c.MaxParallel = 1 })
		big.srv.models.Store(psWith("b"))
		one.srv.models.Store(psWith("a"))
		two.srv.models.Store(psWith(twoHolds...))
		for _, b := range []*backend{big, one, two} {
			learnedTaking(b, now.Add(-time.Second), 100*ms)
		}
		big.srv.speed.ratesLocked("b").lastUsed = now.Add(-time.Second)
		for _, b := range []*backend{one, two} {
			b.srv.inFlight.Add(1)
			b.begin(&job{model: "a"}, now.Add(-10*ms))
		}
		h := &Handler{backends: []*backend{big, one, two}, demand: newModelDemand()}
		h.queue = newQueue(h)
		for i := 0; i < 12; i++ {
			for m, n := range asked {
				for k := 0; k < n; k++ {
					h.demand.note(m, now.Add(-time.Duration(12-i)*ms))
				}
			}
		}
		return h, []*backend{one, two}, big
	}
	for _, tc := range []struct {
		name     string
		twoHolds []string
		asked    map[string]int
		tested   bool
	}{
		// b's three slots would go to a, b left with two's one slot:
		// b then as pressed as a is now, twice over.
		{"asked alike, b has a second copy", []string{"a", "b"}, map[string]int{"a": 1, "b": 1}, false},
		{"a asked six times as much", []string{"a", "b"}, map[string]int{"a": 6, "b": 1}, true},
		// big holds b's only copy: a failed test puts the model asked
		// more on the big server (models-104), not the one asked alike.
		{"asked alike, b's only copy", []string{"a"}, map[string]int{"a": 1, "b": 1}, false},
		{"a asked more, b's only copy", []string{"a"}, map[string]int{"a": 3, "b": 1}, true},
	} {
		h, copies, big := pool(tc.twoHolds, tc.asked)
		j := &job{model: "a", copyable: true, cands: h.backends}
		pickLeastDelay(h, copies, j)
		want, got := "", ""
		if tc.tested {
			want = big.cfg.Name
		}
		if j.loadTo != nil {
			got = j.loadTo.cfg.Name
		}
		assert.Equal(t, want, got, "%s: the server sent a load copy to test its room", tc.name)
	}

	// b idle for evictionHorizon: evicting it costs nothing, tested
	// whatever its share.
	h, copies, big := pool([]string{"a", "b"}, map[string]int{"a": 1, "b": 1})
	big.srv.speed.ratesLocked("b").lastUsed = now.Add(-evictionHorizon - time.Second)
	j := &job{model: "a", copyable: true, cands: h.backends}
	pickLeastDelay(h, copies, j)
	assert.Same(t, big, j.loadTo)
}

// A room test's failure is priced for a typical request of each model, not
// for the request that asks: a short cap makes prompts weigh more, and a
// server slower at prompts then looks worse, which moved the pressures
// enough to let one request's test through where the others' were refused
// (models-333).
func TestARoomTestsSwapIsPricedForTypicalRequests(t *testing.T) {
	now := time.Now()
	big := testBackend("big", func(c *Backend) { c.MaxParallel = 3 })
	held := testBackend("held", func(c *Backend) { c.MaxParallel = 1 })
	other := testBackend("other", func(c *Backend) { c.MaxParallel = 1 })
	for b, prompt := range map[*backend]time.Duration{big: 10 * ms, held: 50 * ms, other: 10 * ms} {
		b.srv.inFlight.Add(1)
		serve(b, &job{}, now.Add(-time.Second), finalGen(prompt, 100*ms, 0, 0, 10, 10))
		b.srv.inFlight.Add(-1)
	}
	big.srv.models.Store(psWith("v"))
	other.srv.models.Store(psWith("v"))
	held.srv.models.Store(psWith("m"))
	big.srv.speed.ratesLocked("v").lastUsed = now.Add(-time.Second)
	h := &Handler{backends: []*backend{big, held, other}, demand: newModelDemand()}
	for i := 0; i < 12; i++ {
		for m, n := range map[string]int{"m": 3, "v": 7} {
			for k := 0; k < n; k++ {
				h.demand.note(m, now.Add(-time.Duration(12-i)*ms))
			}
		}
	}
	typical := h.swapBearable(big, &job{model: "m"}, now)
	assert.False(t, typical, "v, losing big, would be more pressed than m is now")
	assert.Equal(t, typical, h.swapBearable(big, &job{model: "m", maxOutput: 1}, now),
		"a request capped at one token is priced as the typical one")
}
