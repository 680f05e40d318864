package ollamaflow

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// queue holds a frontend's requests that found every candidate at its
// max_parallel cap, first come first served. A slot freed on any server
// the frontend uses is handed to the oldest waiter that can use it, at once:
// there is no polling.
type queue struct {
	h       *Handler
	mu      sync.Mutex
	waiters []*waiter
	waiting atomic.Int64 // len(waiters), readable without the lock
	closed  bool         // the handler is cleaned up: leave servers once empty
	wakeSet atomic.Bool  // a wakeAt timer is pending

	// For the admin API: requests that waited, their total and longest wait.
	waited, waitedNanos, longestNanos atomic.Int64
}

// wakeAt makes the queue try its waiters again at t even if no slot frees:
// for a policy that holds requests back until then. One timer at a time; it
// never takes q.mu, so a policy may call it from dispatch.
func (q *queue) wakeAt(t time.Time) {
	if q.wakeSet.CompareAndSwap(false, true) {
		time.AfterFunc(time.Until(t), func() {
			q.wakeSet.Store(false)
			q.dispatch()
		})
	}
}

type waiter struct {
	cands []*backend
	model string
	got   chan *backend // receives the backend whose slot it was given
}

// errQueueFull and errQueueTimeout are the two ways a wait ends without a
// slot (besides the client leaving).
var (
	errQueueFull    = errors.New("queue full")
	errQueueTimeout = errors.New("queue wait expired")
)

// wait takes a slot on one of cands, queueing if every one is at its cap,
// until queue_timeout or the client goes away.
func (q *queue) wait(ctx context.Context, cands []*backend, model string) (*backend, time.Duration, error) {
	start := time.Now()
	q.mu.Lock()
	// Try again under the lock: a slot freed since the caller's attempt
	// is either seen here or dispatched to us once we are queued.
	if len(q.waiters) == 0 {
		if b := q.h.acquire(cands, model); b != nil {
			q.mu.Unlock()
			return b, 0, nil
		}
	}
	if len(q.waiters) >= q.h.maxQueue {
		q.mu.Unlock()
		return nil, 0, errQueueFull
	}
	w := &waiter{cands: cands, model: model, got: make(chan *backend, 1)}
	q.waiters = append(q.waiters, w)
	q.waiting.Add(1)
	q.mu.Unlock()
	q.dispatch() // a slot may have freed between the try and the append

	timer := time.NewTimer(time.Duration(q.h.QueueTimeout))
	defer timer.Stop()
	select {
	case b := <-w.got:
		q.noteWait(time.Since(start))
		return b, time.Since(start), nil
	case <-ctx.Done():
		return q.leave(w, start, ctx.Err())
	case <-timer.C:
		return q.leave(w, start, errQueueTimeout)
	}
}

func (q *queue) noteWait(d time.Duration) {
	q.waited.Add(1)
	q.waitedNanos.Add(int64(d))
	for {
		cur := q.longestNanos.Load()
		if int64(d) <= cur || q.longestNanos.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

// leave takes w out of the queue. If a slot was handed to it in the
// meantime, the slot is given back.
func (q *queue) leave(w *waiter, start time.Time, why error) (*backend, time.Duration, error) {
	q.mu.Lock()
	for i, o := range q.waiters {
		if o == w {
			q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
			q.waiting.Add(-1)
			break
		}
	}
	q.mu.Unlock()
	select {
	case b := <-w.got:
		b.srv.release()
	default:
	}
	q.leaveServersIfDone()
	q.noteWait(time.Since(start))
	return nil, time.Since(start), why
}

// dispatch hands free slots to waiters in arrival order.
func (q *queue) dispatch() {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	for i := 0; i < len(q.waiters); {
		w := q.waiters[i]
		b := q.h.acquire(w.cands, w.model)
		if b == nil {
			i++
			continue
		}
		q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
		q.waiting.Add(-1)
		w.got <- b
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// waitingFor counts the waiting requests that could use s.
func (q *queue) waitingFor(s *server) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, w := range q.waiters {
		for _, b := range w.cands {
			if b.srv == s {
				n++
				break
			}
		}
	}
	return n
}

// length is the number of waiting requests.
func (q *queue) length() int { return int(q.waiting.Load()) }

// close is called at Cleanup: a reload must not strand the requests still
// queued in the old config, so the queue keeps listening until it is empty.
func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.leaveServersIfDone()
}

func (q *queue) leaveServersIfDone() {
	q.mu.Lock()
	done := q.closed && len(q.waiters) == 0
	q.mu.Unlock()
	if done {
		for _, b := range q.h.backends {
			b.srv.removeQueue(q)
		}
	}
}
