package ollamaflow

import (
	"context"
	"fmt"
	"testing"
	"time"

	"net/http"
	"net/http/httptest"

	"github.com/tidwall/gjson"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// enqueueAs starts a waiter of class c and returns once it is in the queue.
func enqueueAs(t *testing.T, ctx context.Context, h *Handler, id int, c queueClass, cands []*backend, out chan<- served) {
	t.Helper()
	before := h.queue.length()
	go func() {
		w := &waiter{client: fmt.Sprint("client", id), class: c, kind: kindCompletion, cands: cands}
		b, _, err := h.queue.wait(ctx, w)
		out <- served{id, b, err}
	}()
	require.Eventually(t, func() bool { return h.queue.length() == before+1 }, 5*time.Second, time.Millisecond, "waiter %d never queued", id)
}

// pushIn starts a waiter of class c at a full queue, where it takes the
// place of another, and returns the one it pushed out.
func pushIn(t *testing.T, ctx context.Context, h *Handler, id int, c queueClass, cands []*backend, out chan served) served {
	t.Helper()
	go func() {
		w := &waiter{client: fmt.Sprint("client", id), class: c, kind: kindCompletion, cands: cands}
		b, _, err := h.queue.wait(ctx, w)
		out <- served{id, b, err}
	}()
	select {
	case s := <-out:
		return s
	case <-time.After(5 * time.Second):
		t.Fatalf("waiter %d pushed nobody out", id)
		return served{}
	}
}

// serveInTurn frees the slot of a (cap 1, busy) n times, one request at a
// time, and returns who got it each time.
func serveInTurn(t *testing.T, a *backend, out <-chan served, n int) []int {
	t.Helper()
	var order []int
	for range n {
		a.srv.release()
		s := <-out
		require.NoError(t, s.err)
		require.Same(t, a, s.b)
		order = append(order, s.id)
	}
	return order
}

func busyBackend(t *testing.T, name string) *backend {
	return testBackend(name, func(c *Backend) { c.MaxParallel = 1 })
}

func TestFairShareStrictPriorityThenFIFO(t *testing.T) {
	a := busyBackend(t, "a")
	h := queueHandler(pickLeastConn, a)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	batch := queueClass{name: "batch", share: 1, priority: 0}
	interactive := queueClass{name: "interactive", share: 1, priority: 10}
	out := make(chan served, 6)
	// The batch waiters came first; the interactive ones still go first,
	// and each class keeps its own arrival order.
	enqueueAs(t, context.Background(), h, 1, batch, []*backend{a}, out)
	enqueueAs(t, context.Background(), h, 2, batch, []*backend{a}, out)
	enqueueAs(t, context.Background(), h, 3, interactive, []*backend{a}, out)
	enqueueAs(t, context.Background(), h, 4, batch, []*backend{a}, out)
	enqueueAs(t, context.Background(), h, 5, interactive, []*backend{a}, out)
	assert.Equal(t, []int{3, 5}, serveInTurn(t, a, out, 2))
	// A higher priority arriving now is next again, before older batch work.
	enqueueAs(t, context.Background(), h, 6, interactive, []*backend{a}, out)
	assert.Equal(t, []int{6, 1, 2, 4}, serveInTurn(t, a, out, 4))
	assert.Zero(t, h.queue.length())
	assert.Empty(t, h.queue.live)
	assert.Zero(t, a.srv.queued.Load())
}

func TestFairShareWeightsByShare(t *testing.T) {
	a := busyBackend(t, "a")
	h := queueHandler(pickLeastConn, a)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	big := queueClass{name: "big", share: 3}
	small := queueClass{name: "small", share: 1}
	out := make(chan served, 32)
	// The small class queues first: shares decide, not arrival.
	for i := range 8 {
		enqueueAs(t, context.Background(), h, 100+i, small, []*backend{a}, out)
	}
	for i := range 8 {
		enqueueAs(t, context.Background(), h, 200+i, big, []*backend{a}, out)
	}
	order := serveInTurn(t, a, out, 8)
	var bigs, smalls []int
	for _, id := range order {
		if id >= 200 {
			bigs = append(bigs, id)
		} else {
			smalls = append(smalls, id)
		}
	}
	assert.Len(t, bigs, 6, "share 3 of 4: %v", order)
	assert.Len(t, smalls, 2, "share 1 of 4: %v", order)
	assert.IsIncreasing(t, bigs, "FIFO within a class")
	assert.IsIncreasing(t, smalls, "FIFO within a class")
	assert.Equal(t, []int{200, 201, 202, 203, 204, 205}, bigs)
	assert.Equal(t, []int{100, 101}, smalls)
	rest := serveInTurn(t, a, out, 8)
	assert.Len(t, rest, 8)
	assert.Zero(t, h.queue.length())
}

func TestFairShareIdleClassEarnsNoCredit(t *testing.T) {
	a := busyBackend(t, "a")
	h := queueHandler(pickLeastConn, a)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	x := queueClass{name: "x", share: 1}
	y := queueClass{name: "y", share: 1}
	out := make(chan served, 32)
	// x is served alone for a while; y, idle meanwhile, then arrives with
	// a backlog: it does not get the next ten slots in a row, the two
	// alternate from then on.
	for i := range 14 {
		enqueueAs(t, context.Background(), h, 100+i, x, []*backend{a}, out)
	}
	assert.Equal(t, []int{100, 101, 102, 103, 104, 105, 106, 107, 108, 109}, serveInTurn(t, a, out, 10))
	for i := range 4 {
		enqueueAs(t, context.Background(), h, 200+i, y, []*backend{a}, out)
	}
	order := serveInTurn(t, a, out, 8)
	for i := 0; i+1 < len(order); i += 2 {
		assert.NotEqual(t, order[i]/100, order[i+1]/100, "x and y alternate: %v", order)
	}
	assert.Zero(t, h.queue.length())
	assert.Empty(t, h.queue.live)
}

func TestFairShareOwedOnlyWhereTheClassCanGo(t *testing.T) {
	a := busyBackend(t, "a")
	b := busyBackend(t, "b")
	h := queueHandler(pickLeastConn, a, b)
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	require.NotNil(t, h.acquire([]*backend{b}, &job{}))
	low := queueClass{name: "low", share: 1}
	high := queueClass{name: "high", share: 1, priority: 1}
	out := make(chan served, 4)
	enqueueAs(t, context.Background(), h, 1, low, []*backend{a, b}, out)
	enqueueAs(t, context.Background(), h, 2, high, []*backend{b}, out)
	// a: only the low class waits for it, so it is low's, priority or not.
	a.srv.release()
	s := <-out
	assert.Equal(t, 1, s.id)
	assert.Same(t, a, s.b)
	// Now a new low waiter could use either; b's slot is high's.
	enqueueAs(t, context.Background(), h, 3, low, []*backend{a, b}, out)
	b.srv.release()
	s = <-out
	assert.Equal(t, 2, s.id)
	assert.Same(t, b, s.b)
	b.srv.release()
	s = <-out
	assert.Equal(t, 3, s.id)
	assert.Same(t, b, s.b)
}

func TestFairShareQueueShareBound(t *testing.T) {
	a := busyBackend(t, "a")
	h := queueHandler(pickLeastConn, a)
	h.maxQueue = 6
	require.NotNil(t, h.acquire([]*backend{a}, &job{}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	batch := queueClass{name: "batch", share: 1}
	chat := queueClass{name: "chat", share: 2}
	out := make(chan served, 16)

	// Alone, the batch class may fill the whole queue.
	for i := range 6 {
		enqueueAs(t, ctx, h, 100+i, batch, []*backend{a}, out)
	}
	_, _, err := h.queue.wait(ctx, &waiter{client: "b7", class: batch, cands: []*backend{a}})
	assert.ErrorIs(t, err, errQueueFull)
	assert.ErrorIs(t, h.queue.admits("b7", batch), errQueueFull)

	// chat's share is 6 × 2/3 = 4 places: each of its requests pushes out
	// the newest batch one until it holds them.
	assert.NoError(t, h.queue.admits("c", chat), "a class under its share is admitted before its body is read")
	for i := range 4 {
		s := pushIn(t, ctx, h, 200+i, chat, []*backend{a}, out)
		assert.Equal(t, 105-i, s.id, "the newest batch waiter gives its place")
		assert.ErrorIs(t, s.err, errPushedOut)
		h.queue.mu.Lock()
		assert.Equal(t, 6, h.queue.all.n)
		h.queue.mu.Unlock()
	}
	_, _, err = h.queue.wait(ctx, &waiter{client: "c5", class: chat, cands: []*backend{a}})
	assert.ErrorIs(t, err, errClassShare, "chat holds its share")
	assert.ErrorIs(t, h.queue.admits("c5", chat), errClassShare)
	_, _, err = h.queue.wait(ctx, &waiter{client: "b8", class: batch, cands: []*backend{a}})
	assert.ErrorIs(t, err, errClassShare, "batch holds its share (2) too")

	// A third class of share 1 gets 6 × 1/4 = 1.5, rounded up: 2 places,
	// taken from chat, now furthest over its share (4 of 3).
	other := queueClass{name: "other", share: 1}
	s := pushIn(t, ctx, h, 300, other, []*backend{a}, out)
	assert.Equal(t, 203, s.id, "the newest waiter of the class furthest over its share")
	assert.ErrorIs(t, s.err, errPushedOut)
	s = pushIn(t, ctx, h, 301, other, []*backend{a}, out)
	assert.ErrorIs(t, s.err, errPushedOut)
	_, _, err = h.queue.wait(ctx, &waiter{client: "o3", class: other, cands: []*backend{a}})
	assert.ErrorIs(t, err, errClassShare)

	cancel()
	for range 6 {
		assert.ErrorIs(t, (<-out).err, context.Canceled)
	}
	assert.Zero(t, h.queue.length())
	assert.Zero(t, a.srv.queued.Load())
	assert.Empty(t, h.queue.live)
}

func TestFairShareClassFromTheRequest(t *testing.T) {
	a := busyBackend(t, "a")
	h := queueHandler(pickLeastConn, a)
	r := httptestRequest()
	assert.Equal(t, defaultClass, h.newWaiter(r, kindCompletion, &job{}, []*backend{a}, nil).class)
	c := queueClass{name: "team-a", share: 3, priority: 2}
	assert.Equal(t, c, h.newWaiter(withQueueClass(r, c), kindCompletion, &job{}, []*backend{a}, nil).class)
}

func TestFairShareRefusalsAnswer429InTheAPIsFormat(t *testing.T) {
	h := queueHandler(pickLeastConn, busyBackend(t, "a"))
	h.maxQueue = 6
	for _, err := range []error{errClassShare, errPushedOut} {
		rec := httptest.NewRecorder()
		require.NoError(t, h.failQueue(rec, apiOpenAI, err))
		assert.Equal(t, http.StatusTooManyRequests, rec.Code)
		assert.Equal(t, "1", rec.Header().Get("Retry-After"))
		msg := gjson.Get(rec.Body.String(), "error.message").String()
		assert.Contains(t, msg, "tenant", err.Error())
		assert.Contains(t, msg, "max_queue 6")
		assert.Equal(t, "queue_full", gjson.Get(rec.Body.String(), "error.code").String(), rec.Body.String())
		assert.Equal(t, "rate_limit_error", gjson.Get(rec.Body.String(), "error.type").String(), "the type the OpenAI SDKs retry")
	}
}
