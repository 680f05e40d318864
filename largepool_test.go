package ollamaflow

import (
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// largeTestPool is a frontend of n healthy servers with policy, sampling
// with a seeded source so a run is reproducible.
func largeTestPool(n int, policy string, mutate func(i int, b *backend)) *Handler {
	h := &Handler{policy: policies[policy], LBPolicy: policy, sampleRand: rand.New(rand.NewPCG(1, 2))}
	for i := range n {
		b := testBackend(fmt.Sprintf("gpu%d", i), nil)
		b.pos.Store(int64(i))
		b.srv.state.Store(int32(stateHealthy))
		if mutate != nil {
			mutate(i, b)
		}
		h.backends = append(h.backends, b)
	}
	return h
}

func inFlightRange(h *Handler) (lo, hi int64) {
	lo = 1 << 62
	for _, b := range h.backends {
		lo, hi = min(lo, b.srv.inFlight.Load()), max(hi, b.srv.inFlight.Load())
	}
	return lo, hi
}

// The bound on sampling's quality: with 1,000 equal servers and requests
// that all stay in flight, least_conn comparing a sample keeps every
// server within two requests of the average.
func TestSampledLeastConnSpreadsTheLoad(t *testing.T) {
	h := largeTestPool(1000, "least_conn", nil)
	cands, why := h.candidates(kindCompletion, nil)
	require.Nil(t, why)
	require.Len(t, cands, 1000)
	for i := range 3000 {
		require.NotNil(t, h.acquire(cands, &job{}), "request %d", i)
	}
	lo, hi := inFlightRange(h)
	assert.LessOrEqual(t, hi, int64(5), "the busiest server: 3 on average")
	assert.GreaterOrEqual(t, lo, int64(1), "every server got requests")
}

// Sampled least_delay still finds a few fast servers among many slow ones:
// once a sample has met one, it stays among the servers compared (the last
// winners), so nearly every request goes to a fast server.
func TestSampledLeastDelayFindsTheFewFastServers(t *testing.T) {
	fast := map[*backend]bool{}
	h := largeTestPool(1000, "least_delay", func(i int, b *backend) {
		speed := time.Second // slow: a second per prompt
		if i%200 == 7 {      // 5 fast servers
			speed, fast[b] = 10*time.Millisecond, true
		}
		for range 3 {
			b.srv.inFlight.Store(1)
			serve(b, &job{}, time.Now(), final(speed, 0, 0, 10, 1))
		}
		b.srv.inFlight.Store(0)
	})
	require.Len(t, fast, 5)
	cands, _ := h.candidates(kindCompletion, nil)
	onFast := 0
	for range 1000 {
		b := h.acquire(cands, &job{})
		require.NotNil(t, b)
		if fast[b] {
			onFast++
		}
		b.release() // the pool stays idle: the fastest server is the best choice each time
	}
	assert.Greater(t, onFast, 900, "requests served by one of the 5 fast servers, of 1,000")
}

// The servers with the request's model loaded are always in the sample
// (from the model index): least_conn prefers them as it does in a small
// pool, however few they are among 1,000.
func TestSampledPicksFindTheServersWithTheModelLoaded(t *testing.T) {
	warm := map[*backend]bool{}
	h := largeTestPool(1000, "least_conn", func(i int, b *backend) {
		snap := &modelSnapshot{known: true, present: map[string][]byte{"tiny-llama:latest": nil}, loaded: map[string][]byte{}}
		if i%400 == 3 { // 3 servers have it loaded
			snap.loaded["tiny-llama:latest"] = nil
			warm[b] = true
		}
		b.srv.models.Store(snap)
	})
	cands, _ := h.candidates(kindCompletion, nil)
	for i := range 300 {
		b := h.acquire(h.withModel(cands, "tiny-llama:latest"), &job{model: "tiny-llama:latest"})
		require.NotNil(t, b)
		require.True(t, warm[b], "request %d went to %s, where the model is not loaded", i, b.cfg.Name)
		b.release()
	}
}

// The candidate list a large pool keeps is dropped when a server is
// drained or undrained, and the sampled picks never take a server that
// has no room.
func TestLargePoolCandidatesFollowDrainAndRoom(t *testing.T) {
	h := largeTestPool(100, "least_conn", func(i int, b *backend) { b.cfg.MaxParallel = 1 })
	cands, _ := h.candidates(kindCompletion, nil)
	require.Len(t, cands, 100)
	again, _ := h.candidates(kindCompletion, nil)
	require.True(t, sameList(cands, again), "kept between requests")

	h.backends[42].srv.settings.Store(testSettings(zap.NewNop())) // its drain is logged
	h.backends[42].srv.setDraining(true)
	cands, _ = h.candidates(kindCompletion, nil)
	require.Len(t, cands, 99)
	assert.NotContains(t, cands, h.backends[42])
	h.backends[42].srv.setDraining(false)
	cands, _ = h.candidates(kindCompletion, nil)
	require.Len(t, cands, 100)

	// Every server takes one request (max_parallel 1); the 101st finds none.
	for _, policy := range []string{"least_conn", "first", "round_robin", "random", "least_delay"} {
		h.policy, h.LBPolicy = policies[policy], policy
		var got []*backend
		for range 100 {
			b := h.acquire(cands, &job{})
			require.NotNil(t, b, policy)
			got = append(got, b)
		}
		assert.Nil(t, h.acquire(cands, &job{}), "%s: every server is at max_parallel", policy)
		lo, hi := inFlightRange(h)
		assert.Equal(t, [2]int64{1, 1}, [2]int64{lo, hi}, "%s: one request each", policy)
		for _, b := range got {
			b.release()
		}
	}
}

// round_robin over a large pool walks the servers in turn, each weight
// times per cycle, as it does over a small one.
func TestLargePoolRoundRobinKeepsWeights(t *testing.T) {
	h := largeTestPool(100, "round_robin", func(i int, b *backend) { b.cfg.Weight = 1 + i%2 })
	cands, _ := h.candidates(kindCompletion, nil)
	count := map[*backend]int{}
	for range 150 * 4 { // four cycles of total weight 150
		b := h.acquire(cands, &job{})
		require.NotNil(t, b)
		count[b]++
		b.release()
	}
	for i, b := range h.backends {
		assert.Equal(t, 4*(1+i%2), count[b], "server %d (weight %d)", i, 1+i%2)
	}
}

// Rendezvous with equal weights skips the logarithm and still picks the
// server the weighted score picks.
func TestRendezvousEqualWeightsPicksTheSameServer(t *testing.T) {
	h := largeTestPool(300, "least_conn", nil)
	for i := range 2000 {
		key := fmt.Sprintf("session-%d", i)
		require.Same(t, rendezvousWeighted(h.backends, fnv64(key)), rendezvous(h.backends, key), key)
	}
}

// Weighted rendezvous skips most logarithms and still picks the server
// with the highest score, computed here for every server.
func TestRendezvousWeightedPicksTheHighestScore(t *testing.T) {
	h := largeTestPool(300, "least_conn", func(i int, b *backend) { b.cfg.Weight = 1 + i%5 })
	for i := range 2000 {
		key := fmt.Sprintf("session-%d", i)
		hk := fnv64(key)
		var want *backend
		best := math.Inf(-1)
		for _, b := range h.backends {
			u := (float64(mix64(hk^b.idHash)) + 0.5) / (1 << 64)
			if score := -float64(b.weight()) / math.Log(u); score > best {
				want, best = b, score
			}
		}
		require.Same(t, want, rendezvous(h.backends, key), key)
	}
}

// A sampled pick keeps its sample, the servers it ties between and those
// with the model loaded on the stack: at 1,000 servers a heap sample cost a
// third of least_delay's pick, and the garbage grew with every request.
func TestSampledPickAllocatesNothing(t *testing.T) {
	for _, policy := range []string{"least_conn", "least_delay"} {
		h := largeTestPool(1000, policy, func(i int, b *backend) {
			snap := &modelSnapshot{known: true, present: map[string][]byte{"tiny-llama:latest": nil}, loaded: map[string][]byte{}}
			if i%4 == 0 {
				snap.loaded["tiny-llama:latest"] = nil
			}
			b.srv.models.Store(snap)
			b.srv.inFlight.Store(1)
			serve(b, &job{}, time.Now(), final(time.Duration(100+i%7)*time.Millisecond, 0, 0, 10, 1))
			b.srv.inFlight.Store(0)
		})
		cands, _ := h.candidates(kindCompletion, nil)
		cands = h.withModel(cands, "tiny-llama:latest")
		j := &job{model: "tiny-llama:latest"}
		h.acquire(cands, j).release() // the kept lists are built once
		allocs := testing.AllocsPerRun(200, func() {
			b := h.acquire(cands, j)
			require.NotNil(t, b)
			b.release()
		})
		assert.Zero(t, allocs, "%s: allocations per pick at 1,000 servers", policy)
	}
}

// walksDuring returns how many walks over more than largePool servers f
// made on the request path (largeWalks).
func walksDuring(f func()) uint64 {
	before := largeWalks.Load()
	f()
	return largeWalks.Load() - before
}

// attemptOnce is proxy's attempt selection (its candidates, then the
// policy's pick) after the servers tried, and the walks it made. The
// backend it returns holds a slot.
func attemptOnce(t *testing.T, h *Handler, cands, tried []*backend) (*backend, uint64) {
	var b *backend
	walks := walksDuring(func() {
		j := &job{}
		avail, remaining := h.attemptCandidates(cands, tried, j)
		require.Equal(t, len(cands)-len(tried), remaining, "servers left to try")
		b = h.acquire(avail, j)
	})
	require.NotNil(t, b)
	return b, walks
}

// A retry at 1,000 servers passes over the servers already tried one by
// one instead of copying the candidates less them, for every policy: no
// walk, and never a server tried before.
func TestLargePoolRetryDoesNotWalk(t *testing.T) {
	for _, policy := range []string{"least_conn", "least_delay", "round_robin", "random", "first"} {
		h := largeTestPool(1000, policy, func(i int, b *backend) {
			b.srv.inFlight.Store(1)
			serve(b, &job{}, time.Now(), final(time.Duration(100+i%7)*time.Millisecond, 0, 0, 10, 1))
			b.srv.inFlight.Store(0)
		})
		cands, _ := h.candidates(kindCompletion, nil)
		j := &job{}
		h.acquire(cands, j).release() // the kept lists are built once
		for i := range 200 {
			// The servers earlier attempts took: the first few in config
			// order (first's choice) and the last winners (the sample's).
			tried := slices.Clone(h.backends[:3])
			for k := range 2 {
				if b := h.leaders[k].Load(); b != nil && !slices.Contains(tried, b) {
					tried = append(tried, b)
				}
			}
			b, walks := attemptOnce(t, h, cands, tried)
			require.NotContains(t, tried, b, "%s, retry %d: a server tried before", policy, i)
			require.Zero(t, walks, "%s, retry %d: walks over the pool", policy, i)
			b.release()
		}
	}
}

// While servers back off after a 503, a request at 1,000 servers skips
// them one by one: no walk, and none of them takes it while others have
// room. When every server backs off, the request still gets one (a busy
// server is better than none), through the full walk.
func TestLargePoolBackOffDoesNotWalk(t *testing.T) {
	for _, policy := range []string{"least_conn", "least_delay", "round_robin", "random", "first"} {
		h := largeTestPool(1000, policy, nil)
		until := time.Now().Add(time.Hour).UnixNano()
		for i, b := range h.backends {
			if i%2 == 0 { // every other server, the first one included
				b.srv.busyUntil.Store(until)
			}
		}
		noteBackOff(until)
		t.Cleanup(func() { backOffUntil.Store(0) })
		cands, _ := h.candidates(kindCompletion, nil)
		for i := range 200 {
			b, walks := attemptOnce(t, h, cands, nil)
			require.False(t, b.srv.backingOff(time.Now()), "%s, request %d: a server backing off", policy, i)
			require.Zero(t, walks, "%s, request %d: walks over the pool", policy, i)
			b.release()
		}
		for _, b := range h.backends {
			b.srv.busyUntil.Store(until)
		}
		b, _ := attemptOnce(t, h, cands, nil) // every server backs off
		b.release()
	}
}

// With SRV priorities at 1,000 servers, the lowest tier that can serve is
// kept per list until a server's health or drain changes: requests go to
// it without walking the pool, and when it cannot serve any more the next
// tier takes over.
func TestLargePoolTiersDoNotWalk(t *testing.T) {
	for _, policy := range []string{"least_conn", "least_delay", "round_robin", "random", "first"} {
		h := largeTestPool(1000, policy, func(i int, b *backend) {
			b.tier.Store(int64(min(i%10, 1))) // a tenth of the servers in tier 0
		})
		h.members.Store(&memberSet{backends: h.backends, tiered: true})
		cands, _ := h.candidates(kindCompletion, nil)
		h.acquire(cands, &job{}).release() // the kept lists are built once
		for i := range 200 {
			b, walks := attemptOnce(t, h, cands, nil)
			require.Zero(t, b.tier.Load(), "%s, request %d: a server of the higher priority", policy, i)
			require.Zero(t, walks, "%s, request %d: walks over the pool", policy, i)
			b.release()
		}
		settings := testSettings(zap.NewNop())
		for i, b := range h.backends {
			if i%10 == 0 {
				b.srv.settings.Store(settings) // its drain is logged
				b.srv.setDraining(true)
			}
		}
		cands, _ = h.candidates(kindCompletion, nil)
		b, _ := attemptOnce(t, h, cands, nil)
		assert.Equal(t, int64(1), b.tier.Load(), "%s: tier 0 drained, tier 1 serves", policy)
		b.release()
		for i, b := range h.backends {
			if i%10 == 0 {
				b.srv.setDraining(false)
			}
		}
	}
}

// Conversation affinity at 1,000 servers compares a sample, not every
// server: a new conversation goes to a server near the best without a
// walk, and its next turn finds that server (looked up by its key) and
// stays there, also without one.
func TestLargePoolAffinityDoesNotWalk(t *testing.T) {
	h := largeTestPool(1000, "least_delay", func(i int, b *backend) {
		b.srv.inFlight.Store(1)
		serve(b, &job{}, time.Now(), final(time.Duration(100+i%7)*time.Millisecond, 0, 0, 10, 1))
		b.srv.inFlight.Store(0)
	})
	h.affinity = newAffinityTable(1000, time.Hour)
	cands, _ := h.candidates(kindCompletion, nil)
	h.acquire(cands, &job{}).release() // the kept lists are built once
	for i := range 100 {
		msgs := []map[string]string{{"role": "user", "content": fmt.Sprint("question ", i)}}
		body := []byte(mustJSON(t, map[string]any{"model": "m", "messages": msgs}))
		conv := conversationOf("/api/chat", "m", body)
		j := newJob("m", apiOllama, body)
		var first *backend
		var route string
		walks := walksDuring(func() {
			avail, _ := h.attemptCandidates(cands, nil, j)
			first, route, _ = h.acquireConversation(avail, conv, j)
		})
		require.NotNil(t, first)
		require.Equal(t, routePolicy, route)
		require.Zero(t, walks, "new conversation %d: walks over the pool", i)
		h.affinity.record(conv, first.srv.key, 0, time.Now())
		first.release()

		msgs = append(msgs, map[string]string{"role": "assistant", "content": "answer"}, map[string]string{"role": "user", "content": "and then?"})
		body = []byte(mustJSON(t, map[string]any{"model": "m", "messages": msgs}))
		conv = conversationOf("/api/chat", "m", body)
		j = newJob("m", apiOllama, body)
		var next *backend
		walks = walksDuring(func() {
			avail, _ := h.attemptCandidates(cands, nil, j)
			next, route, _ = h.acquireConversation(avail, conv, j)
		})
		require.Zero(t, walks, "conversation %d's next turn: walks over the pool", i)
		require.Same(t, first, next, "conversation %d's next turn", i)
		require.Equal(t, routeAffinityHit, route)
		next.release()
	}
}

// Through the proxy at 80 servers: a chat that a broken server fails (a
// tenth of the pool answers 502) is retried on servers it has not tried,
// every client gets its answer, and no request walks the pool.
func TestLargePoolRetriesThroughTheProxy(t *testing.T) {
	const n, broken = 80, 8
	var backends []string
	var fakes []*fakeollama.Server
	for i := range n {
		f := fakeollama.New(tinyLlama)
		t.Cleanup(f.Close)
		if i%(n/broken) == 0 {
			f.FailWith(http.StatusBadGateway, `{"error":"broken"}`, "/api/chat")
		}
		fakes = append(fakes, f)
		backends = append(backends, fmt.Sprintf(`{"name":"s%d","url":"http://%s","fail_threshold":1000,"health_interval":"1h"}`, i, f.HostPort()))
	}
	_, url := discoveryHandler(t, fmt.Sprintf(`{"name":"large-retries","lb_policy":"least_conn","retries":%d,"backends":[%s]}`,
		broken, strings.Join(backends, ",")))

	const requests = 200
	walks := walksDuring(func() {
		for i := range requests { // each a new conversation: affinity keeps none on one server
			body := fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"question %d"}]}`, i)
			res, err := http.Post(url+"/api/chat", "application/json", strings.NewReader(body))
			require.NoError(t, err)
			answer, err := io.ReadAll(res.Body)
			res.Body.Close()
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, res.StatusCode, "request %d: %s", i, answer)
		}
	})
	assert.Zero(t, walks, "walks over the pool during %d requests", requests)
	failedAttempts, served := 0, 0
	for i, f := range fakes {
		if i%(n/broken) == 0 {
			failedAttempts += f.Count("/api/chat")
		} else {
			served += f.Count("/api/chat")
		}
	}
	assert.Equal(t, requests, served, "every request served once by a working server")
	assert.Positive(t, failedAttempts, "the broken servers got attempts (and the requests were retried)")
	t.Logf("%d requests, %d attempts failed on the %d broken servers", requests, failedAttempts, broken)
}
