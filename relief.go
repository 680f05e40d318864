package ollamaflow

import (
	"math"
	"slices"
	"sync"
	"time"
)

// Relieving a lasting queue (least_delay). Choosing each request's earliest end is
// selfish routing: a request that joins a queue holds back every request
// that comes after it while the queue lasts, and in a closed loop of
// clients the queue lasts. Taken away for the s seconds it runs on a
// slower server with a slot free, it lets the fast servers' queue serve
// everyone else a turn earlier for those s seconds, which saves the pool
// about as much as the slower server costs it. Choosing the earliest end
// alone kept such slots idle: with speed classes 1×, 2× and 4× the 4×
// server got 17 of 300 requests, the pool ran at 47 req/s with a median
// of 0.24 s, and least_conn, using every slot, at 54 with 0.17 s; an oracle
// choosing the earliest end with every true speed known sent it none (the
// estimates were right, the objective was not).

// relievesQueue reports whether a server with a slot free, where the
// request is expected to take alt seconds (a slot planned for but never
// seen in use counts as free, at the half wait cost.go prices it with, so a
// history that never tested it cannot keep it idle; where it is missing,
// the request's wait rules it out for slotRetest), should take it from a best
// choice that means waiting wait seconds for a slot: while the queue lasts,
// whenever that is no longer than the longest delay the pool already
// expects of a request in flight (tail), so the pool's worst case is not
// made worse. On the fast/slow pool (a fast server's burst queue, p99 0.2 s,
// and slow servers 4× slower) a slow server's 0.4 s is longer than
// anything in flight, and the request queues; with speed classes the 4×
// server's 0.33 s is within what the queue at the others takes, and once
// it serves, its own requests in flight keep its slots in use.
func relievesQueue(alt, wait, tail float64) bool {
	return wait > 0 && alt <= tail*(1+nearTie)
}

// longestDelay is the longest delay now expected (sent to end, the work
// in flight replayed over the slots as now known) of a request in flight
// on the server that went there as the pool's choice: the tail the pool
// already has there. Priced again rather than as it was when sent: a fast
// server's queue priced while its slots were not yet known looks longer
// than it is, and would let a burst onto slow servers. A request sent to measure the server
// or re-measure it (priced at the speed believed, or not at all) was sent to
// learn, not because the pool accepts that delay; counting it would let one
// re-measurement of a slow server make the other slow servers' free slots
// look acceptable. Nor does a request that loads its model (or waits for a
// load): a load is paid once, and counted as the pool's usual delay it let
// requests onto slots never tried while two models settled (two-models: 10
// to 17 loads per 1,000 against 3).
func (sp *speed) longestDelay(maxParallel, inFlight int, now time.Time) float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if len(sp.tasks) == 0 || sp.all.promptN == 0 && sp.all.genN == 0 {
		return 0
	}
	tp, to := sp.serviceLocked(&job{})
	longest := 0.0
	sp.replayLocked(inFlight, sp.slotsLocked(maxParallel, now), tp+to, now, func(t *task, end float64) {
		if !t.measures && !t.cold {
			longest = max(longest, end+now.Sub(t.started).Seconds())
		}
	})
	return longest
}

// longestDelay is the server's longestDelay with this frontend's
// max_parallel and its requests in flight now.
func (b *backend) longestDelay(now time.Time) float64 {
	return b.srv.speed.longestDelay(b.cfg.MaxParallel, int(b.srv.inFlight.Load()), now)
}

// queueRelief is the server with a slot free and its model resident that
// takes the request from a best choice that means waiting bestWait for a
// slot, the cheapest of those where relievesQueue holds; nil if none. The
// tail is the longest delay expected in flight, or served, the p99 the
// pool's clients have had lately (servedDelays), if longer.
func queueRelief(observed []scored, bestWait, served float64, now time.Time) *backend {
	if bestWait <= 0 {
		return nil
	}
	tail := served
	for _, c := range observed {
		tail = max(tail, c.b.longestDelay(now))
	}
	var pick *backend
	cheapest := math.Inf(1)
	for _, c := range observed {
		if c.free && !c.cold && c.cost < cheapest && relievesQueue(c.cost, bestWait, tail) {
			pick, cheapest = c.b, c.cost
		}
	}
	return pick
}

// The delays clients have had lately, for the tail a queue's relief may
// reach (relievesQueue): the p99 of the requests that ended in the last
// servedWindow, the lower of its two halves' (p99). Where that p99 is
// already what a slower server takes (its requests sent to re-measure it,
// long answers, a queue), a slot free there serves a request waiting for
// a fast one without making the pool's worst case worse, and it adds the
// slot's throughput. Without it a server 3x slower kept its slots idle
// while the others queued, once it had no request of its own in flight to
// count as the tail, though the requests that re-measured it already made
// the p99 (slowdown-prompt: the same p99 as least_conn, 0.90-0.93 of its
// throughput).
const (
	servedWindow = 4 * time.Second
	servedMin    = 60
	servedRing   = 512
)

type servedDelays struct {
	mu     sync.Mutex
	at     [servedRing]time.Time
	delay  [servedRing]float64
	pos    int
	cached float64   // p99 as last computed
	when   time.Time // when; recomputed after servedFresh
}

// servedFresh is how long a computed p99 is reused.
const servedFresh = 50 * time.Millisecond

// note records a request that ended at now after d seconds since it came.
func (s *servedDelays) note(d float64, now time.Time) {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.at[s.pos], s.delay[s.pos] = now, d
	s.pos = (s.pos + 1) % servedRing
	s.mu.Unlock()
}

// p99 is the 99th percentile of the delays that ended within servedWindow
// of now (or, above servedRing of them, of the latest servedRing), the
// lower of the p99s of its older and newer half, each of at least
// servedMin requests (0 otherwise): the tail clients have had for a while,
// not the few slow answers of a moment (the requests in flight on a server
// as it slowed down, which end at its new speed before it is re-learned).
func (s *servedDelays) p99(now time.Time) float64 {
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.when.IsZero() && now.Sub(s.when) < servedFresh && !now.Before(s.when) {
		return s.cached
	}
	var buf [servedRing]float64
	list := buf[:0]
	for i := range servedRing { // oldest first
		k := (s.pos + i) % servedRing
		if at := s.at[k]; !at.IsZero() && now.Sub(at) < servedWindow {
			list = append(list, s.delay[k])
		}
	}
	s.when, s.cached = now, 0
	if half := len(list) / 2; half >= servedMin {
		s.cached = min(p99Of(list[:half]), p99Of(list[half:]))
	}
	return s.cached
}

// p99Of sorts list and returns its 99th percentile.
func p99Of(list []float64) float64 {
	slices.Sort(list)
	return list[len(list)-1-len(list)/100]
}
