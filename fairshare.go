package ollamaflow

import (
	"context"
	"math"
	"net/http"
)

// The queue's classes: who a queued request is scheduled as. With tenants
// a class is a tenant; without, every request is in defaultClass and the
// queue is FIFO.
//
// Dispatch: a slot freed on a server goes to the highest priority among the
// classes with a waiter that can use that server (strict: a lower priority
// waits while a higher one has waiters for the server), and among classes
// of that priority to the one with the least virtual time, which grows by
// 1/share per request served (start-time fair queueing, counted in
// requests): over any busy period, classes of one priority are served in
// proportion to their shares. A class that had no waiters joins at the
// virtual time of the last dispatch of its priority, so idling earns no
// credit to flood with later, and a class that was served more than its
// share keeps that debt while it has any. Ties go to the class whose
// oldest waiter for the server came first. Within a class, FIFO.
//
// Queue share: while the queue (max_queue) has room, any class may queue.
// When it is full, a class holding fewer than its share, max_queue ×
// share / Σ shares of the classes with waiters (its own counted), pushes
// out the newest waiter of the class furthest over its own share (that
// request gets 429), so each class is guaranteed its share rounded up (at
// least one place) however hard another floods; a class at its share gets
// 429. Such a class always exists: the shares sum to max_queue, so a full
// queue with one class under its share has another over its. Priority
// orders dispatch only; places in the queue go by share.

// queueClass is a queued request's class, filled in by the tenant it
// belongs to (see withQueueClass).
type queueClass struct {
	name     string // the tenant's name; "" for requests without one
	share    int    // weight among the classes of its priority; below 1 counts as 1
	priority int    // strict: higher first
}

// defaultClass is the class of every request when tenancy is off.
var defaultClass = queueClass{share: 1}

type queueClassKey struct{}

// withQueueClass returns r carrying class c, which its wait in the queue
// is scheduled by. The tenant resolution calls it once it knows who asks.
func withQueueClass(r *http.Request, c queueClass) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), queueClassKey{}, c))
}

// queueClassOf is the class r was given, else defaultClass.
func queueClassOf(r *http.Request) queueClass {
	if c, ok := r.Context().Value(queueClassKey{}).(queueClass); ok {
		return c
	}
	return defaultClass
}

func (c queueClass) weight() int {
	return max(c.share, 1)
}

// classState is a class's waiters in one queue and its virtual time.
type classState struct {
	queueClass
	all      waitList              // its waiters, oldest first
	byServer map[*server]*waitList // its waiters that could use each server, oldest first
	vtime    float64               // Σ 1/share of requests served, caught up when it joins
}

// joinClassLocked returns the state of class c in q, creating it, and makes
// it live if it had no waiters. The newest config's share and priority
// for a name win. q.mu must be held.
func (q *queue) joinClassLocked(c queueClass) *classState {
	cs := q.classes[c.name]
	if cs == nil {
		cs = &classState{byServer: make(map[*server]*waitList)}
		q.classes[c.name] = cs
	}
	if cs.all.n == 0 {
		cs.queueClass = c
		cs.vtime = math.Max(cs.vtime, q.vclock[c.priority])
		q.live = append(q.live, cs)
	}
	return cs
}

// leaveClassLocked takes cs, which has no waiters left, out of the live
// classes; it is forgotten if it owes nothing (it would join at the
// virtual clock anyway), so the map holds only classes that matter.
// q.mu must be held.
func (q *queue) leaveClassLocked(cs *classState) {
	for i, l := range q.live {
		if l == cs {
			last := len(q.live) - 1
			q.live[i], q.live[last] = q.live[last], nil
			q.live = q.live[:last]
			break
		}
	}
	if cs.vtime <= q.vclock[cs.priority] {
		delete(q.classes, cs.name)
	}
}

// chargeLocked counts one request served for cs. q.mu must be held.
func (q *queue) chargeLocked(cs *classState) {
	if cs.vtime > q.vclock[cs.priority] {
		q.vclock[cs.priority] = cs.vtime
	}
	cs.vtime += 1 / float64(cs.weight())
}

// owedBefore reports whether a is owed a slot of s before b: both have
// waiters for s.
func owedBefore(a, b *classState, s *server) bool {
	if a.priority != b.priority {
		return a.priority > b.priority
	}
	if a.vtime != b.vtime {
		return a.vtime < b.vtime
	}
	return a.byServer[s].head.w.seq < b.byServer[s].head.w.seq
}

// classesForLocked appends to buf the live classes with waiters for s, in
// the order a slot of s is owed to them. q.mu must be held.
func (q *queue) classesForLocked(s *server, buf []*classState) []*classState {
	for _, cs := range q.live {
		if l := cs.byServer[s]; l == nil || l.n == 0 {
			continue
		}
		buf = append(buf, cs)
		for i := len(buf) - 1; i > 0 && owedBefore(buf[i], buf[i-1], s); i-- {
			buf[i], buf[i-1] = buf[i-1], buf[i]
		}
	}
	return buf
}

// owedLocked is the class owed the next slot of s, nil if none waits for
// it. q.mu must be held.
func (q *queue) owedLocked(s *server) *classState {
	var best *classState
	for _, cs := range q.live {
		if l := cs.byServer[s]; l != nil && l.n > 0 && (best == nil || owedBefore(cs, best, s)) {
			best = cs
		}
	}
	return best
}

// victimLocked decides, for a request of class c arriving at a full
// queue, which waiter it pushes out: the newest of the class furthest over
// its share (most places per unit of share; on a tie the lower priority,
// then the one holding more), if c holds less than its own share. Shares
// compare in integers: n over its share is n × Σshares > max_queue × share.
// q.mu must be held.
func (q *queue) victimLocked(c queueClass) (*waiter, error) {
	own := q.classes[c.name]
	held, total := 0, 0
	for _, cs := range q.live {
		total += cs.weight()
	}
	if own != nil && own.all.n > 0 {
		held = own.all.n
	} else {
		own = nil
		total += c.weight()
	}
	if held*total >= q.h.maxQueue*c.weight() {
		if held < q.all.n {
			return nil, errClassShare // others hold the rest
		}
		return nil, errQueueFull
	}
	var worst *classState
	for _, cs := range q.live {
		if cs == own || cs.all.n*total <= q.h.maxQueue*cs.weight() {
			continue // not over its share
		}
		if worst == nil || furtherOver(cs, worst) {
			worst = cs
		}
	}
	if worst == nil {
		return nil, errQueueFull // max_queue shrank under us: no share to claim
	}
	return worst.all.tail.w, nil
}

// furtherOver reports whether a gives up a place before b.
func furtherOver(a, b *classState) bool {
	if x, y := a.all.n*b.weight(), b.all.n*a.weight(); x != y {
		return x > y
	}
	if a.priority != b.priority {
		return a.priority < b.priority
	}
	return a.all.n > b.all.n
}
