package ollamaflow

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// learned gives b a speed (one answered request) without changing what
// it holds.
func learned(b *backend, at time.Time) {
	learnedTaking(b, at, 100*ms)
}

// learnedTaking is learned with an answer that took prompt seconds.
func learnedTaking(b *backend, at time.Time, prompt time.Duration) {
	snap := b.srv.models.Load()
	b.srv.inFlight.Add(1)
	serve(b, &job{}, at, final(prompt, 0, 0, 10, 1))
	b.srv.inFlight.Add(-1)
	b.srv.models.Store(snap)
}

func TestASharedLoadIsOneEviction(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith("a", "c")) // /api/ps listed two
	b.srv.markLoaded("b")                // an answer loaded a third
	clock := time.Unix(1000, 0)
	learned(b, clock)

	// Two requests for "b" go out together, "b" believed resident; the
	// server had dropped it and loads it once for both.
	b.srv.inFlight.Store(2)
	first := b.begin(&job{model: "b"}, clock.Add(time.Second))
	second := b.begin(&job{model: "b"}, clock.Add(time.Second))
	loaded, evicted := first.learn(final(100*ms, 300*ms, 0, 10, 1), clock.Add(1400*ms))
	require.True(t, loaded)
	require.True(t, evicted)
	b.srv.noticeEviction("b", clock.Add(1400*ms))
	require.Equal(t, 2, b.srv.speed.room, "three believed there: room for two")

	loaded, evicted = second.learn(final(100*ms, 300*ms, 100*ms, 10, 1), clock.Add(1500*ms))
	assert.False(t, evicted, "it waited for the same load: counted again, the room would drop to one")
	assert.False(t, loaded)
	assert.Equal(t, 2, b.srv.speed.room)

	// A load that shows up in a request sent after the first was noticed
	// is a new one.
	b.srv.inFlight.Store(1)
	_, evicted = b.begin(&job{model: "b"}, clock.Add(2*time.Second)).learn(final(100*ms, 300*ms, 0, 10, 1), clock.Add(2400*ms))
	assert.True(t, evicted)
}

func TestAnEvictionOnlyLowersTheRoom(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith("b", "c"))
	b.srv.markLoaded("a")
	clock := time.Unix(1000, 0)
	b.srv.noticeEviction("a", clock)
	require.Equal(t, 2, b.srv.speed.room)

	// Answers made four models believed resident (one was gone long
	// since): an eviction now says the room is below four, which is
	// known, not that it is three.
	b.srv.markLoaded("d")
	b.srv.markLoaded("e")
	require.Len(t, b.srv.models.Load().loaded, 4)
	b.srv.noticeEviction("d", clock.Add(time.Second))
	assert.Equal(t, 2, b.srv.speed.room)

	// Two believed there and one of them evicted: the room is one.
	b.srv.models.Store(psWith("b"))
	b.srv.markLoaded("a")
	b.srv.noticeEviction("a", clock.Add(2*time.Second))
	assert.Equal(t, 1, b.srv.speed.room)
}

func TestLeastDelayJoinsALoadUnderWay(t *testing.T) {
	h := &Handler{}
	now := time.Now()
	// "loading" has not answered yet: its first request is loading "b".
	loading := testBackend("loading", nil)
	loading.srv.models.Store(psWith("a"))
	loading.srv.inFlight.Store(1)
	loading.begin(&job{model: "b"}, now)
	require.True(t, loading.srv.models.Load().isLoaded("b"), "believed resident from the moment its load began")

	// The others are measured, with "a" resident, in use, and room for one.
	var pool []*backend
	for _, name := range []string{"warm1", "warm2"} {
		b := testBackend(name, nil)
		b.srv.models.Store(psWith("a"))
		learned(b, now)
		b.srv.speed.mu.Lock()
		b.srv.speed.ratesLocked("a").lastUsed = now
		b.srv.speed.room = 1
		b.srv.speed.mu.Unlock()
		pool = append(pool, b)
	}
	pool = append(pool, loading)
	for range 5 {
		assert.Equal(t, "loading", pickLeastDelay(h, pool, &job{model: "b"}).cfg.Name,
			"a second load elsewhere would evict a model in use; the one under way is nearer")
	}
	assert.Contains(t, []string{"warm1", "warm2"}, pickLeastDelay(h, pool, &job{model: "a"}).cfg.Name)

	// Nothing measured yet: an idle server is measured, unless measuring
	// it means loading "b" a second time.
	idle := testBackend("idle", nil)
	idle.srv.models.Store(psWith("a"))
	fresh := []*backend{idle, loading}
	for range 5 {
		assert.Equal(t, "loading", pickLeastDelay(h, fresh, &job{model: "b"}).cfg.Name)
	}
	assert.Equal(t, "idle", pickLeastDelay(h, fresh, &job{model: "a"}).cfg.Name)
	idle.srv.models.Store(psWith("a", "b"))
	assert.Equal(t, "idle", pickLeastDelay(h, fresh, &job{model: "b"}).cfg.Name, "resident there: no load to share")
}

func TestARequestSentBeforeTheListsAreReadLoadsNothing(t *testing.T) {
	h := &Handler{}
	now := time.Now()
	// A fresh pool's first burst: each server's measuring request went
	// out before its /api/tags and /api/ps were read.
	var pool []*backend
	for _, name := range []string{"s1", "s2", "s3"} {
		b := testBackend(name, nil)
		b.srv.inFlight.Store(1)
		first := b.begin(&job{model: "m"}, now)
		assert.False(t, first.loader, "not knowing what is resident is no load")
		_, loading := b.srv.speed.pendingLoad("m", now)
		assert.False(t, loading, "%s: a request after it would join a load that is not there", name)
		pool = append(pool, b)
	}
	// The lists arrive: m resident everywhere. Each server holds one
	// request of unknown speed; none is a load to queue behind, so a
	// next request is not stacked onto one as its cheapest load.
	for _, b := range pool {
		b.srv.models.Store(psWith("m"))
	}
	stacked := 0
	for range 6 {
		if b := pickLeastDelay(h, pool, &job{model: "m"}); b != nil {
			if _, loading := b.srv.speed.pendingLoad("m", now); loading {
				stacked++
			}
		}
	}
	assert.Zero(t, stacked)

	// Its answer, with no load_duration, says nothing of the room for
	// models (a request taken to load one would have reset it).
	b := testBackend("late", nil)
	b.srv.inFlight.Store(1)
	first := b.begin(&job{model: "m"}, now)
	b.srv.speed.room = 2
	b.srv.models.Store(psWith("m"))
	first.learn(final(100*ms, 0, 0, 10, 1), now.Add(100*ms))
	assert.Equal(t, 2, b.srv.speed.room)

	// Nor does one that did load the model: it is a load to learn the
	// time of, and no eviction (many-models, nothing resident at the
	// start, lost a model's place on each server this way).
	b.srv.models.Store(&modelSnapshot{})
	b.srv.inFlight.Store(1)
	loads := b.begin(&job{model: "m2"}, now.Add(time.Second))
	b.srv.models.Store(psWith("m", "m2"))
	loaded, evicted := loads.learn(final(100*ms, 400*ms, 0, 10, 1), now.Add(1500*ms))
	assert.True(t, loaded)
	assert.False(t, evicted)
	assert.Equal(t, 2, b.srv.speed.room)
	assert.InDelta(t, 0.4, b.srv.speed.coldCost("m2"), 1e-9, "the load's time is learned")
}

func TestNewConversationsAreNotSpreadOntoALoad(t *testing.T) {
	h := &Handler{}
	// Nothing measured: "loading" is loading "m" for its first request,
	// "idle1" and "idle2" have "x".
	loading, idle1, idle2 := testBackend("loading", nil), testBackend("idle1", nil), testBackend("idle2", nil)
	loading.srv.models.Store(psWith("x"))
	loading.srv.inFlight.Store(1)
	loading.begin(&job{model: "m"}, time.Now())
	idle1.srv.models.Store(psWith("x"))
	idle2.srv.models.Store(psWith("x"))
	list := []*backend{idle1, loading, idle2}
	assert.Empty(t, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "m"}, spreadFactor, spreadMargin)),
		"the policy chooses (and joins the load): spread over the idle ones, it would load \"m\" again")
	assert.Equal(t, []string{"idle1", "idle2"}, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "x"}, spreadFactor, spreadMargin)))
	assert.Equal(t, []string{"idle1", "idle2"}, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "y"}, spreadFactor, spreadMargin)),
		"no load of it anywhere: the idle ones are peers")

	// Resident on one, not loading anywhere: servers not measured yet
	// stay peers (the policy measures them, and their load time).
	loading.srv.speed.mu.Lock()
	for _, tk := range loading.srv.speed.tasks {
		tk.loader = false
	}
	loading.srv.speed.mu.Unlock()
	loading.srv.inFlight.Store(0)
	assert.Equal(t, []string{"idle1", "loading", "idle2"}, names(h.nearBest(&scratch{}, slices.Clone(list), &job{model: "m"}, spreadFactor, spreadMargin)))
}

func TestIntegrationSurpriseLoadRereadsTheServersList(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"m-a", "m-b", "m-c"}, Tokens: 2,
		LoadDelay: 100 * ms, MaxLoaded: 2})
	t.Cleanup(f.Close)
	loadCaddy(t, "name surprise-test\nbackend a "+f.URL+" {\n}")
	waitKnown(t, []*fakeollama.Server{f})
	s := pooled(t, f.URL)
	for _, m := range []string{"m-a", "m-b", "m-c"} {
		res, _ := post(t, "/api/chat", chatFor(m))
		require.Equal(t, 200, res.StatusCode)
	}
	// The server evicted m-a for m-c; until it learns otherwise the
	// proxy believes all three resident. m-a loads again: a surprise.
	before := time.Now()
	res, _ := post(t, "/api/chat", chatFor("m-a"))
	require.Equal(t, 200, res.StatusCode)
	// A read started by an earlier load may end after this request with
	// the list as it was then; the one the surprise starts must follow
	// within far less than model_refresh (15 s).
	var actual []string
	for _, m := range f.Loaded() {
		actual = append(actual, normalizeModel(m))
	}
	slices.Sort(actual)
	believed := func() []string {
		var list []string
		for m := range s.models.Load().loaded {
			list = append(list, m)
		}
		slices.Sort(list)
		return list
	}
	require.Eventually(t, func() bool { return s.models.Load().at.After(before) && slices.Equal(actual, believed()) }, 10*time.Second, 5*time.Millisecond,
		"/api/ps was not read again after the surprise (model_refresh is 15 s): believed %v, resident %v", believed(), actual)
}

func TestARequestForAModelWaitsForTheFirstListsOfItsCandidates(t *testing.T) {
	now := time.Now()
	// "warm" holds m; "reading" has its first /api/tags and /api/ps under
	// way (began at began): sent now, a request for m could load it there
	// blind.
	pair := func(began time.Time) (*Handler, []*backend, *backend) {
		h := &Handler{}
		h.queue = newQueue(h)
		warm, reading := testBackend("warm", nil), testBackend("reading", nil)
		warm.srv.models.Store(psWith("m"))
		reading.srv.refreshing = &refreshCall{started: began, done: make(chan struct{})}
		return h, []*backend{warm, reading}, reading
	}
	h, pool, _ := pair(now)
	assert.Nil(t, pickLeastDelay(h, pool, &job{model: "m"}), "held until the lists are read")
	assert.NotNil(t, pickLeastDelay(h, pool, &job{}), "a request for no model has nothing to wait for")

	h, pool, _ = pair(now.Add(-listsHold))
	assert.NotNil(t, pickLeastDelay(h, pool, &job{model: "m"}), "a read that hangs holds nothing for longer than listsHold")

	// A server whose first read failed is no reason to wait either.
	h, pool, reading := pair(now)
	reading.srv.refreshing = nil
	reading.srv.lastRefresh = &refreshCall{started: now, ended: now, err: errors.New("refused")}
	assert.NotNil(t, pickLeastDelay(h, pool, &job{model: "m"}))
}

func TestRequestsGivenAServerTogetherJoinOneLoad(t *testing.T) {
	// Three fresh servers of room 1 with "a" resident; two requests for
	// "b" are given slots in the same instant, before the first begins.
	var pool []*backend
	for _, name := range []string{"s1", "s2", "s3"} {
		b := testBackend(name, nil)
		b.srv.models.Store(psWith("a"))
		pool = append(pool, b)
	}
	h := &Handler{backends: pool, policy: pickLeastDelay}
	h.queue = newQueue(h)
	first, _ := h.takeOrHold(pool, &job{model: "b"})
	require.NotNil(t, first)
	second, _ := h.takeOrHold(pool, &job{model: "b"})
	require.NotNil(t, second)
	assert.Same(t, first, second, "the second joins the load the first is about to start, instead of evicting a elsewhere")

	// The first to begin is the load, the other waits for it.
	now := time.Now()
	one, two := first.begin(&job{model: "b"}, now), second.begin(&job{model: "b"}, now)
	assert.True(t, one.loader)
	assert.False(t, two.loader)
	assert.True(t, two.cold)
}

func TestAJoinerWaitsForTheLoadOnceNotTwice(t *testing.T) {
	now := time.Now()
	b := testBackend("s", func(c *Backend) { c.MaxParallel = 2 })
	b.srv.models.Store(psWith("a"))
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "a"}, now, final(100*ms, 0, 0, 10, 1)) // 0.1 s a request
	b.srv.inFlight.Store(0)
	// Two requests wait for a load of "b" (coldLoadPrior: 2 s) in both slots.
	at := now.Add(time.Second)
	b.srv.inFlight.Store(1)
	require.True(t, b.begin(&job{model: "b"}, at).loader)
	b.srv.inFlight.Store(2)
	b.begin(&job{model: "b"}, at)
	d, ok := b.srv.speed.estimate(&job{model: "b"}, 2, 2, false, at)
	require.True(t, ok)
	// A third starts when a slot frees: after the load and one request.
	assert.InDelta(t, coldLoadPrior+0.1+0.1, d.total(), 0.02, "wait %.3f load %.3f", d.wait, d.load)
}

func TestAnAnswerSentBeforeALoadEvictedItsModelDoesNotBringItBack(t *testing.T) {
	h := &Handler{}
	now := time.Now()
	b := testBackend("s", nil)
	b.srv.models.Store(psWith("a"))
	b.srv.speed.room = 1
	b.srv.inFlight.Store(1)
	early := b.begin(&job{model: "a"}, now) // answered after "b"'s load was sent
	b.srv.inFlight.Store(2)
	load := b.begin(&job{model: "b"}, now.Add(ms))
	require.True(t, load.loader)
	require.False(t, b.srv.models.Load().isLoaded("a"), "the load evicts a")

	tail := &tailKeeper{}
	tail.keep([]byte(`{"done":true,"total_duration":100000000,"prompt_eval_count":10,"prompt_eval_duration":50000000,"eval_count":5,"eval_duration":50000000}`))
	h.learnFromAnswer(b, early.job, kindCompletion, apiOllama, early, tail, false, 100*ms, 100*ms)
	assert.False(t, b.srv.models.Load().isLoaded("a"), "its answer shows a as it was when it was sent")

	// A request for a sent after the load shows it resident again.
	late := b.begin(&job{model: "a"}, now.Add(2*ms))
	h.learnFromAnswer(b, late.job, kindCompletion, apiOllama, late, tail, false, 100*ms, 100*ms)
	assert.True(t, b.srv.models.Load().isLoaded("a"))
}

func TestALoadBesideAModelInUseIsPricedAsAnEvictionWhileTheRoomIsUnknown(t *testing.T) {
	now := time.Now()
	// Nothing is known of the room: "busy" serves a, "other" holds a too.
	busy, other := testBackend("busy", nil), testBackend("other", nil)
	busy.srv.models.Store(psWith("a"))
	other.srv.models.Store(psWith("a"))
	busy.srv.speed.room = 0
	busy.srv.inFlight.Store(1)
	serve(busy, &job{model: "a"}, now, final(100*ms, 0, 0, 10, 1))
	busy.srv.inFlight.Store(0)
	busy.srv.speed.room = 0 // as if its lists had not shown it yet
	pool := []*backend{busy, other}
	assert.InDelta(t, coldLoadPrior/2, evictionCost(busy, "b", pool, nil, now), 1e-9,
		"loading b may evict a, in use, which one other server holds")
	assert.Zero(t, evictionCost(busy, "a", pool, nil, now), "a is there: nothing to evict")

	// The pricing assumes; begin marks no eviction it does not know of.
	busy.srv.inFlight.Store(1)
	require.True(t, busy.begin(&job{model: "b"}, now).loader)
	assert.True(t, busy.srv.models.Load().isLoaded("a"), "room unknown: a may stay")
	assert.Zero(t, evictionCost(busy, "b", pool, nil, now), "a request joining the load evicts nothing more")
}

func TestARequestWaitsForALoadOfItsModelOnAServerItWasNotOffered(t *testing.T) {
	now := time.Now()
	// The queue offers "cold"; "loading" is being measured with a request
	// that loads m (a candidate, not offered).
	cold, loading, busy := testBackend("cold", nil), testBackend("loading", nil), testBackend("busy", nil)
	for _, b := range []*backend{cold, busy} {
		b.srv.models.Store(psWith("x"))
		b.srv.inFlight.Store(1)
		serve(b, &job{model: "x"}, now, final(100*ms, 0, 0, 10, 1))
		b.srv.inFlight.Store(0)
	}
	loading.srv.models.Store(psWith("x"))
	loading.srv.inFlight.Store(1)
	require.True(t, loading.begin(&job{model: "m"}, now).loader)
	h := &Handler{backends: []*backend{cold, loading, busy}}
	h.queue = newQueue(h)

	j := &job{model: "m", cands: []*backend{cold, loading}}
	assert.Nil(t, pickLeastDelay(h, []*backend{cold}, j), "the load under way ends before one here would")

	// A busy server merely holding m is not waited for where the load
	// here evicts nothing in use: a popular model would never get a
	// second copy (TestAWaiterOfferedAnEvictionWaitsForAServerHoldingItsModel
	// has the other side).
	busy.srv.models.Store(psWith("m"))
	busy.srv.inFlight.Store(2)
	cold.srv.speed.room = 2
	j = &job{model: "m", cands: []*backend{cold, busy}}
	assert.Same(t, cold, pickLeastDelay(h, []*backend{cold}, j))
}

func TestAFreshBurstStartsOneLoadPerModel(t *testing.T) {
	now := time.Now()
	// Nothing measured; "s1" is loading m for its first request and is
	// not offered (its one measuring slot is taken).
	var pool []*backend
	for _, name := range []string{"s1", "s2", "s3"} {
		b := testBackend(name, nil)
		b.srv.models.Store(psWith("x"))
		pool = append(pool, b)
	}
	pool[0].srv.inFlight.Store(1)
	pool[0].srv.speed.startProbe(now)
	require.True(t, pool[0].begin(&job{model: "m"}, now).loader)
	h := &Handler{backends: pool}
	h.queue = newQueue(h)
	j := &job{model: "m", cands: pool}
	assert.Nil(t, pickLeastDelay(h, pool[1:], j), "it waits for that load instead of starting a second one")
	// A request for x, resident everywhere, is measured at once.
	assert.NotNil(t, pickLeastDelay(h, pool[1:], &job{model: "x", cands: pool}))
}

func TestAFreshPoolLoadsNoModelThatAServerBeingMeasuredHolds(t *testing.T) {
	now := time.Now()
	// Nothing measured. "warm" holds m and is busy with its measuring
	// request; "empty" holds nothing and is offered alone.
	warm, empty := testBackend("warm", nil), testBackend("empty", nil)
	warm.srv.models.Store(psWith("m"))
	warm.srv.inFlight.Store(1)
	warm.srv.speed.startProbe(now)
	empty.srv.models.Store(psWith())
	pool := []*backend{warm, empty}
	h := &Handler{backends: pool}
	h.queue = newQueue(h)
	for range 3 {
		assert.Nil(t, pickLeastDelay(h, []*backend{empty}, &job{model: "m", cands: pool}),
			"it waits for warm's first answer instead of loading m on a server nobody has timed")
	}
	// A model resident nowhere is loaded to measure the server.
	assert.Same(t, empty, pickLeastDelay(h, []*backend{empty}, &job{model: "n", cands: pool}))
}

// evictionOffer sets up a waiter's offer that evicts a model in use: full
// holds x alone (room one), used a second ago, its only copy; other holds
// held, is measured and is busy, so it is not offered. It returns their
// handler, with a queue.
func evictionOffer(now time.Time, full, other *backend, held string) *Handler {
	full.srv.models.Store(psWith("x"))
	full.srv.inFlight.Store(1)
	serve(full, &job{model: "x"}, now.Add(-time.Second), final(100*ms, 0, 0, 10, 1))
	full.srv.speed.room = 1
	other.srv.models.Store(psWith(held))
	learned(other, now.Add(-time.Second))
	other.srv.inFlight.Store(1)
	h := &Handler{backends: []*backend{full, other}}
	h.queue = newQueue(h)
	return h
}

// A request the queue offers one server, where its model's load would
// evict a model in use, waits for a busy server holding its model that
// would serve it sooner than the eviction costs; a load that evicts
// nothing in use is taken (a busy model's second copy).
func TestAWaiterOfferedAnEvictionWaitsForAServerHoldingItsModel(t *testing.T) {
	now := time.Now()
	fast, holder := testBackend("fast", nil), testBackend("holder", nil)
	h := evictionOffer(now, fast, holder, "m")
	pool := h.backends
	assert.Nil(t, pickLeastDelay(h, []*backend{fast}, &job{model: "m", cands: pool}),
		"it waits for holder instead of evicting x")

	fast.srv.speed.room = 2 // room beside x: the load evicts nothing
	assert.Same(t, fast, pickLeastDelay(h, []*backend{fast}, &job{model: "m", cands: pool}))
}

func TestAServerThatSawNoLoadPricesOneAsTheLastLearnedElsewhere(t *testing.T) {
	var prior atomic.Uint64
	now := time.Now()
	seen, fresh := testBackend("seen", nil), testBackend("fresh", nil)
	seen.srv.speed.loadPrior, fresh.srv.speed.loadPrior = &prior, &prior
	assert.InDelta(t, coldLoadPrior, fresh.srv.speed.coldCost("m"), 1e-9, "no load seen anywhere")
	seen.srv.models.Store(&modelSnapshot{known: true})
	seen.srv.inFlight.Store(1)
	serve(seen, &job{model: "m"}, now, final(100*ms, 600*ms, 0, 10, 1))
	assert.InDelta(t, 0.6, seen.srv.speed.coldCost("m"), 1e-9)
	assert.InDelta(t, 0.6, fresh.srv.speed.coldCost("m"), 1e-9, "a load learned on another server")
	assert.InDelta(t, coldLoadPrior, testBackend("alone", nil).srv.speed.coldCost("m"), 1e-9, "a server of no pool keeps the prior")
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

func TestAnUnloadIsNotTakenAsASmallerRoom(t *testing.T) {
	a, other := testBackend("a", nil), testBackend("b", nil)
	a.srv.models.Store(psWith("m1", "m2")) // listed both at once
	other.srv.models.Store(psWith("m1", "m2"))
	clock := time.Unix(1000, 0)

	// Both were unloaded (a restart, keep_alive); a request for m1 loads
	// it again. The server held two at once: not a room of one.
	a.srv.noticeEviction("m1", clock)
	assert.Zero(t, a.srv.speed.room, "no load of ours overflowed it")
	assert.True(t, a.srv.models.Load().isLoaded("m1"))
	assert.False(t, a.srv.models.Load().isLoaded("m2"), "taken as gone until the list is read again")
	assert.Equal(t, 2, roomHint([]*backend{a, other}), "the pool's hint keeps what the lists showed")
}

func TestEvictionsAreNoticed(t *testing.T) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith("a")) // /api/ps listed one
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "b"}, clock, final(100*ms, 0, 0, 10, 1)) // believed beside it
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
	assert.Greater(t, evictionCost(pool[0], "c", pool, nil, clock), evictionCost(pool[1], "c", pool, nil, clock))
	for range 10 {
		got := pickLeastDelay(h, pool, &job{model: "c"}).cfg.Name
		assert.Contains(t, []string{"b1", "b2"}, got, "evicting the only copy of a model in use costs a reload of it")
	}
	// A model nobody asked for lately costs nothing to evict.
	assert.Zero(t, evictionCost(pool[0], "c", pool, nil, clock.Add(2*evictionHorizon)))
	// Where the model is resident, no load at all.
	assert.Equal(t, "only-a", pickLeastDelay(h, pool, &job{model: "a"}).cfg.Name)
}

// On a server whose room for models is not known at all (started empty,
// no list showed a model there), a load of another model may evict the
// one a request asks for: the request waits for the load. Where the room
// is known, the belief says what the load evicts, and nothing else waits.
func TestARequestWaitsForALoadThatMayEvictItsModel(t *testing.T) {
	b := testBackend("s", nil)
	b.srv.models.Store(psWith()) // /api/ps listed nothing
	clock := time.Unix(1000, 0)
	b.srv.inFlight.Store(1)
	serve(b, &job{model: "a:latest"}, clock, final(100*ms, 300*ms, 0, 10, 1)) // loaded a
	b.srv.inFlight.Store(0)
	sp := &b.srv.speed
	require.Zero(t, sp.room)
	b.srv.markLoaded("a:latest")
	idle, _ := sp.estimate(&job{model: "a:latest"}, 0, 0, false, clock.Add(time.Second))
	require.Zero(t, idle.wait)

	b.srv.inFlight.Store(1)
	load := b.begin(&job{model: "b:latest"}, clock.Add(time.Second))
	require.True(t, load.loader)
	require.True(t, b.srv.models.Load().isLoaded("a:latest"), "room unknown: not believed evicted")
	at := clock.Add(time.Second + 100*ms)
	left, ok := sp.pendingLoad("b:latest", at)
	require.True(t, ok)
	require.Greater(t, left, 0.1)
	during, _ := sp.estimate(&job{model: "a:latest"}, 0, 1, false, at)
	assert.InDelta(t, left, during.wait, 0.001, "a request for a waits for b's load, which may evict a")
	load.end()

	sp.mu.Lock()
	sp.room = 2 // a list showed two models there
	sp.mu.Unlock()
	load = b.begin(&job{model: "b:latest"}, clock.Add(2*time.Second))
	defer load.end()
	during, _ = sp.estimate(&job{model: "a:latest"}, 0, 1, false, clock.Add(2*time.Second+100*ms))
	assert.Less(t, during.wait, 0.1, "room known: a's slot wait only")
}

// listedAndMeasured is a server whose /api/ps listed models, with a speed
// learned at the returned clock.
func listedAndMeasured(models ...string) (*backend, time.Time) {
	b := testBackend("a", nil)
	b.srv.models.Store(psWith(models...))
	clock := time.Unix(1000, 0)
	learned(b, clock)
	return b, clock
}

func TestARequestSentJustBeforeALoadOfItsModelIsNoEviction(t *testing.T) {
	b, clock := listedAndMeasured("x", "y")
	b.srv.inFlight.Store(2)
	early := b.begin(&job{model: "x"}, clock.Add(time.Second)) // x believed there
	// x is taken as gone (another load's victim, guessed), and the next
	// request for it is sent to load it.
	b.srv.markUnloaded("x")
	loader := b.begin(&job{model: "x"}, clock.Add(1100*ms))
	require.True(t, loader.loader)

	// The early request waited for that load: one load, counted when it
	// was sent, not an eviction that says the room is smaller.
	_, evicted := early.learn(final(100*ms, 300*ms, 0, 10, 1), clock.Add(1500*ms))
	assert.False(t, evicted)
	assert.Zero(t, b.srv.speed.room)
}

func TestALoadInFlightCountsInTheRoomAnEvictionShows(t *testing.T) {
	b, clock := listedAndMeasured("a", "c")
	b.srv.inFlight.Store(1)
	b.begin(&job{model: "d"}, clock.Add(time.Second)) // loads d, unanswered
	// A list read while d was loading does not show it yet.
	b.srv.models.Store(psWith("a", "c"))

	// c shows a load: d's load evicted it. The server was asked to hold
	// three: room for two, not one (nor an unload of a and c).
	b.srv.noticeEviction("c", clock.Add(2*time.Second))
	assert.Equal(t, 2, b.srv.speed.room)
}

func TestAWaiterOfferedAnEvictionWaitsForALoadElsewhereThatCostsLess(t *testing.T) {
	now := time.Now()
	full, roomy := testBackend("full", nil), testBackend("roomy", nil)
	h := evictionOffer(now, full, roomy, "y")
	roomy.srv.speed.room = 3 // room for m beside y
	pool := h.backends
	// A load on roomy, after its request in flight, costs more than
	// evicting x alone would, and well less than the load and eviction
	// here.
	assert.Nil(t, pickLeastDelay(h, []*backend{full}, &job{model: "m", cands: pool}),
		"it waits to load m on roomy instead of evicting x")

	roomy.srv.inFlight.Store(40) // a long wait there: the load here is sooner
	assert.Same(t, full, pickLeastDelay(h, []*backend{full}, &job{model: "m", cands: pool}))
}

// A load on a full server is taken to evict what Ollama evicts: the idle
// model whose file sorts first, not the least recently used; the first
// of all when each is in use; the least recently used while a file is
// unknown.
func TestALoadIsTakenToEvictWhatOllamaEvicts(t *testing.T) {
	now := time.Now()
	b := testBackend("s", nil)
	snap := listedAt(b, now.Add(-time.Second), "a", "b", "c")
	sp := &b.srv.speed
	for m, f := range map[string]string{"a": "/m/blobs/sha256-3", "b": "/m/blobs/sha256-1", "c": "/m/blobs/sha256-2"} {
		sp.setFile(m, "", f, snap.loaded)
	}
	sp.mu.Lock()
	sp.ratesLocked("a").lastUsed = now.Add(-time.Minute)
	sp.ratesLocked("b").lastUsed = now
	sp.ratesLocked("c").lastUsed = now
	assert.Equal(t, "b", sp.victimLocked(snap, "d"), "b's file sorts first; a was used longest ago")
	sp.mu.Unlock()

	var tasks []*task
	for _, m := range []string{"b", "c", "a"} {
		b.srv.inFlight.Add(1)
		tasks = append(tasks, b.begin(&job{model: m}, now))
		sp.mu.Lock()
		want := map[string]string{"b": "c", "c": "a", "a": "b"}[m]
		assert.Equal(t, want, sp.victimLocked(snap, "d"), "%s in use too", m)
		sp.mu.Unlock()
	}
	for _, tk := range tasks {
		tk.endAt(now)
		b.srv.inFlight.Add(-1)
	}

	sp.mu.Lock()
	delete(sp.files, "c")
	assert.Equal(t, "a", sp.victimLocked(snap, "d"), "c's file unknown: the least recently used")
	sp.mu.Unlock()
}

// The files come from the server: its lists are read with /api/show of
// each model loaded, and the guess then names the model the server
// evicts.
func TestTheVictimGuessedIsTheModelTheServerEvicts(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"a", "b", "c"}, Loaded: []string{"a", "b"}, MaxLoaded: 2})
	defer f.Close()
	base, _ := url.Parse(f.URL)
	st := testSettings(zap.NewNop())
	st.interval = time.Hour
	s := newServer(base, st)
	defer s.Destruct()
	require.NoError(t, s.refreshModels(context.Background(), 0))
	sp := &s.speed
	sp.mu.Lock()
	require.Len(t, sp.files, 2)
	first, last := "a:latest", "b:latest"
	if sp.files[last].path < sp.files[first].path {
		first, last = last, first
	}
	sp.ratesLocked(last).lastUsed = time.Now().Add(-time.Minute) // the least recently used
	sp.ratesLocked(first).lastUsed = time.Now()
	guess := sp.victimLocked(s.models.Load(), "c:latest")
	sp.mu.Unlock()
	require.Equal(t, first, guess, "the file that sorts first")

	res, err := http.Post(f.URL+"/api/generate", "application/json", strings.NewReader(`{"model":"c","prompt":"x","stream":false}`))
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.NotContains(t, f.Loaded(), guess, "the guess was evicted")
	assert.Len(t, f.Loaded(), 2)
}
