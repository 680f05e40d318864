package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// queue holds a frontend's requests that found every candidate at its
// max_parallel cap, first come first served.
//
// Every waiter sits in one list per server it could use (its candidates,
// including those unhealthy or draining when it arrived, so a server that
// comes back serves it), oldest first, plus one list of all waiters. A slot
// freed on a server walks that server's list only, and the policy runs for
// the waiter being served only: a release costs O(waiters that could use
// the server), not O(waiters × backends). A server is given to a waiter only
// if no older waiter of this queue could use it, and a newcomer never takes
// a slot on a server that has waiters (server.queued): it queues behind
// them, so a freed slot always goes to the longest waiter that can use it.
type queue struct {
	h        *Handler
	mu       sync.Mutex
	all      waitList              // every waiter, oldest first
	byServer map[*server]*waitList // waiters that could use each server, oldest first
	clients  map[string]int        // waiting requests per client key
	waiting  atomic.Int64          // all.n, readable without the lock
	closed   bool                  // the handler is cleaned up: leave servers once empty
	wakeSet  atomic.Bool           // a wakeAt timer is pending

	// For the admin API: requests that waited, their total and longest wait.
	waited, waitedNanos, longestNanos atomic.Int64
}

// queueSeq orders waiters across every queue of the process, so that those
// moved from an old config's queue into the new one at a reload keep their
// place among the new config's waiters.
var queueSeq atomic.Uint64

func newQueue(h *Handler) *queue {
	q := &queue{h: h, byServer: make(map[*server]*waitList, len(h.backends)), clients: make(map[string]int)}
	for _, b := range h.backends {
		q.byServer[b.srv] = &waitList{b: b}
	}
	return q
}

// waiter is one queued request.
type waiter struct {
	seq    uint64
	model  string
	client string // the key max_queue_per_client counts by
	kind   routeKind
	labels []string
	tried  []*server // servers a retry must not go back to
	cands  []*backend
	all    waitNode
	nodes  []waitNode    // one per candidate, in that server's list
	got    chan *backend // receives the backend whose slot it was given
	q      atomic.Pointer[queue]
}

// waitNode links a waiter into one list; intrusive, so that removal is
// O(1) per list and a waiter costs one allocation for all its lists.
type waitNode struct {
	prev, next *waitNode
	list       *waitList
	w          *waiter
}

// waitList is a FIFO of waiters; for a server's list, b is this queue's
// view of the server (its max_parallel for this frontend).
type waitList struct {
	head, tail *waitNode
	n          int
	b          *backend
}

func (l *waitList) push(n *waitNode) {
	n.list, n.prev, n.next = l, l.tail, nil
	if l.tail != nil {
		l.tail.next = n
	} else {
		l.head = n
	}
	l.tail = n
	l.n++
}

func (l *waitList) remove(n *waitNode) {
	if n.list != l {
		return
	}
	if n.prev != nil {
		n.prev.next = n.next
	} else {
		l.head = n.next
	}
	if n.next != nil {
		n.next.prev = n.prev
	} else {
		l.tail = n.prev
	}
	n.prev, n.next, n.list = nil, nil, nil
	l.n--
}

// errQueueFull, errClientShare and errQueueTimeout are the ways a wait ends
// without a slot (besides the client leaving).
var (
	errQueueFull    = errors.New("queue full")
	errClientShare  = errors.New("client's share of the queue used up")
	errQueueTimeout = errors.New("queue wait expired")
)

// wakeAt makes the queue try its waiters again at t even if no slot frees:
// for a policy that holds requests back until then. One timer at a time; it
// never takes q.mu, so a policy may call it from dispatch.
func (q *queue) wakeAt(t time.Time) {
	if q.wakeSet.CompareAndSwap(false, true) {
		time.AfterFunc(time.Until(t), func() {
			q.wakeSet.Store(false)
			q.dispatchAll()
		})
	}
}

// admits reports, before a request's body is read, whether it could wait
// here if it has to: the queue has room, and so has the client's share.
func (q *queue) admits(client string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.all.n >= q.h.maxQueue:
		return errQueueFull
	case q.clients[client] >= q.h.maxQueuePerClient:
		return errClientShare
	}
	return nil
}

// wait takes a slot on one of w.cands, queueing behind the waiters that
// could use the same servers, until queue_timeout or the client goes away.
// w.cands may hold servers with no room or no health now: one that frees or
// recovers serves the waiter.
func (q *queue) wait(ctx context.Context, w *waiter) (*backend, time.Duration, error) {
	start := time.Now()
	q.mu.Lock()
	// Try again under the lock: a slot freed since the caller's attempt
	// is either seen here or dispatched to us once we are queued.
	if b := q.h.acquire(w.cands, w.model); b != nil {
		q.mu.Unlock()
		return b, 0, nil
	}
	switch {
	case q.all.n >= q.h.maxQueue:
		q.mu.Unlock()
		return nil, 0, errQueueFull
	case q.clients[w.client] >= q.h.maxQueuePerClient:
		q.mu.Unlock()
		return nil, 0, errClientShare
	}
	w.got = make(chan *backend, 1)
	w.seq = queueSeq.Add(1)
	q.enqueueLocked(w)
	cands := w.cands // a reload may move w and change them once unlocked
	q.mu.Unlock()
	// A server may have room that newcomers may not take because it has
	// waiters, here or in another frontend's queue with a lower cap: let
	// this queue's oldest waiters have it.
	for _, b := range cands {
		if b.hasRoom() {
			q.dispatchFor(b.srv)
		}
	}

	timer := time.NewTimer(time.Duration(q.h.QueueTimeout))
	defer timer.Stop()
	select {
	case b := <-w.got:
		q.noteWait(time.Since(start))
		return b, time.Since(start), nil
	case <-ctx.Done():
		return w.leave(start, ctx.Err())
	case <-timer.C:
		return w.leave(start, errQueueTimeout)
	}
}

// enqueueLocked links w into q's lists. q.mu must be held.
func (q *queue) enqueueLocked(w *waiter) {
	w.q.Store(q)
	w.all = waitNode{w: w}
	q.all.push(&w.all)
	if cap(w.nodes) < len(w.cands) {
		w.nodes = make([]waitNode, len(w.cands))
	}
	w.nodes = w.nodes[:len(w.cands)]
	for i, b := range w.cands {
		w.nodes[i] = waitNode{w: w}
		l := q.byServer[b.srv]
		if l == nil { // not one of q's backends: cannot happen, but never strand
			l = &waitList{b: b}
			q.byServer[b.srv] = l
		}
		l.push(&w.nodes[i])
		b.srv.queued.Add(1)
	}
	q.clients[w.client]++
	q.waiting.Add(1)
}

// removeLocked unlinks w from q's lists. q.mu must be held.
func (q *queue) removeLocked(w *waiter) {
	if w.all.list == nil {
		return // already served or moved
	}
	q.all.remove(&w.all)
	for i := range w.nodes {
		if l := w.nodes[i].list; l != nil {
			l.remove(&w.nodes[i])
			l.b.srv.queued.Add(-1)
		}
	}
	if q.clients[w.client]--; q.clients[w.client] <= 0 {
		delete(q.clients, w.client)
	}
	q.waiting.Add(-1)
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

// lock locks the queue w waits in, which a reload may change.
func (w *waiter) lock() *queue {
	for {
		q := w.q.Load()
		q.mu.Lock()
		if w.q.Load() == q {
			return q
		}
		q.mu.Unlock()
	}
}

// leave takes w out of its queue. If a slot was handed to it in the
// meantime, the slot is given back (and so to the next waiter).
func (w *waiter) leave(start time.Time, why error) (*backend, time.Duration, error) {
	q := w.lock()
	q.removeLocked(w)
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

// dispatchFor hands the free slots of s to the waiters that can use it,
// oldest first.
func (q *queue) dispatchFor(s *server) {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	if l := q.byServer[s]; l != nil {
		for n := l.head; n != nil && l.b.hasRoom(); {
			next := n.next // w's removal unlinks n only from l
			q.serveLocked(n.w)
			n = next
		}
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// dispatchAll tries every waiter, oldest first: after a policy's hold-back
// expires, or when waiters arrive from a reloaded config.
func (q *queue) dispatchAll() {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	for n := q.all.head; n != nil; {
		next := n.next
		q.serveLocked(n.w)
		n = next
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// serveLocked runs the policy for w over its candidates that have room and
// no older waiter in this queue, and hands w the slot it takes, if any.
// q.mu must be held.
func (q *queue) serveLocked(w *waiter) bool {
	var buf [16]*backend
	avail := buf[:0]
	for i, b := range w.cands {
		if l := w.nodes[i].list; l != nil && l.head == &w.nodes[i] && b.hasRoom() {
			avail = append(avail, b)
		}
	}
	b := q.h.take(avail, w.model)
	if b == nil {
		return false
	}
	q.removeLocked(w)
	w.got <- b
	return true
}

// waitingFor counts the waiting requests that could use s.
func (q *queue) waitingFor(s *server) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if l := q.byServer[s]; l != nil {
		return l.n
	}
	return 0
}

// length is the number of waiting requests.
func (q *queue) length() int { return int(q.waiting.Load()) }

// close is called at Cleanup. At a reload, the waiters move to the queue of
// the new config's frontend of the same name, keeping their place, so a
// server the reload added serves them; a waiter with no candidate there
// stays, and the old queue keeps listening until it is empty.
func (q *queue) close() {
	next := successor(q.h)
	q.mu.Lock()
	q.closed = true
	var moved bool
	if next != nil && next.queue != nil && next.queue != q {
		nq := next.queue
		nq.mu.Lock() // old before new: a queue is only ever closed into a newer one
		for n := q.all.head; n != nil; {
			w := n.w
			n = n.next
			cands := next.queueCandidates(w.kind, w.labels, w.model, w.tried)
			if len(cands) == 0 {
				continue
			}
			q.removeLocked(w)
			w.cands = cands
			nq.enqueueLockedKeepSeq(w)
			moved = true
		}
		nq.mu.Unlock()
	}
	q.mu.Unlock()
	if moved {
		next.queue.dispatchAll()
	}
	q.leaveServersIfDone()
}

// enqueueLockedKeepSeq links a waiter moved from another queue in by its
// original arrival, so it does not lose its place to newer waiters here.
func (q *queue) enqueueLockedKeepSeq(w *waiter) {
	q.enqueueLocked(w)
	// Moves are rare (reloads) and lists short: walking back is fine.
	for node := &w.all; node.prev != nil && node.prev.w.seq > w.seq; {
		swapWithPrev(node)
	}
	for i := range w.nodes {
		for node := &w.nodes[i]; node.prev != nil && node.prev.w.seq > w.seq; {
			swapWithPrev(node)
		}
	}
}

// swapWithPrev moves n one place towards the head of its list.
func swapWithPrev(n *waitNode) {
	l, p := n.list, n.prev
	p.next = n.next
	if n.next != nil {
		n.next.prev = p
	} else {
		l.tail = p
	}
	n.prev = p.prev
	if p.prev != nil {
		p.prev.next = n
	} else {
		l.head = n
	}
	n.next = p
	p.prev = n
}

func (q *queue) leaveServersIfDone() {
	q.mu.Lock()
	done := q.closed && q.all.n == 0
	q.mu.Unlock()
	if done {
		for _, b := range q.h.backends {
			b.srv.removeQueue(q)
		}
	}
}

// successor is the frontend that takes over h's waiters at a reload: the
// newest live handler of the same name, if it is the only other one (two
// sites sharing a name are not told apart, so their waiters stay put).
func successor(h *Handler) *Handler {
	var next *Handler
	for _, o := range liveFrontends() {
		if o == h || o.Name != h.Name {
			continue
		}
		if next != nil {
			return nil
		}
		next = o
	}
	if next == nil || next.provisioned.Before(h.provisioned) {
		return nil
	}
	return next
}

// clientKey is who a request counts against for max_queue_per_client: the
// session key when the frontend has sticky sessions and the request
// carries one, else the client IP (Caddy's client_ip, which honours
// trusted_proxies).
func (h *Handler) clientKey(r *http.Request) string {
	if k := h.stickyKey(r); k != "" {
		return k
	}
	if ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ip != "" {
		return "ip:" + ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	return "ip:" + host
}

// newWaiter describes a request about to queue: avail are the candidates
// it found, tried the backends earlier attempts used.
func (h *Handler) newWaiter(r *http.Request, kind routeKind, model string, avail, tried []*backend) *waiter {
	w := &waiter{model: model, kind: kind, labels: h.requestLabels(r), client: h.clientKey(r)}
	for _, b := range tried {
		w.tried = append(w.tried, b.srv)
	}
	w.cands = h.queueCandidates(kind, w.labels, model, w.tried)
	if len(w.cands) == 0 {
		w.cands = avail // the lists moved under us: wait for what was found
	}
	return w
}

// failQueue answers a request the queue has no room for: 429 with
// Retry-After, in the API's format.
func (h *Handler) failQueue(w http.ResponseWriter, api apiFormat, err error) error {
	w.Header().Set("Retry-After", "1")
	if errors.Is(err, errClientShare) {
		return h.fail(w, api, http.StatusTooManyRequests, fmt.Sprintf("this client already has %d requests waiting for a backend slot (max_queue_per_client); retry when one has finished", h.maxQueuePerClient))
	}
	return h.fail(w, api, http.StatusTooManyRequests, fmt.Sprintf("every backend is at its max_parallel limit and the queue is full (max_queue %d); retry shortly", h.maxQueue))
}

// admitQueue refuses, before its body is read, an inference request that
// would have to queue and could not: every candidate is at its cap (or
// left to queued requests) and the queue, or the client's share of it, is
// full.
func (h *Handler) admitQueue(r *http.Request, kind routeKind, cands []*backend) error {
	if kind != kindCompletion && kind != kindEmbedding {
		return nil
	}
	for _, b := range cands {
		if b.hasRoom() && b.srv.queued.Load() == 0 {
			return nil
		}
	}
	return h.queue.admits(h.clientKey(r))
}
