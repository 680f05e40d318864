package ollamaflow

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// queueHandler is a frontend over detached servers (no probes), its queue
// registered on them as Provision does.
func queueHandler(policy selectionPolicy, bs ...*backend) *Handler {
	h := &Handler{Name: "q", backends: bs, policy: policy, maxQueue: 1024, maxQueuePerClient: 1024,
		QueueTimeout: caddy.Duration(time.Minute), logger: zap.NewNop()}
	h.queue = newQueue(h)
	for _, b := range bs {
		b.srv.queues = map[*queue]struct{}{h.queue: {}}
		b.srv.settings.Store(&serverSettings{name: b.cfg.Name, passes: 1, fails: 1, failThreshold: 1, logger: zap.NewNop()})
		b.srv.wake = make(chan struct{}, 1)
	}
	return h
}

type served struct {
	id  int
	b   *backend
	err error
}

// enqueue starts a waiter and returns once it is in the queue.
func enqueue(t *testing.T, ctx context.Context, h *Handler, id int, client string, cands []*backend, out chan<- served) {
	t.Helper()
	enqueueWaiter(t, ctx, h, id, &waiter{client: client, kind: kindCompletion, cands: cands}, out)
}

// enqueueWaiter starts w (a completion's, sized by its job) waiting and
// returns once it is in the queue; what it gets goes to out under id.
func enqueueWaiter(t *testing.T, ctx context.Context, h *Handler, id int, w *waiter, out chan<- served) {
	t.Helper()
	before := h.queue.length()
	go func() {
		b, _, err := h.queue.wait(ctx, w)
		out <- served{id, b, err}
	}()
	require.Eventually(t, func() bool { return h.queue.length() == before+1 }, 5*time.Second, time.Millisecond, "waiter %d never queued", id)
}

func TestQueueFreedSlotGoesToOldestAndNewcomersQueueBehind(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickLeastConn, a)
	cands := []*backend{a}
	require.NotNil(t, h.acquire(cands, &job{}))

	out := make(chan served, 3)
	for id := 1; id <= 3; id++ {
		enqueue(t, context.Background(), h, id, fmt.Sprint("c", id), cands, out)
	}

	// The race the old queue lost: the slot is free before the queue is
	// told, and a newcomer tries first. It must not take it.
	a.srv.inFlight.Add(-1)
	assert.Nil(t, h.acquire(cands, &job{}), "a newcomer took a slot the queue's head was owed")
	sticky, _ := h.acquireSticky(cands, "session", &job{})
	assert.Nil(t, sticky, "nor through its sticky server")
	a.srv.wakeQueues()

	var order []int
	for range 3 {
		s := <-out
		require.NoError(t, s.err)
		assert.Same(t, a, s.b)
		order = append(order, s.id)
		a.srv.release() // that request finishes; the next waiter gets the slot
	}
	assert.Equal(t, []int{1, 2, 3}, order, "served in arrival order")
	assert.Zero(t, h.queue.length())
	assert.Zero(t, a.srv.queued.Load())
	assert.Zero(t, a.srv.inFlight.Load())
}

func TestQueueServesTheOldestWaiterThatCanUseTheServer(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickLeastConn, a, b)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	require.NotNil(t, h.acquire([]*backend{b}, &job{}))

	out := make(chan served, 3)
	enqueue(t, context.Background(), h, 1, "x", []*backend{b}, out)    // only b
	enqueue(t, context.Background(), h, 2, "y", []*backend{a, b}, out) // either
	enqueue(t, context.Background(), h, 3, "z", []*backend{a}, out)    // only a

	a.srv.release() // waiter 1 cannot use a: 2 is the oldest that can
	s := <-out
	assert.Equal(t, 2, s.id)
	assert.Same(t, a, s.b)
	b.srv.release()
	s = <-out
	assert.Equal(t, 1, s.id)
	assert.Same(t, b, s.b)
	assert.Equal(t, 1, h.queue.length(), "waiter 3 waits for a")
	assert.EqualValues(t, 1, a.srv.queued.Load())
	assert.Zero(t, b.srv.queued.Load())
	a.srv.release()
	s = <-out
	assert.Equal(t, 3, s.id)
}

// A waiter the policy keeps off a server (least_delay: it is better off
// waiting for another) must not keep that server's slot from the waiters
// behind it. Each slot decode freed stayed idle while writes waited behind
// a summary that would only run on prefill (bench prefill-decode).
func TestAWaiterThatDeclinesAServerDoesNotHoldItsSlotBack(t *testing.T) {
	prefill := testBackend("prefill", func(c *Backend) { c.MaxParallel = 1 })
	decode := testBackend("decode", func(c *Backend) { c.MaxParallel = 1 })
	onlyPrefill := &job{model: "summary"}
	policy := func(h *Handler, avail []*backend, j *job) *backend {
		for _, b := range avail {
			if j != onlyPrefill || b == prefill {
				return b
			}
		}
		return nil // a summary waits for prefill
	}
	h := queueHandler(policy, prefill, decode)
	require.NotNil(t, h.acquire([]*backend{prefill}, &job{}))
	require.NotNil(t, h.acquire([]*backend{decode}, &job{}))

	out := make(chan served, 3)
	wait := func(id int, j *job, cands ...*backend) {
		enqueueWaiter(t, context.Background(), h, id, &waiter{client: fmt.Sprint(id), kind: kindCompletion, job: j, cands: cands}, out)
	}
	wait(1, onlyPrefill, prefill, decode) // the oldest, at the head of both lists
	wait(2, &job{}, prefill, decode)
	wait(3, &job{}, decode)

	decode.srv.release()
	s := <-out
	require.NoError(t, s.err)
	assert.Equal(t, 2, s.id, "the oldest waiter that takes decode gets it")
	assert.Same(t, decode, s.b)
	decode.srv.release()
	s = <-out
	assert.Equal(t, 3, s.id)
	assert.Same(t, decode, s.b)
	assert.Equal(t, 1, h.queue.length(), "the summary still waits")

	prefill.srv.release()
	s = <-out
	assert.Equal(t, 1, s.id)
	assert.Same(t, prefill, s.b)
}

// take() returns nil both when the policy holds the request back and when
// every slot it picked was taken under it by a concurrent request (another
// frontend's queue on the same server). Only the first is a decline: a
// waiter that lost its slot to a race still wants it, and the waiter behind
// it must not be handed that server in the same pass when it frees again.
// Here W1 picks s, loses it to a concurrent acquisition, picks u and loses
// that too while a request on s ends (its wake waits for q.mu); W2, behind
// W1 on s, must not take s ahead of W1.
func TestAWaiterThatLostARaceIsNotPassedOver(t *testing.T) {
	s := testBackend("s", func(c *Backend) { c.MaxParallel = 1 })
	u := testBackend("u", func(c *Backend) { c.MaxParallel = 1 })
	var scripted atomic.Bool
	var calls atomic.Int32
	policy := func(h *Handler, avail []*backend, j *job) *backend {
		if !scripted.Load() {
			return nil // hold everything back while the waiters queue
		}
		switch calls.Add(1) {
		case 1: // W1 picks s; a concurrent request takes that slot first
			s.srv.inFlight.Add(1)
			return s
		case 2: // W1 picks u, lost the same way; meanwhile a request on s ends
			s.srv.inFlight.Add(-1)
			u.srv.inFlight.Add(1)
			return u
		}
		return avail[0]
	}
	h := queueHandler(policy, s, u)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	require.True(t, s.tryAcquire())

	out := make(chan served, 2)
	wait := func(id int, cands ...*backend) {
		enqueueWaiter(t, ctx, h, id, &waiter{client: fmt.Sprint(id), kind: kindCompletion, job: &job{}, cands: cands}, out)
	}
	wait(1, s, u)
	wait(2, s)

	scripted.Store(true)
	s.srv.release()            // offers s (and u) to W1, which loses both to races
	h.queue.dispatchFor(s.srv) // the wake of the request that ended on s meanwhile
	first := <-out
	require.NoError(t, first.err)
	assert.Equal(t, 1, first.id, "W1 never declined s: W2 must not take it ahead of W1")
}

// Cost: dispatchAll (a policy's wakeAt, a reload, a server joining or
// leaving a tier) must not run the policy for every waiter behind a
// declined one: maxDeclines bounds it as it bounds a freed slot's walk.
func TestDispatchAllPolicyCallsWhenEveryWaiterDeclines(t *testing.T) {
	s := testBackend("s", func(c *Backend) { c.MaxParallel = 1 })
	var calls atomic.Int32
	policy := func(h *Handler, avail []*backend, j *job) *backend {
		calls.Add(1)
		return nil
	}
	h := queueHandler(policy, s)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := make(chan served, 300)
	// s is full while they queue: a waiter's own dispatch after it
	// queued would otherwise still be running the policy below.
	require.True(t, s.tryAcquire())
	for i := 0; i < 200; i++ {
		enqueueWaiter(t, ctx, h, i, &waiter{client: fmt.Sprint(i), kind: kindCompletion, job: &job{}, cands: []*backend{s}}, out)
	}
	s.srv.inFlight.Add(-1) // free, without a wake
	calls.Store(0)
	h.queue.dispatchAll()
	assert.LessOrEqual(t, int(calls.Load()), 65, "dispatchAll, 200 declining waiters: policy calls")
	calls.Store(0)
	h.queue.dispatchFor(s.srv)
	assert.LessOrEqual(t, int(calls.Load()), 65, "a freed slot, 200 declining waiters: policy calls")
}

// maxDeclines ends the whole serveOneLocked walk, not the class's: when the
// class owed a server has 64 waiters that decline it, the slot is never
// offered to the next class, whose waiter would take it. Before the change
// the owed class's head declined and the next class's head took the slot;
// dispatchAll does not help either (the owed class is still owed it), so the
// other tenant waits out its queue_timeout while the server idles.
func TestDeclinesOfOneClassDoNotKeepTheSlotFromAnother(t *testing.T) {
	s := testBackend("s", func(c *Backend) { c.MaxParallel = 1 })
	declines := &job{model: "elsewhere"}
	policy := func(h *Handler, avail []*backend, j *job) *backend {
		if j == declines {
			return nil
		}
		return avail[0]
	}
	h := queueHandler(policy, s)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	require.True(t, s.tryAcquire())
	out := make(chan served, 100)
	wait := func(id int, j *job, class queueClass) {
		enqueueWaiter(t, ctx, h, id, &waiter{client: fmt.Sprint(id), kind: kindCompletion, job: j, class: class, cands: []*backend{s}}, out)
	}
	a, b := queueClass{name: "a", share: 1}, queueClass{name: "b", share: 1}
	for i := 0; i < 65; i++ { // maxDeclines+1
		wait(i, declines, a)
	}
	wait(1000, &job{}, b)

	s.srv.release()
	select {
	case got := <-out:
		assert.Equal(t, 1000, got.id)
	case <-time.After(2 * time.Second):
		t.Fatal("tenant b's waiter, which takes s, never got the slot s freed")
	}
}

func TestQueueWakesWhenAServerRecoversOrIsUndrained(t *testing.T) {
	busy := testBackend("busy", func(c *Backend) { c.MaxParallel = 1 })
	down := testBackend("down", func(c *Backend) { c.MaxParallel = 1 })
	drained := testBackend("drained", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickLeastConn, busy, down, drained)
	require.NotNil(t, h.acquire([]*backend{busy}, &job{}))
	down.srv.state.Store(int32(stateUnhealthy))
	drained.srv.draining.Store(true)

	// A request arriving now finds only the busy server among the live
	// candidates; it queues for every server that could serve it.
	cands, why := h.candidates(kindCompletion, nil)
	require.Nil(t, why)
	assert.Equal(t, []string{"busy"}, names(cands))
	w := h.newWaiter(httptestRequest(), kindCompletion, &job{}, cands, nil)
	assert.Equal(t, []string{"busy", "down", "drained"}, names(w.cands))

	out := make(chan served, 2)
	go func() {
		b, _, err := h.queue.wait(context.Background(), w)
		out <- served{1, b, err}
	}()
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond)
	enqueue(t, context.Background(), h, 2, "other", w.cands, out)

	down.srv.recordProbe(nil) // one passing probe (health_passes 1): healthy again
	s := <-out
	require.NoError(t, s.err)
	assert.Equal(t, 1, s.id)
	assert.Same(t, down, s.b, "the recovered server serves the queue at once")

	drained.srv.setDraining(false)
	s = <-out
	require.NoError(t, s.err)
	assert.Equal(t, 2, s.id)
	assert.Same(t, drained, s.b, "the undrained server serves the queue at once")
	assert.Zero(t, h.queue.length())
}

func TestQueueLimitsEachClientsShare(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickLeastConn, a)
	h.maxQueue, h.maxQueuePerClient = 4, 2
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	out := make(chan served, 8)
	enqueue(t, ctx, h, 1, "greedy", []*backend{a}, out)
	enqueue(t, ctx, h, 2, "greedy", []*backend{a}, out)
	_, _, err := h.queue.wait(ctx, &waiter{client: "greedy", cands: []*backend{a}})
	assert.ErrorIs(t, err, errClientShare, "a third place for the same client")
	assert.ErrorIs(t, h.queue.admits("greedy", defaultClass), errClientShare, "refused before its body is read, too")
	assert.NoError(t, h.queue.admits("polite", defaultClass))

	enqueue(t, ctx, h, 3, "polite", []*backend{a}, out)
	enqueue(t, ctx, h, 4, "other", []*backend{a}, out)
	_, _, err = h.queue.wait(ctx, &waiter{client: "fourth", cands: []*backend{a}})
	assert.ErrorIs(t, err, errQueueFull)

	// A place given back is the client's to use again.
	a.srv.release()
	s := <-out
	assert.Equal(t, 1, s.id)
	assert.NoError(t, h.queue.admits("greedy", defaultClass))
	cancel()
	for range 3 {
		assert.ErrorIs(t, (<-out).err, context.Canceled)
	}
	assert.Zero(t, h.queue.length())
	assert.Empty(t, h.queue.clients, "no client count outlives its waiters")
	assert.Zero(t, a.srv.queued.Load())
}

func TestQueueLeavingAfterASlotWasHandedGivesItBack(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickLeastConn, a)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	w := &waiter{client: "c", cands: []*backend{a}, got: make(chan *backend, 1), seq: queueSeq.Add(1)}
	h.queue.mu.Lock()
	h.queue.enqueueLocked(w)
	h.queue.mu.Unlock()
	a.srv.release()
	require.Len(t, w.got, 1, "the slot was handed to the waiter")
	_, _, err := w.leave(time.Now(), context.Canceled) // its client left at that moment
	assert.ErrorIs(t, err, context.Canceled)
	assert.Zero(t, a.srv.inFlight.Load(), "the handed slot went back")
}

func TestQueueHoldBackStillWakes(t *testing.T) {
	// least_delay holds a request back while every server is being
	// measured; wakeAt brings it back without any release.
	x := testBackend("x", nil)
	y := testBackend("y", nil)
	h := queueHandler(pickLeastDelay, x, y)
	for _, b := range []*backend{x, y} {
		b.srv.inFlight.Store(2) // its measuring request and a spare (spare.go)
		b.srv.speed.startProbe(time.Now())
	}
	out := make(chan served, 1)
	enqueue(t, context.Background(), h, 1, "c", []*backend{x, y}, out)
	s := <-out // after bootstrapHold the policy falls back to least_conn
	require.NoError(t, s.err)
	assert.NotNil(t, s.b)
}

// BenchmarkQueueRelease measures what one completion costs the queue with
// 256 waiters over 100 backends (every waiter may use every backend, every
// backend at its cap of 1): release a slot, the oldest waiter gets it and
// its request "finishes" at once, freeing the slot for the next one. It
// reports the p99 time a waiter spends between the release and its wake.
func BenchmarkQueueRelease(b *testing.B) { benchQueueRelease(b, 1) }

// BenchmarkQueueReleaseEightClasses is BenchmarkQueueRelease with the
// waiters in eight classes (tenants) of different shares and priorities.
func BenchmarkQueueReleaseEightClasses(b *testing.B) { benchQueueRelease(b, 8) }

func benchQueueRelease(b *testing.B, classes int) {
	const nBackends, nWaiters = 100, 256
	var bs []*backend
	for i := range nBackends {
		bs = append(bs, testBackend(fmt.Sprint("b", i), func(c *Backend) { c.MaxParallel = 1 }))
	}
	h := queueHandler(pickLeastConn, bs...)
	for _, be := range bs {
		be.srv.inFlight.Store(1)
	}
	ws := make([]*waiter, nWaiters)
	for i := range ws {
		ws[i] = &waiter{client: fmt.Sprint(i), cands: bs, got: make(chan *backend, 1)}
		if classes > 1 {
			c := i % classes
			ws[i].class = queueClass{name: fmt.Sprint("tenant", c), share: 1 + c%3, priority: c % 2}
		}
	}
	h.queue.mu.Lock()
	for _, w := range ws {
		w.seq = queueSeq.Add(1)
		h.queue.enqueueLocked(w)
	}
	h.queue.mu.Unlock()
	var served atomic.Int64
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	next := 0
	for i := 0; i < b.N; i++ {
		be := bs[i%nBackends]
		start := time.Now()
		be.srv.release()
		var w *waiter
		var got *backend
		if classes == 1 {
			w = ws[next] // FIFO: the oldest
			got = <-w.got
		} else {
			// Whichever class was owed the slot: the hand-over happened
			// within release; finding who got it is not the queue's cost.
			lat = append(lat, time.Since(start))
			b.StopTimer()
			for w == nil {
				for _, c := range ws {
					if len(c.got) > 0 {
						w, got = c, <-c.got
						break
					}
				}
			}
		}
		if classes == 1 {
			lat = append(lat, time.Since(start))
			b.StopTimer()
		}
		served.Add(1)
		// The request is over: its waiter queues again at the back, so the
		// queue stays 256 long.
		next = (next + 1) % nWaiters
		h.queue.mu.Lock()
		w.seq = queueSeq.Add(1)
		h.queue.enqueueLocked(w)
		h.queue.mu.Unlock()
		_ = got
		b.StartTimer()
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

func httptestRequest() *http.Request {
	return httptest.NewRequest(http.MethodPost, "/api/chat", nil)
}

// A hold of a few milliseconds must not wait for a pending wake of a
// bootstrap second; a later wake adds no timer while a sooner one is due.
func TestAnEarlierWakeReplacesAPendingLaterOne(t *testing.T) {
	h := &Handler{}
	q := newQueue(h)
	now := time.Now()
	q.wakeAt(now.Add(time.Hour))
	assert.Equal(t, now.Add(time.Hour).UnixNano(), q.wakeNext.Load())
	q.wakeAt(now.Add(2 * time.Hour))
	assert.Equal(t, now.Add(time.Hour).UnixNano(), q.wakeNext.Load(), "a later wake: the pending one serves")
	q.wakeAt(now.Add(time.Minute))
	assert.Equal(t, now.Add(time.Minute).UnixNano(), q.wakeNext.Load(), "an earlier wake is the next")
}
