package ollamaflow

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Demand placement (placementMove): a model short of copies for its share
// takes one from a model that can spare it.

func TestAModelShortOfCopiesForItsShareTakesOneFromAModelThatCanSpareIt(t *testing.T) {
	now := time.Now()
	// Three servers of room 1: a on s1, b on s2 and s3; a is asked for
	// 70 % of the time.
	var pool []*backend
	for i, m := range []string{"a", "b", "b"} {
		b := testBackend(fmt.Sprintf("s%d", i+1), nil)
		b.srv.models.Store(psWith(m))
		b.srv.speed.room = 1
		learned(b, now)
		pool = append(pool, b)
	}
	pool[0].srv.inFlight.Store(2) // a's one copy is busy
	h := &Handler{backends: pool, demand: newModelDemand()}
	for i := range 7 {
		h.demand.note("a", now)
		if i < 3 {
			h.demand.note("b", now)
		}
	}
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now), "ten requests say too little (planMinRequests)")
	for i := range 84 {
		h.demand.note("a", now)
		if i < 36 {
			h.demand.note("b", now)
		}
	}
	pool[1].srv.inFlight.Store(1)
	got := h.placementMove(pool, &job{model: "a"}, now)
	assert.Same(t, pool[2], got, "a takes a copy from b, on the less busy of its servers")
	assert.Nil(t, h.placementMove(pool, &job{model: "b"}, now), "b has more than its share")

	// A copy of a with a slot free: a is not short.
	pool[0].srv.inFlight.Store(1)
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now))
	pool[0].srv.inFlight.Store(2)

	// a on two, b on one: settled; b keeps its last copy whatever a asks.
	pool[2].srv.models.Store(psWith("a"))
	pool[2].srv.inFlight.Store(2)
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now))
	for range 200 {
		h.demand.note("a", now)
	}
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now), "b's only copy stays")
}

func TestModelDemandIsBounded(t *testing.T) {
	d := newModelDemand()
	now := time.Now()
	for i := range 3 * maxDemandModels {
		d.note(fmt.Sprintf("m%d", i), now)
	}
	assert.Len(t, d.counts, maxDemandModels)
	_, total := d.shareOf("m0")
	assert.InDelta(t, float64(maxDemandModels), total, 1e-6)
}

// Shares forget by time on a busy pool and by requests on a slow one: the
// decayed count of requests settles near the larger of demandTau's worth
// and demandMemory, so a pool of answers taking seconds reaches
// planMinRequests too (forgetting by time alone, 2 requests a second
// settled at 20 and never placed a model by demand).
func TestModelDemandForgetsByTimeOnABusyPoolAndByRequestsOnASlowOne(t *testing.T) {
	settle := func(perSecond float64, n int) (*modelDemand, time.Time) {
		d := newModelDemand()
		now := time.Now()
		gap := time.Duration(float64(time.Second) / perSecond)
		for i := range n {
			now = now.Add(gap)
			m := "a"
			if i%4 == 3 {
				m = "b"
			}
			d.note(m, now)
		}
		return d, now
	}
	busy, _ := settle(50, 2000) // 40 s at 50 a second
	share, total := busy.shareOf("a")
	assert.InDelta(t, 500, total, 10, "50 a second over demandTau's 10 s")
	assert.InDelta(t, 0.75, share, 0.01)

	slow, now := settle(2, 1000) // 500 s at 2 a second
	share, total = slow.shareOf("a")
	assert.InDelta(t, demandMemory, total, 3, "the last demandMemory requests or so, not 20")
	assert.Greater(t, total, float64(planMinRequests))
	assert.InDelta(t, 0.75, share, 0.02)

	// How many requests a slow pool needs before moves: about 160.
	few, _ := settle(2, 140)
	_, total = few.shareOf("a")
	assert.Less(t, total, float64(planMinRequests), "140 requests say too little yet")

	// Nothing ages between requests; after a quiet hour the next request
	// ages the counts by one request, not by the hour.
	_, before := slow.shareOf("a")
	_, after := slow.shareOf("a")
	assert.Equal(t, before, after)
	slow.note("b", now.Add(time.Hour))
	share, total = slow.shareOf("b")
	assert.InDelta(t, before*(1-1.0/demandMemory)+1, total, 1e-9)
	assert.InDelta(t, 0.25, share, 0.02)

	// And a busy pool turned quiet keeps what it learned: its counts
	// age by time only while that forgets less than requests would.
	_, busyTotal := busy.shareOf("a")
	busy.note("a", time.Now().Add(time.Hour))
	_, total = busy.shareOf("a")
	assert.InDelta(t, busyTotal*(1-1.0/demandMemory)+1, total, 1e-9)
}

// A server whose /api/ps listed one model has shown no room: while another
// of the pool listed two at once and no eviction showed room for one,
// placement takes it to hold two, as the others do. Taken as one, a pool
// of six models over five servers of room two left servers holding a
// rarely asked model idle while the most asked one queued on its copies
// (many-models: 120 req/s, one server at 32 of 400 requests).
func TestAServerOfUnknownRoomIsTakenToHoldAsManyModelsAsThePoolShows(t *testing.T) {
	now := time.Now()
	pool := []*backend{testBackend("s1", nil), testBackend("s2", nil), testBackend("s3", nil)}
	for _, b := range pool {
		learned(b, now)
	}
	pool[0].srv.models.Store(psWith("a", "c")) // listed two at once
	pool[1].srv.models.Store(psWith("a"))
	pool[2].srv.models.Store(psWith("d"))
	pool[0].srv.inFlight.Store(2) // a's copies are busy
	pool[1].srv.inFlight.Store(2)
	h := &Handler{backends: pool, demand: newModelDemand()}
	for i := range 120 {
		h.demand.note("a", now)
		if i%3 == 0 {
			h.demand.note("d", now)
		}
	}
	assert.Equal(t, 2, roomHint(pool))
	assert.Same(t, pool[2], h.placementMove(pool, &job{model: "a"}, now), "s3 has room for a beside d, as s1 holds two")

	// An eviction showed one server room for one: the pool's hint is one,
	// and s3, which listed one, is taken as full (d's only copy stays).
	pool[1].srv.speed.room = 1
	assert.Equal(t, 1, roomHint(pool))
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now))
}

// A load priced on a server whose latest list showed one model takes that
// server's room as one, and the pool's hint with it (roomHint): broader
// than an eviction, and kept so, as counting evictions alone let demand
// moves evict models in use on servers of smaller room.
func TestALoadPricedBesideOneListedModelMakesThePoolsHintOne(t *testing.T) {
	now := time.Now()
	pool := []*backend{testBackend("s1", nil), testBackend("s2", nil)}
	pool[0].srv.models.Store(psWith("a", "c")) // listed two at once
	one := psWith("b")
	one.at = now
	pool[1].srv.models.Store(one)
	assert.Equal(t, 2, roomHint(pool), "nothing priced yet: the most any server listed")
	evictionCost(pool[1], "a", pool, nil, now.Add(time.Millisecond))
	assert.Equal(t, 1, roomHint(pool))
}

func TestACopyIsNotPlacedWhereItServesLittle(t *testing.T) {
	now := time.Now()
	// a on "busy" (two slots, both taken); "idle" is idle and five times
	// as slow; "other" holds b and has one request in flight. Every
	// server has room for two models.
	pool := map[string]*backend{}
	var list []*backend
	for _, name := range []string{"busy", "idle", "other"} {
		b := testBackend(name, nil)
		b.srv.speed.room = 2
		pool[name] = b
		list = append(list, b)
	}
	pool["busy"].srv.models.Store(psWith("a"))
	pool["idle"].srv.models.Store(psWith("b"))
	pool["other"].srv.models.Store(psWith("b"))
	learned(pool["busy"], now)
	learnedTaking(pool["idle"], now, 500*ms)
	learned(pool["other"], now)
	release := hold(pool["busy"], 2, now) // seen with two at once, both busy
	defer release()
	pool["other"].srv.inFlight.Store(1)
	h := &Handler{backends: list, demand: newModelDemand()}
	for range planMinRequests {
		h.demand.note("a", now)
	}
	c, ok := capacityFor(pool["busy"], &job{model: "a"}, now)
	require.True(t, ok)
	slow, _ := capacityFor(pool["idle"], &job{model: "a"}, now)
	require.Less(t, slow, placeMinCapacity*c, "the slow server serves less than a quarter of what a's copy does")

	got := h.placementMove(list, &job{model: "a"}, now)
	assert.Same(t, pool["other"], got, "not the idlest server, which serves little")

	// Without a server worth it, no move: the request goes where the
	// policy prices it.
	assert.Nil(t, h.placementMove([]*backend{pool["busy"], pool["idle"]}, &job{model: "a"}, now))
	_, measured := capacityFor(testBackend("fresh", nil), &job{model: "a"}, now)
	assert.False(t, measured, "a server never measured has no capacity to compare")
}

func TestAMoveGoesWhereTheRequestIsServedSoonest(t *testing.T) {
	now := time.Now()
	// a on "busy" (both slots taken); "slowload" and "quick" hold b, a
	// model with two copies and a small share. slowload is idle but has
	// learned a load of 3 s; quick has a request in flight and loads in
	// 0.2 s.
	mk := func(name string, load time.Duration) *backend {
		b := testBackend(name, nil)
		learned(b, now)
		if load > 0 {
			b.srv.models.Store(&modelSnapshot{known: true})
			b.srv.inFlight.Add(1)
			serve(b, &job{model: "x"}, now, final(100*ms, load, 0, 10, 1))
			b.srv.inFlight.Add(-1)
		}
		b.srv.speed.room = 1
		return b
	}
	busy, slowload, quick := mk("busy", 0), mk("slowload", 3*time.Second), mk("quick", 200*ms)
	busy.srv.models.Store(psWith("a"))
	slowload.srv.models.Store(psWith("b"))
	quick.srv.models.Store(psWith("b"))
	busy.srv.speed.room = 2
	release := hold(busy, 2, now)
	defer release()
	quick.srv.inFlight.Store(1)
	pool := []*backend{busy, slowload, quick}
	h := &Handler{backends: pool, demand: newModelDemand()}
	for i := range planMinRequests {
		h.demand.note("a", now)
		if i%10 == 0 {
			h.demand.note("b", now)
		}
	}
	d, ok := h.estimateOf(quick, &job{model: "a"})
	require.True(t, ok)
	e, _ := h.estimateOf(slowload, &job{model: "a"})
	require.Less(t, d.total(), e.total())
	assert.Same(t, quick, h.placementMove(pool, &job{model: "a"}, now), "not the idle server with the slow load")
}

// Evicting a model's only copy costs its load once for every server it
// would go to, and more the more it is asked: each request for it until
// it is loaded again waits for that load (half of it on average). So a
// request for a model the pool asks rarely does not evict the only copy
// of the one it asks most, while evicting a rarely asked one costs little
// more than its load.
func TestEvictingTheOnlyCopyOfAModelInDemandCostsMoreThanItsLoad(t *testing.T) {
	now := time.Now()
	b := testBackend("s1", nil)
	b.srv.models.Store(psWith("hot", "cold"))
	b.srv.speed.room = 2
	learned(b, now)
	b.srv.speed.mu.Lock()
	b.srv.speed.ratesLocked("cold").lastUsed = now.Add(-2 * time.Second)
	b.srv.speed.ratesLocked("hot").lastUsed = now.Add(-time.Second)
	b.srv.speed.mu.Unlock()
	pool := []*backend{b}
	load := b.srv.speed.coldCost("hot")

	d := newModelDemand()
	for i := range 900 { // 20 requests a second, three in four for hot
		at := now.Add(-45*time.Second + time.Duration(i)*50*time.Millisecond)
		if i%4 == 3 {
			d.note("cold", at)
		} else {
			d.note("hot", at)
		}
	}
	assert.InDelta(t, 15, d.rateOf("hot"), 2, "three in four of about 20 a second")
	assert.InDelta(t, load, evictionCost(b, "new", pool, nil, now), 1e-9, "no demand known: the load")

	// The least recently used goes: "cold", asked 5 times a second.
	assert.InDelta(t, load*(1+d.rateOf("cold")*load/2), evictionCost(b, "new", pool, d, now), 1e-9)

	// With hot the least recently used, its eviction costs three times as
	// much more.
	b.srv.speed.mu.Lock()
	b.srv.speed.ratesLocked("cold").lastUsed = now
	b.srv.speed.mu.Unlock()
	hot := evictionCost(b, "new", pool, d, now)
	assert.InDelta(t, load*(1+d.rateOf("hot")*load/2), hot, 1e-9)
	assert.Greater(t, hot, 5*load)

	// A second copy elsewhere: the requests go there, and the load is
	// shared as before.
	other := testBackend("s2", nil)
	other.srv.models.Store(psWith("hot"))
	assert.InDelta(t, load/2, evictionCost(b, "new", []*backend{b, other}, d, now), 1e-9)
}

// A move does not evict where requests for other models fill the
// server's slots: the load would wait for them, and it evicts the model
// they asked for, whatever the lists last showed (read while that model
// loaded, they showed the one before it), so those sent after them load
// it back. Shares lag a shift in demand by some seconds; moved by them
// alone, the model asked least after the shift evicted the one asked
// most from a server where eight of its requests queued (models-136).
func TestAMoveEvictsNothingWhereOtherModelsFillTheSlots(t *testing.T) {
	now := time.Now()
	// Three servers of room 1 and one slot: a on s1, busy; b on s2 and
	// s3, s2 three times as slow; a asked for 80 % of the time.
	var pool []*backend
	for i, m := range []string{"a", "b", "b"} {
		b := testBackend(fmt.Sprintf("s%d", i+1), func(c *Backend) { c.MaxParallel = 1 })
		b.srv.models.Store(psWith(m))
		b.srv.speed.room = 1
		if i == 1 {
			learnedTaking(b, now, 300*ms)
		} else {
			learned(b, now)
		}
		pool = append(pool, b)
	}
	h := &Handler{backends: pool, demand: newModelDemand()}
	for i := range 2 * planMinRequests {
		h.demand.note("a", now)
		if i%4 == 0 {
			h.demand.note("b", now)
		}
	}
	defer holdFor(pool[0], "a", 1, now)()
	releaseS3 := holdFor(pool[2], "b", 1, now)
	assert.Same(t, pool[1], h.placementMove(pool, &job{model: "a"}, now),
		"not s3, sooner but full with b's requests")
	defer holdFor(pool[1], "c", 1, now)() // loading c
	pool[1].srv.models.Store(psWith("b")) // a list read while c loads
	assert.Nil(t, h.placementMove(pool, &job{model: "a"}, now), "both full, s2 with c's requests")
	releaseS3()
	assert.Same(t, pool[2], h.placementMove(pool, &job{model: "a"}, now), "s3 is free again")
}
