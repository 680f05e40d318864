package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// queue holds a frontend's requests that found every candidate at its
// max_parallel cap (or requests_per_minute), and hands them freed slots by
// class (fairshare.go): strict priority, then weighted fair share among the
// classes of one priority, first come first served within a class. Without
// tenants every request is in one class and the queue is plain FIFO.
//
// Every waiter sits in one list per server it could use (its candidates,
// including those unhealthy or draining when it arrived, so a server that
// comes back serves it) in its class, oldest first, plus its class's list
// and the queue's list of all waiters. A slot freed on a server picks the
// class among those waiting for that server, then walks that class's list
// for the server, and the policy runs for the waiter being served only: a
// release costs O(classes waiting + waiters of the class that could use
// the server), not O(waiters × backends). A server is given to a waiter
// only if its class is the one owed that server and no older waiter of
// its class takes it (an older one the policy keeps waiting for another
// server does not hold the slot back), and a newcomer never takes a slot
// on a server that has waiters (server.queued): it queues behind them.
type queue struct {
	h         *Handler
	mu        sync.Mutex
	all       waitList               // every waiter, oldest first
	backendOf map[*server]*backend   // this frontend's view of each server (its caps)
	classes   map[string]*classState // by class name (fairshare.go)
	live      []*classState          // the classes with waiters
	vclock    map[int]float64        // per priority: the virtual time of the last dispatch
	clients   map[string]int         // waiting requests per client key
	waiting   atomic.Int64           // all.n, readable without the lock
	closed    bool                   // the handler is cleaned up: leave servers once empty
	wakeNext  atomic.Int64           // when the earliest pending wakeAt fires (UnixNano); 0: none
	pass      uint64                 // the current dispatch pass, for waitNode.declined
	declines  int                    // waiters that declined in this pass; at most maxDeclines are passed over

	// For the admin API: requests that waited, their total and longest wait.
	waited, waitedNanos, longestNanos atomic.Int64
}

// queueSeq orders waiters across every queue of the process, so that those
// moved from an old config's queue into the new one at a reload keep their
// place among the new config's waiters.
var queueSeq atomic.Uint64

func newQueue(h *Handler) *queue {
	pool := h.pool()
	q := &queue{h: h, backendOf: make(map[*server]*backend, len(pool)), classes: make(map[string]*classState),
		vclock: make(map[int]float64), clients: make(map[string]int)}
	for _, b := range pool {
		q.backendOf[b.srv] = b
	}
	return q
}

// waiter is one queued request.
type waiter struct {
	seq    uint64
	model  string
	job    *job       // what it asks for, for the policy's cost estimate
	client string     // the key max_queue_per_client counts by
	class  queueClass // who it is scheduled as (fairshare.go)
	kind   routeKind
	labels []string
	tried  []*server // servers a retry must not go back to
	cands  []*backend
	all    waitNode    // in the queue's list
	inCls  waitNode    // in its class's list
	nodes  []waitNode  // one per candidate, in its class's list for that server
	cls    *classState // its class in the queue it waits in; guarded by that queue's mu
	// got receives the backend whose slot it was given, or nil when it was
	// pushed out of a full queue for a class under its share.
	got chan *backend
	q   atomic.Pointer[queue]
}

// waitNode links a waiter into one list; intrusive, so that removal is
// O(1) per list and a waiter costs one allocation for all its lists.
type waitNode struct {
	prev, next *waitNode
	list       *waitList
	w          *waiter
	// declined is the dispatch pass (queue.pass) in which the policy was
	// offered this list's server for w and kept w waiting for another: the
	// waiter behind it may then have the slot in that pass.
	declined uint64
}

// waitList is a FIFO of waiters; for a server's list, b is this queue's
// view of the server (its caps for this frontend).
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

// errQueueFull, errClientShare, errClassShare, errPushedOut and
// errQueueTimeout are the ways a wait ends without a slot (besides the
// client leaving).
var (
	errQueueFull    = errors.New("queue full")
	errClientShare  = errors.New("client's share of the queue used up")
	errClassShare   = errors.New("queue full and the class holds its share of it")
	errPushedOut    = errors.New("pushed out of the full queue for a class under its share")
	errQueueTimeout = errors.New("queue wait expired")
)

// wakeAt makes the queue try its waiters again at t even if no slot frees:
// for a policy that holds requests back until then. A wake already pending
// for t or sooner serves; an earlier one is added (a hold of a bootstrap
// second must not delay one of a few milliseconds). It never takes q.mu,
// so a policy may call it from dispatch.
func (q *queue) wakeAt(t time.Time) {
	at := t.UnixNano()
	for {
		pending := q.wakeNext.Load()
		if pending != 0 && pending <= at {
			return
		}
		if q.wakeNext.CompareAndSwap(pending, at) {
			break
		}
	}
	time.AfterFunc(time.Until(t), func() {
		defer func() {
			if rec := recover(); rec != nil {
				q.h.logger.Error("panic in queue wake", zap.Any("panic", rec), zap.Stack("stack"))
			}
		}()
		q.wakeNext.CompareAndSwap(at, 0) // unless an earlier wake replaced this one as the next
		q.dispatchAll()
	})
}

// admits reports, before a request's body is read, whether it could wait
// here if it has to: the queue has room (or the class may push out a
// class over its share), and the client's share has room.
func (q *queue) admits(client string, class queueClass) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	_, err := q.roomLocked(client, class)
	return err
}

// roomLocked decides whether a request of client and class may queue now:
// nil, or the waiter it must push out first, or why not. q.mu must be held.
func (q *queue) roomLocked(client string, class queueClass) (*waiter, error) {
	var victim *waiter
	if q.all.n >= q.h.maxQueue {
		var err error
		if victim, err = q.victimLocked(class); err != nil {
			return nil, err
		}
	}
	if q.clients[client] >= q.h.maxQueuePerClient {
		return nil, errClientShare
	}
	return victim, nil
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
	if b := q.h.acquire(w.cands, w.job); b != nil {
		q.mu.Unlock()
		return b, 0, nil
	}
	victim, err := q.roomLocked(w.client, w.class)
	if err != nil {
		q.mu.Unlock()
		return nil, 0, err
	}
	if victim != nil {
		q.removeLocked(victim)
		victim.got <- nil // it answers 429; its place is ours
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
		if b == nil {
			return nil, time.Since(start), errPushedOut
		}
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
	cs := q.joinClassLocked(w.class)
	w.cls = cs
	w.all = waitNode{w: w}
	q.all.push(&w.all)
	w.inCls = waitNode{w: w}
	cs.all.push(&w.inCls)
	if cap(w.nodes) < len(w.cands) {
		w.nodes = make([]waitNode, len(w.cands))
	}
	w.nodes = w.nodes[:len(w.cands)]
	for i, b := range w.cands {
		w.nodes[i] = waitNode{w: w}
		q.serverListLocked(cs, b).push(&w.nodes[i])
		b.srv.queued.Add(1)
	}
	q.clients[w.client]++
	q.waiting.Add(1)
}

// serverListLocked is the list of cs's waiters for b's server, made on
// first use. q.mu must be held.
func (q *queue) serverListLocked(cs *classState, b *backend) *waitList {
	l := cs.byServer[b.srv]
	if l == nil {
		l = &waitList{b: b}
		if qb := q.backendOf[b.srv]; qb != nil {
			l.b = qb
		}
		cs.byServer[b.srv] = l
	}
	return l
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
	w.cls.all.remove(&w.inCls)
	if w.cls.all.n == 0 {
		q.leaveClassLocked(w.cls)
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
		if b != nil {
			b.release()
		}
	default:
	}
	q.leaveServersIfDone()
	q.noteWait(time.Since(start))
	return nil, time.Since(start), why
}

// dispatchFor hands the free slots of s to the waiters that can use it:
// each slot to the class owed it, within the class to the oldest.
func (q *queue) dispatchFor(s *server) {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	if b := q.backendOf[s]; b != nil {
		for b.hasRoom() && q.serveOneLocked(s) {
		}
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// serveOneLocked gives one slot of s to a waiter: the classes waiting for
// s in the order they are owed it, each class's waiters oldest first,
// until one takes a slot (the policy may prefer another of its servers,
// or hold it back). It reports whether a waiter was served. q.mu must be
// held.
func (q *queue) serveOneLocked(s *server) bool {
	var buf [8]*classState
	q.newPassLocked()
	for _, cs := range q.classesForLocked(s, buf[:0]) {
		for n := cs.byServer[s].head; n != nil; {
			next := n.next
			if q.serveLocked(n.w, s) {
				return true
			}
			n = next
		}
	}
	return false
}

// newPassLocked starts a dispatch pass: no waiter has declined in it yet.
func (q *queue) newPassLocked() {
	q.pass++
	q.declines = 0
}

// maxDeclines bounds the waiters one dispatch pass passes over when the
// policy keeps them waiting for another server: each offer runs the policy,
// and a pass should not run it for the whole queue. Past it, only the head
// of a list is offered its server, as if no waiter had declined (the next
// class still gets its turn).
const maxDeclines = 64

// dispatchAll tries every waiter, oldest first: after a policy's hold-back
// expires, or when waiters arrive from a reloaded config.
func (q *queue) dispatchAll() {
	if q.waiting.Load() == 0 {
		return
	}
	q.mu.Lock()
	q.newPassLocked()
	for n := q.all.head; n != nil; {
		next := n.next
		q.serveLocked(n.w, nil)
		n = next
	}
	q.mu.Unlock()
	q.leaveServersIfDone()
}

// serveLocked runs the policy for w over its candidates that have room,
// where its class is owed the slot (always on owed, which the caller chose
// w's class for) and every older waiter of its class for that server was
// offered it in this pass and kept waiting for another, and hands w the
// slot it takes, if any. q.mu must be held.
func (q *queue) serveLocked(w *waiter, owed *server) bool {
	var buf [16]*backend
	var offered [16]int
	avail, idx := buf[:0], offered[:0]
	tier, tiered := q.h.lowestTier(w.cands) // SRV priorities: only the lowest usable one serves
	for i, b := range w.cands {
		n := &w.nodes[i]
		if n.list == nil || n.prev != nil && n.prev.declined != q.pass || !b.hasRoom() || tiered && b.tier.Load() != tier {
			continue
		}
		if b.srv != owed && len(q.live) > 1 && q.owedLocked(b.srv) != w.cls {
			continue
		}
		avail, idx = append(avail, b), append(idx, i)
	}
	if len(avail) == 0 {
		return false
	}
	if w.job != nil {
		w.job.cands = w.cands
	}
	b, held := q.h.takeOrHold(avail, w.job)
	if b == nil {
		// Kept waiting for another server (least_delay): the waiters
		// behind w may have the slots it declined, not those it lost to
		// a concurrent request (it still wants them).
		if len(held) == 0 || q.declines >= maxDeclines {
			return false
		}
		q.declines++
		for k, i := range idx {
			if len(held) == len(avail) || slices.Contains(held, avail[k]) {
				w.nodes[i].declined = q.pass
			}
		}
		return false
	}
	q.chargeLocked(w.cls)
	q.removeLocked(w)
	w.got <- b
	return true
}

// waitingFor counts the waiting requests that could use s.
func (q *queue) waitingFor(s *server) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := 0
	for _, cs := range q.live {
		if l := cs.byServer[s]; l != nil {
			n += l.n
		}
	}
	return n
}

// length is the number of waiting requests.
func (q *queue) length() int { return int(q.waiting.Load()) }

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
func (h *Handler) newWaiter(r *http.Request, kind routeKind, j *job, avail, tried []*backend) *waiter {
	model := j.model
	w := &waiter{model: model, job: j, kind: kind, labels: h.requestLabels(r), client: h.clientKey(r), class: queueClassOf(r)}
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
	switch {
	case errors.Is(err, errClientShare):
		return h.fail(w, api, http.StatusTooManyRequests, fmt.Sprintf("this client already has %d requests waiting for a backend slot (max_queue_per_client); retry when one has finished", h.maxQueuePerClient))
	case errors.Is(err, errClassShare):
		return h.fail(w, api, http.StatusTooManyRequests, fmt.Sprintf("every backend is at its limit and the queue is full (max_queue %d); this tenant already holds its share of the queue, retry when one of its requests has finished", h.maxQueue))
	case errors.Is(err, errPushedOut):
		return h.fail(w, api, http.StatusTooManyRequests, fmt.Sprintf("the queue filled up (max_queue %d) while this tenant held more than its share of it: this request gave its place to another tenant's; retry shortly", h.maxQueue))
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
	return h.queue.admits(h.clientKey(r), queueClassOf(r))
}
