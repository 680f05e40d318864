package ollamaflow

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// hostLive records n conversations on b, each with a turn at now.
func hostLive(tab *affinityTable, b *backend, n int, now time.Time) {
	for range n {
		hostOne(tab, b, now)
	}
}

var hostSeq uint64

// hostOne records a conversation of its own on b, its turn at at.
func hostOne(tab *affinityTable, b *backend, at time.Time) *convActivity {
	hostSeq++
	p := 16 * (1000 + hostSeq) // distinct ids (a record's id is its hash | 1)
	return tab.record(conversation{prefixes: []uint64{p}, keep: []uint64{p}}, b.srv.key, 0, at)
}

// A server holding more live conversations than its slots thrashes
// whether or not a miss was seen yet, and new conversations that find
// every slot of the pool taken go to those holding the most over their
// slots, not to any that thrashes: two servers taking the overflow in
// turn thrash both.
func TestNewConversationsGatherWhereTheOverflowIs(t *testing.T) {
	now := time.Now()
	two := func(name string) *backend {
		return testBackend(name, func(c *Backend) { c.MaxParallel = 2 })
	}
	a, b, c := two("a"), two("b"), two("c")
	list := []*backend{a, b, c}
	tab := newAffinityTable(100, time.Hour)
	hostLive(tab, a, 2, now)
	hostLive(tab, b, 2, now)
	hostLive(tab, c, 2, now)
	assert.Equal(t, []string{"a", "b", "c"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "full alike, none crowded")
	hostLive(tab, b, 1, now)
	hostLive(tab, c, 1, now)
	assert.Equal(t, []string{"a"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "single-turn traffic crowds no cache: the fewest recent requests decide")
	for range 200 {
		tab.noteTurn(true)
	}
	assert.Equal(t, []string{"b", "c"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "b and c crowded alike: the policy chooses")
	hostLive(tab, c, 1, now)
	assert.Equal(t, []string{"c"}, names(tab.keepLeastHosting(slices.Clone(list), now)), "c holds two over its slots")
	assert.Equal(t, []string{"b"}, names(tab.keepLeastHosting([]*backend{a, b}, now)), "of those offered")

	// A server whose slots are not known is not taken for crowded: three
	// conversations may have three slots there.
	u := testBackend("u", nil)
	servedTogether(u, 2, now.Add(-time.Second))
	_, bounded := u.cacheSlots()
	require.False(t, bounded)
	tab2 := newAffinityTable(100, time.Hour)
	hostLive(tab2, u, 3, now)
	tab2.mu.RLock()
	assert.False(t, tab2.crowded(u, now))
	assert.Zero(t, tab2.excess(u, now))
	tab2.mu.RUnlock()

	// Conversations that ended are not counted.
	later := now.Add(abandonedAfter + time.Second)
	tab.mu.RLock()
	assert.Zero(t, tab.live(c, later, thrashWalk))
	assert.False(t, tab.crowded(c, later))
	tab.mu.RUnlock()
}

// A new conversation that would evict a live conversation on a server
// where every conversation keeps its cache goes to the server that
// thrashes already, when its delay there is within what the best costs
// the pool (best × (1 + r) plus r × the eviction, r the share of
// follow-ups), and only for conversational traffic.
func TestANewConversationJoinsTheOverflowRatherThanStartAnother(t *testing.T) {
	now := time.Now()
	j := &job{model: "m", promptChars: 400, maxOutput: 10}
	setup := func(follow bool) (*Handler, *backend, *backend) {
		crowded, clean := ruleBackend("crowded", 2), ruleBackend("clean", 2)
		for _, b := range []*backend{crowded, clean} { // two slots, learned (max_parallel would queue in the proxy)
			b.srv.speed.slotsLo, b.srv.speed.slotsHi, b.srv.speed.hiAt = 2, 2, now
		}
		h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
		hostLive(h.affinity, crowded, 3, now)
		hostLive(h.affinity, clean, 2, now)
		for range 200 {
			h.affinity.noteTurn(follow)
		}
		return h, crowded, clean
	}
	h, crowded, clean := setup(true)
	dCrowded, _ := h.expectedDelayOf(crowded, j)
	r := h.affinity.followShare()
	require.InDelta(t, 1, r, 0.05)
	spread := []*backend{clean}
	assert.Same(t, crowded, h.gatherNew([]*backend{crowded, clean}, spread, j, 0, dCrowded/(1+r), now), "within best × (1 + r)")
	assert.Same(t, crowded, h.gatherNew([]*backend{crowded, clean}, spread, j, 0.1, (dCrowded-r*0.1)/(1+r), now), "the eviction counts")
	assert.Nil(t, h.gatherNew([]*backend{crowded, clean}, spread, j, 0, 0.9*dCrowded/(1+r), now), "dearer than that")
	assert.Nil(t, h.gatherNew([]*backend{crowded, clean}, []*backend{crowded}, j, 0, dCrowded, now), "spread holds the overflow already")

	// Single-turn traffic has no later turns to spare.
	h, crowded, clean = setup(false)
	assert.Nil(t, h.gatherNew([]*backend{crowded, clean}, []*backend{clean}, j, 0, dCrowded, now))

	// Through spreadNew: with no slot surely free anywhere it joins the
	// overflow.
	h, crowded, clean = setup(true)
	got := h.spreadNew([]*backend{crowded, clean}, j, now)
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "crowded", got.cfg.Name)
	// A slot free on clean now (a conversation there ended as its client
	// started this one): it takes that.
	clean.srv.inFlight.Store(1)
	got = h.spreadNew([]*backend{crowded, clean}, j, now)
	require.NotNil(t, got)
	got.release()
	assert.Equal(t, "clean", got.cfg.Name)
}

// A conversation counted out of a crowded server moves to one more crowded
// when that leaves its own server as many conversations as slots (it
// evicts there a cache that is missed anyway, and the others where it was
// keep theirs), never to one less crowded, and between two crowded alike
// only one way: the overflow settles instead of moving between them.
func TestACountedOutConversationGathersWithTheOverflow(t *testing.T) {
	now := time.Now()
	history := longHistory()
	_, prevA := chatTurn(t, history[:len(history)-1])
	bodyA, followA := chatTurn(t, append(slices.Clone(history), map[string]string{"role": "user", "content": "next question"}))
	for _, c := range []struct {
		home, other     string
		onHome, onOther int // live conversations besides A
		want            string
	}{
		{"b", "c", 2, 4, "c"}, // c holds two over its slots, b (with A) one: A moves
		{"b", "c", 3, 3, "b"}, // the other way: stays
		{"b", "a", 2, 3, "a"}, // alike: toward the lower key
		{"a", "b", 2, 3, "a"}, // and not back
		{"b", "c", 2, 2, "b"}, // c is full, not crowded: moving evicts a whole cache
		{"b", "c", 2, 1, "c"}, // c has room: A moves, as before
		{"b", "c", 3, 5, "b"}, // b stays crowded without A: the move spares no cache
	} {
		home, other := ruleBackend(c.home, 0), ruleBackend(c.other, 0)
		home.cfg.MaxParallel, other.cfg.MaxParallel = 2, 2
		h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
		h.affinity.record(prevA, home.srv.key, 0, now.Add(-time.Second))
		hostLive(h.affinity, home, c.onHome, now.Add(-500*ms)) // A is counted out
		hostLive(h.affinity, other, c.onOther, now.Add(-500*ms))
		_, id, _ := h.affinity.lookup(followA, now)
		require.True(t, h.affinity.evictedFrom(home, id, now))
		got, route, _ := h.acquireConversation([]*backend{home, other}, followA, newJob("m", apiOllama, bodyA))
		require.NotNil(t, got)
		got.release()
		name := fmt.Sprintf("%s with %d, %s with %d", c.home, c.onHome, c.other, c.onOther)
		assert.Equal(t, c.want, got.cfg.Name, name)
		if c.want == c.home {
			assert.Equal(t, routeAffinityHit, route, name)
		} else {
			assert.Equal(t, routeAffinityEvicted, route, name)
		}
	}
}

// A server with room comes before the overflow: it relieves the crowded
// server as well, without lengthening a queue.
func TestACountedOutConversationTakesRoomBeforeGathering(t *testing.T) {
	now := time.Now()
	history := longHistory()
	_, prevA := chatTurn(t, history[:len(history)-1])
	bodyA, followA := chatTurn(t, append(slices.Clone(history), map[string]string{"role": "user", "content": "next question"}))
	for _, onRoomy := range []int{1, 2} {
		home, crowded, roomy := ruleBackend("b", 0), ruleBackend("a", 0), ruleBackend("c", 0)
		for _, b := range []*backend{home, crowded, roomy} {
			b.cfg.MaxParallel = 2
		}
		h := &Handler{affinity: newAffinityTable(100, time.Hour), policy: pickLeastDelay, LBPolicy: "least_delay"}
		h.affinity.record(prevA, home.srv.key, 0, now.Add(-time.Second))
		hostLive(h.affinity, home, 2, now.Add(-500*ms))
		hostLive(h.affinity, crowded, 4, now.Add(-500*ms))
		hostLive(h.affinity, roomy, onRoomy, now.Add(-500*ms))
		got, route, _ := h.acquireConversation([]*backend{home, crowded, roomy}, followA, newJob("m", apiOllama, bodyA))
		require.NotNil(t, got)
		got.release()
		want := "c" // a slot free there
		if onRoomy == 2 {
			want = "a" // c full: A joins a's overflow
		}
		assert.Equal(t, want, got.cfg.Name, "%d conversations on c", onRoomy)
		assert.Equal(t, routeAffinityEvicted, route)
	}
}

// A follow-up cached on a slow server with a slot free stays there rather
// than move onto a faster server whose slots all hold conversations still
// going, however cheap the one eviction it is charged looks: the fast
// server would hold one more conversation than slots, all of them missing
// their caches turn after turn. Where it would wait at home, or where the
// conversation it evicts has ended, it moves.
func TestAFollowUpLeavesASlowServerOnlyForRoom(t *testing.T) {
	now := time.Now()
	prevTurn, body, conv := briefFollowUp(t, "More detail.")
	j := newJob("m", apiOllama, body)
	short := conversationOf("/api/chat", "m", []byte(`{"messages":[{"role":"user","content":"Hi"}]}`))

	setup := func(victimAt time.Time) (*Handler, *backend, *backend, string, int) {
		return slowHomeFastOther(t, prevTurn, conv, &short, victimAt, now) // fast's one cache slot
	}
	h, home, fast, key, depth := setup(now)
	dHome, _ := h.estimateOf(home, j)
	dFast, _ := h.estimateOf(fast, j)
	one := [1]*backend{fast}
	evict, full := h.affinity.evictionSeconds(one[:], j, now)
	require.True(t, full)
	require.Greater(t, dHome.total()-dHome.prompt, (dFast.total()+evict)*(1+affinityTie)+affinityTieMargin,
		"home is slower even with its whole prompt cached and the eviction charged")
	require.Zero(t, dHome.wait)
	assert.Same(t, home, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, 0)), "stays: fast's slot holds a live conversation")

	// Busy at home: the move relieves a wait.
	home.srv.inFlight.Store(1)
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, 0)), "a wait at home: the policy chooses")
	home.srv.inFlight.Store(0)

	// The conversation on fast has ended: nothing live is evicted.
	h, home, fast, key, depth = setup(now.Add(-abandonedAfter - time.Second))
	assert.Nil(t, keptBackend(h.keepsConversation([]*backend{fast, home}, key, conv, depth, j, 0)), "fast's slot holds an ended conversation")
}
