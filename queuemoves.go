package ollamaflow

// Waiters moved without losing their place: at a reload into the new
// config's queue of the same frontend, and at a change of the pool
// (backends_from) into the server lists of their candidates there.

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

// membersChanged follows a change of the frontend's pool (backends_from):
// every waiter is linked again, keeping its place and its class, into the
// server lists of its candidates among the new pool, so a server that
// joined serves waiters as soon as it has room, and one that left holds
// none (a waiter left with no candidate waits for one to join, or for
// queue_timeout).
func (q *queue) membersChanged(joined, left []*backend) {
	for _, b := range joined {
		b.srv.addQueue(q)
	}
	q.mu.Lock()
	for _, b := range joined {
		q.backendOf[b.srv] = b
	}
	for n := q.all.head; n != nil; n = n.next {
		w := n.w
		q.relinkLocked(w, q.h.queueCandidates(w.kind, w.labels, w.model, w.tried))
	}
	for _, b := range left {
		if q.backendOf[b.srv] == b {
			delete(q.backendOf, b.srv)
		}
		for _, cs := range q.classes {
			if l := cs.byServer[b.srv]; l != nil && l.n == 0 {
				delete(cs.byServer, b.srv)
			}
		}
	}
	q.mu.Unlock()
	for _, b := range left {
		b.srv.removeQueue(q)
	}
	if len(joined) > 0 {
		q.dispatchAll()
	}
}

// relinkLocked moves w's server nodes to cands, each at w's place by
// arrival in its class's list for the server. q.mu must be held.
func (q *queue) relinkLocked(w *waiter, cands []*backend) {
	for i := range w.nodes {
		if l := w.nodes[i].list; l != nil {
			l.remove(&w.nodes[i])
			l.b.srv.queued.Add(-1)
		}
	}
	w.cands = cands
	if cap(w.nodes) < len(cands) {
		w.nodes = make([]waitNode, len(cands))
	}
	w.nodes = w.nodes[:len(cands)]
	for i, b := range cands {
		w.nodes[i] = waitNode{w: w}
		q.serverListLocked(w.cls, b).push(&w.nodes[i])
		b.srv.queued.Add(1)
		for node := &w.nodes[i]; node.prev != nil && node.prev.w.seq > w.seq; {
			swapWithPrev(node)
		}
	}
}

// enqueueLockedKeepSeq links a waiter moved from another queue in by its
// original arrival, so it does not lose its place to newer waiters here.
func (q *queue) enqueueLockedKeepSeq(w *waiter) {
	q.enqueueLocked(w)
	// Moves are rare (reloads) and lists short: walking back is fine.
	for node := &w.all; node.prev != nil && node.prev.w.seq > w.seq; {
		swapWithPrev(node)
	}
	for node := &w.inCls; node.prev != nil && node.prev.w.seq > w.seq; {
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
		for _, b := range q.h.views() {
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
