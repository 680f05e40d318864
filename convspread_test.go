package ollamaflow

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Spreading new conversations (convroute.go: spreadNew, nearBest,
// withSureSlot); following them is tested in convroute_test.go.

// A new conversation goes where a slot is surely free before a server
// whose sure slots are all busy, even when the cost model prices that
// server's untried slot a little cheaper: the conversation would share a
// slot there for as long as it lasts.
func TestNewConversationsGoWhereASlotIsSurelyFree(t *testing.T) {
	now := time.Now()
	fast, near := testBackend("fast", nil), testBackend("near", nil)
	servedTogetherIn(fast, 2, now.Add(-time.Second), 100*ms) // two slots seen, a third not ruled out
	servedTogetherIn(near, 2, now.Add(-time.Second), 115*ms)
	release := hold(fast, 2, now.Add(-95*ms)) // both seen slots busy, about to free
	defer release()
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	j := &job{}
	dFast, _ := h.estimateOf(fast, j)
	dNear, _ := h.estimateOf(near, j)
	require.Less(t, dFast.total(), dNear.total(), "fast's untried third slot prices it below near")
	require.Equal(t, []string{"fast", "near"}, names(h.nearBest(&scratch{}, []*backend{fast, near}, j, spreadFactor, spreadMargin)),
		"both are near the best")
	// near holds a conversation that ended half a minute ago: by the
	// conversations they hold alone, fast would take the new one.
	h.affinity.record(conversation{prefixes: []uint64{16}, keep: []uint64{16}}, near.srv.key, 0, now.Add(-30*time.Second))
	require.Equal(t, []string{"fast"}, names(h.affinity.keepLeastHosting([]*backend{fast, near}, now)))

	b := h.spreadNew([]*backend{fast, near}, j, now)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "near", b.cfg.Name, "a slot surely free before an untried one behind two busy")

	// No sure slot free anywhere: the spread is the cost model's, as before.
	hNear := hold(near, 2, time.Now())
	kept, found := withSureSlot([]*backend{fast, near})
	assert.Equal(t, []string{"fast", "near"}, names(kept))
	assert.False(t, found)
	hNear()
	// A server's max_parallel is its sure slot count.
	fast.cfg.MaxParallel = 3
	kept, found = withSureSlot([]*backend{fast, near})
	assert.Equal(t, []string{"fast", "near"}, names(kept))
	assert.True(t, found)
}

// When every server near the best has its sure slots busy, a new
// conversation goes to a slower server with a slot surely free if the
// traffic is conversations (their later turns would share a slot with
// another's, each waiting behind and evicting the other), and to the
// fast server's queue if it is single-turn requests.
func TestNewConversationsDoNotShareASlotWhileASlowerOneIsFree(t *testing.T) {
	now := time.Now()
	fast, slow := testBackend("fast", nil), testBackend("slow", nil)
	// Answers of seconds, so that the test's own pace (fast's wait only
	// shrinks while it runs) cannot move a price across a bound.
	servedTogetherIn(fast, 2, now.Add(-8*time.Second), 2*time.Second)
	waitedBehindIn(fast, 2, now.Add(-4*time.Second), 500*ms, 2*time.Second) // two slots, no third
	servedTogetherIn(slow, 2, now.Add(-8*time.Second), 5600*ms)
	release := hold(fast, 2, now)
	defer release()
	h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
	j := &job{}
	dFast, _ := h.estimateOf(fast, j)
	dSlow, _ := h.estimateOf(slow, j)
	require.Positive(t, dFast.wait, "fast's two slots are busy")
	require.Zero(t, dSlow.wait)
	require.Less(t, dFast.total(), dSlow.total(), "fast's queue is the cheaper for this turn")
	require.Less(t, dSlow.total(), 1.8*dFast.total(), "but not by as much as a shared slot costs")
	list := []*backend{fast, slow}
	require.Equal(t, []string{"fast"}, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)),
		"slow is not near the best")

	// Single-turn traffic: no later turn to share a slot; the queue.
	for range 200 {
		h.affinity.noteTurn(false)
	}
	b := h.spreadNew(slices.Clone(list), j, now)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "fast", b.cfg.Name)

	// Conversations of about five turns: the free slot.
	for range 200 {
		for i := range 5 {
			h.affinity.noteTurn(i > 0)
		}
	}
	assert.InDelta(t, 0.8, h.affinity.followShare(), 0.05)
	b = h.spreadNew(slices.Clone(list), j, now)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "slow", b.cfg.Name)

	// Its two slots seen in use both busy, the slow server's third, not
	// ruled out, counts as free (priced with half the wait for the one
	// about to end): a server left with few conversations is never seen
	// with more in use, and its slots would stay unknown for good
	// (random-118: 20 conversations on 15 slots, two servers 3x and 4x
	// slower given few of them, 18.3 req/s; 20.2 this way).
	releaseSlow := hold(slow, 2, now.Add(-5*time.Second))
	dSlow, _ = h.estimateOf(slow, j)
	require.True(t, dSlow.untried)
	require.False(t, hasSureSlot(slow))
	require.Less(t, dSlow.total(), 1.8*dFast.total())
	b = h.spreadNew(slices.Clone(list), j, now)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "slow", b.cfg.Name, "an untried slot about as cheap as a free one")
	releaseSlow()

	// Not to a server dearer than sharing costs: one 4x slower than fast.
	slow2 := testBackend("slow2", nil)
	servedTogetherIn(slow2, 2, now.Add(-10*time.Second), 8*time.Second)
	d2, _ := h.estimateOf(slow2, j)
	require.Greater(t, d2.total(), 1.8*dFast.total())
	b = h.spreadNew([]*backend{fast, slow2}, j, now)
	require.NotNil(t, b)
	b.release()
	assert.Equal(t, "fast", b.cfg.Name)

	// Each completion through acquireConversation counts: a first turn,
	// then a follow-up.
	h.affinity = newAffinityTable(100, time.Hour)
	first := []byte(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`)
	next := []byte(`{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"and then?"}]}`)
	for _, body := range [][]byte{first, next} {
		b, _, _ := h.acquireConversation(slices.Clone(list), conversationOf("/api/chat", "m", body), j)
		require.NotNil(t, b)
		b.release()
	}
	assert.InDelta(t, followWeight, h.affinity.followShare(), 1e-9)
}

func TestNearBestKeepsServersAboutAsFast(t *testing.T) {
	fast, slow, fresh, busy := testBackend("fast", nil), testBackend("slow", nil), testBackend("fresh", nil), testBackend("busy", nil)
	now := time.Now()
	fast.srv.inFlight.Store(1)
	serve(fast, &job{}, now.Add(-time.Second), final(100*time.Millisecond, 0, 0, 10, 1))
	waitedBehind(fast, 1, now, 100*time.Millisecond) // the second of two waited: one slot
	slow.srv.inFlight.Store(1)
	serve(slow, &job{}, now, final(400*time.Millisecond, 0, 0, 10, 1))
	slow.srv.inFlight.Store(0)
	busy.srv.inFlight.Store(1)
	list := []*backend{fast, slow, fresh, busy}
	h := &Handler{}
	assert.Equal(t, []string{"fast", "fresh"}, names(h.nearBest(&scratch{}, list, &job{}, spreadFactor, spreadMargin)),
		"never a server four times slower; an unobserved idle one is a candidate")
	slowish := testBackend("slowish", nil)
	slowish.srv.inFlight.Store(1)
	serve(slowish, &job{}, now, final(130*time.Millisecond, 0, 0, 10, 1))
	slowish.srv.inFlight.Store(0)
	double := testBackend("double", nil)
	double.srv.inFlight.Store(1)
	serve(double, &job{}, now, final(200*time.Millisecond, 0, 0, 10, 1))
	double.srv.inFlight.Store(0)
	assert.Equal(t, []string{"fast", "slowish"}, names(h.nearBest(&scratch{}, []*backend{fast, slowish, double, slow}, &job{}, spreadFactor, spreadMargin)),
		"within 1.25x the best plus 25ms: one twice as slow is not")
	fast.srv.inFlight.Store(2) // 3 rounds of 0.1s: ends before the slow one's 0.4s
	assert.Equal(t, []string{"fast", "slow"}, names(h.nearBest(&scratch{}, []*backend{fast, slow}, &job{}, spreadFactor, spreadMargin)))
	fast.srv.inFlight.Store(3) // 4 rounds of 0.1s
	assert.Equal(t, []string{"slow"}, names(h.nearBest(&scratch{}, []*backend{fast, slow}, &job{}, spreadFactor, spreadMargin)),
		"no queue when a free slot ends as soon")
	assert.Equal(t, []string{"fresh"}, names(h.nearBest(&scratch{}, []*backend{fresh, busy}, &job{}, spreadFactor, spreadMargin)), "no speeds: the least busy")
}

func TestNewConversationsAreNotSpreadIntoAQueue(t *testing.T) {
	// Three equal servers of 2 slots. a's two requests are about to end,
	// so its expected wait is short and a looks almost as good as the
	// idle ones; but a new request there waits in a's queue while b and
	// c have a slot free. a holds the fewest conversations, so the
	// spread would have chosen it.
	now := time.Now()
	var list []*backend
	for _, name := range []string{"a", "b", "c"} {
		b := testBackend(name, nil)
		servedTogether(b, 2, now.Add(-time.Second))
		list = append(list, b)
	}
	a := list[0]
	for range 2 {
		a.srv.inFlight.Add(1)
		a.begin(&job{}, now.Add(-95*ms))
	}
	h := &Handler{}
	d, ok := h.estimateOf(a, &job{})
	require.True(t, ok)
	require.Positive(t, d.wait)
	require.LessOrEqual(t, d.total(), 0.1*spreadFactor+spreadMargin, "a is within the spread's margin")
	assert.Equal(t, []string{"b", "c"}, names(h.nearBest(&scratch{}, list, &job{}, spreadFactor, spreadMargin)))
}

// oneSlot is a server that has learned a 0.1 s answer (scaled by factor)
// and one slot: a second request sent while one ran waited for it.
func oneSlot(name string, factor float64, now time.Time) *backend {
	b := testBackend(name, nil)
	b.srv.models.Store(psWith("m"))
	service := time.Duration(factor * float64(100*ms))
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "m"}, now.Add(-3*time.Second), final(service, 0, 0, 10, 1))
	release := hold(b, 1, now.Add(-3*time.Second))
	serve(b, &job{model: "m"}, now.Add(-3*time.Second), final(service, 0, service, 10, 1))
	release()
	b.srv.inFlight.Store(0)
	return b
}

// A new conversation (every single-turn request is one) is spread only
// where it starts at once, or over servers tied with the best wait
// included: the spreading's band of a quarter, meant for the noise in
// equal servers' speeds, once admitted a server whose slot frees soon
// and sent requests there, behind its queue, because it held the fewest
// conversations, while another had a free slot.
func TestNewConversationsSpreadOnlyWhereTheyStartAtOnce(t *testing.T) {
	now := time.Now()
	// Answers of about a second, so that the test's own pace (the wait
	// only shrinks while it runs) cannot turn the wait into a tie.
	idle, nearly, slower := oneSlot("idle", 10, now), oneSlot("nearly", 10, now), oneSlot("slower", 12, now)
	// nearly's one slot holds a request sent 750 ms ago: its slot frees
	// in about a quarter of a second.
	release := hold(nearly, 1, time.Now().Add(-750*ms))
	defer release()
	h := &Handler{policy: pickLeastDelay}
	j := &job{model: "m"}
	dIdle, _ := h.estimateOf(idle, j)
	dNearly, _ := h.estimateOf(nearly, j)
	dSlower, _ := h.estimateOf(slower, j)
	require.Zero(t, dIdle.wait)
	require.Zero(t, dSlower.wait)
	require.Positive(t, dNearly.wait)
	require.Less(t, dNearly.total(), dIdle.total()*spreadFactor+spreadMargin, "within the old band")
	require.Greater(t, dNearly.total(), dIdle.total()*(1+affinityTie)+affinityTieMargin, "not a tie")
	list := []*backend{idle, nearly, slower}
	assert.Equal(t, []string{"idle", "slower"}, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)),
		"a server that would start it at once, a fifth slower, is a peer; one with a wait is not")

	// (Through acquireConversation the spread may still go to a server
	// with a free cache slot when every peer would evict a conversation
	// worth more than the wait: roomyWithin prices that trade.)

	// Every slot busy: only the servers tied with the best are peers, and
	// nearly, whose slot frees first, is the best.
	hIdle := hold(idle, 1, time.Now())
	defer hIdle()
	hSlower := hold(slower, 1, time.Now())
	defer hSlower()
	assert.Equal(t, []string{"nearly"}, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)))
}

// Spreading never offers a server where the request's model would have to
// be loaded, measured or not: the policy alone weighs a load against the
// best observed choice (least_delay would not measure a cold server while
// a warm one answers sooner than a load takes), and a cold server not
// measured yet holds no conversation, so the spreading sent it new ones
// (3 models over servers of room 1, 2 and 3: 13-17 cold loads per 1,000).
func TestNewConversationsAreNotSpreadOntoAColdServer(t *testing.T) {
	now := time.Now()
	warm := oneSlot("warm", 1, now)
	coldSeen := oneSlot("cold-seen", 1, now)
	coldSeen.srv.models.Store(psWith("other"))
	coldFresh, warmFresh := testBackend("cold-fresh", nil), testBackend("warm-fresh", nil)
	coldFresh.srv.models.Store(psWith("other"))
	warmFresh.srv.models.Store(psWith("m", "other"))
	h := &Handler{policy: pickLeastDelay}
	list := []*backend{coldFresh, warm, coldSeen, warmFresh}
	assert.Equal(t, []string{"warm", "warm-fresh"}, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "m"}, spreadFactor, spreadMargin)))
	empty := testBackend("empty", nil)
	empty.srv.models.Store(psWith())
	assert.Equal(t, []string{"warm", "empty"}, names(h.nearBest(&scratch{}, []*backend{coldFresh, warm, empty}, &job{model: "m"}, spreadFactor, spreadMargin)),
		"a server holding no model: a load there evicts nothing (a pool started cold)")
	assert.Equal(t, []string{"cold-fresh", "cold-seen", "warm-fresh"}, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "other"}, spreadFactor, spreadMargin)),
		"for a model the others hold: warm, which would load it, is the one left out")
	// A measuring request claimed for warm-fresh (least_delay's, not sent
	// yet): it is not offered alone for a second one.
	require.True(t, warmFresh.srv.speed.claimProbe(1, &warmFresh.srv.inFlight, time.Now()))
	assert.Equal(t, []string{"warm"}, names(h.nearBest(&scratch{}, []*backend{warm, warmFresh}, &job{model: "m"}, spreadFactor, spreadMargin)))

	h.affinity = newAffinityTable(affinityMaxEntries, affinityTTL)
	for i := range 3 { // warm holds conversations, the cold servers none
		c := conversationOf("/api/chat", "m", []byte(fmt.Sprintf(`{"messages":[{"role":"user","content":"old %d"}]}`, i)))
		h.affinity.record(c, warm.srv.key, 0, now)
		h.affinity.record(c, warmFresh.srv.key, 0, now)
	}
	for i := range 4 {
		body := []byte(fmt.Sprintf(`{"model":"m","messages":[{"role":"user","content":"new %d"}]}`, i))
		c := conversationOf("/api/chat", "m", body)
		b, _, _ := h.acquireConversation([]*backend{coldFresh, warm, coldSeen}, c, newJob("m", apiOllama, body))
		require.NotNil(t, b)
		assert.Equal(t, "warm", b.cfg.Name, "new conversation %d: a load where none was needed", i)
		b.release()
	}
}

// While the best choice means waiting for a slot, the spreading of new
// conversations re-measures an idle server least_delay has not timed for
// remeasureAfter, as the policy does: single-turn traffic is all new
// conversations, and a server that recovered while believed slow was
// otherwise never offered to the policy again (speedup: 0 of 300).
func TestSpreadingReMeasuresAServerBelievedSlow(t *testing.T) {
	now := time.Now()
	fast1, fast2 := oneSlot("fast1", 1, now), oneSlot("fast2", 1, now)
	slow := oneSlot("slow", 4, now.Add(-2*remeasureAfter)) // last timed long ago
	release1 := hold(fast1, 1, time.Now())
	defer release1()
	release2 := hold(fast2, 1, time.Now())
	defer release2()
	j := &job{model: "m"}
	dFast, _ := (&Handler{}).estimateOf(fast1, j)
	dSlow, _ := (&Handler{}).estimateOf(slow, j)
	require.Positive(t, dFast.wait, "the fast servers' one slot is taken")
	require.Greater(t, dSlow.total(), dFast.total()*spreadFactor+spreadMargin, "slow is no peer by its old estimate")
	list := []*backend{fast1, fast2, slow}

	h := &Handler{policy: pickLeastDelay}
	assert.NotContains(t, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)), "slow",
		"a policy that does not re-measure: the old estimate decides")
	h.remeasures = true
	assert.Equal(t, []string{"slow"}, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)),
		"least_delay: the idle server not timed for a while is re-measured")
	assert.NotContains(t, names(h.nearBest(&scratch{}, slices.Clone(list), j, spreadFactor, spreadMargin)), "slow",
		"one re-measuring request per remeasureAfter, not every request while it looks idle")

	release1()
	release1 = func() {}
	slow2 := oneSlot("slow2", 4, now.Add(-2*remeasureAfter))
	assert.NotContains(t, names(h.nearBest(&scratch{}, []*backend{fast1, fast2, slow2}, j, spreadFactor, spreadMargin)), "slow2",
		"with a fast slot free, nothing is re-measured")
}
