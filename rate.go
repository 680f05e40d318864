package ollamaflow

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// maxRequestsPerMinute bounds a backend's requests_per_minute, and with it
// the memory of a server's window: 8 bytes per request of the limit.
const maxRequestsPerMinute = 100000

// rateSpan is the window requests_per_minute counts in.
const rateSpan = time.Minute

// clock is time as the rate window sees it; tests drive a fake one.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}

// rateWindow is a server's requests_per_minute state. It lives on the
// pooled *server, not on a frontend's backend: the limit protects the
// server, so every frontend's requests on it count and a reload does not
// forget them, while each frontend compares the shared count with its own
// limit (as max_parallel does with in-flight requests).
//
// It remembers the start times of the latest requests in a ring as long
// as the largest limit asked of the server, so "fewer than n started in
// the last minute" is one look at the n-th latest start, and the moment
// the window admits again is that start plus a minute. It stays empty, and
// costs no lock, while no frontend limits the server.
type rateWindow struct {
	size   atomic.Int64 // len(starts), readable without the lock
	mu     sync.Mutex
	starts []int64 // Unix nanoseconds, a ring, oldest at next once filled
	next   int     // where the next start goes
	filled int     // starts recorded, at most len(starts)
	stop   func() bool
	wakeAt int64 // when the pending wake fires; 0: none pending
}

// growLocked makes room for limit starts, keeping those recorded in order.
func (w *rateWindow) growLocked(limit int) {
	if limit <= len(w.starts) {
		return
	}
	grown := make([]int64, limit)
	for k := range w.filled {
		grown[k] = w.starts[(w.next-w.filled+k+len(w.starts))%len(w.starts)]
	}
	w.starts, w.next = grown, w.filled
	w.size.Store(int64(limit))
}

// admitLocked reports whether a request may start at now under limit and,
// if not, when it may.
func (w *rateWindow) admitLocked(limit int, now int64) (bool, int64) {
	w.growLocked(limit)
	if w.filled < limit {
		return true, 0
	}
	i := (w.next - limit + len(w.starts)) % len(w.starts)
	until := w.starts[i] + int64(rateSpan)
	return now >= until, until
}

func (w *rateWindow) recordLocked(now int64) {
	w.starts[w.next] = now
	w.next = (w.next + 1) % len(w.starts)
	w.filled = min(w.filled+1, len(w.starts))
}

// startedSince counts the recorded starts after t (the admin API's view).
func (w *rateWindow) startedSince(t int64) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for k := 1; k <= w.filled; k++ {
		if w.starts[(w.next-k+len(w.starts))%len(w.starts)] <= t {
			break
		}
		n++
	}
	return n
}

func (s *server) clock() clock {
	if s.clk != nil {
		return s.clk
	}
	return realClock{}
}

// tryAcquire takes a request slot if the server has fewer than limit in
// flight (limit 0: no cap) and, with rpm > 0, fewer than rpm requests
// started in the last minute. The counts live on the shared server, so
// they span every handler and survive reloads.
func (s *server) tryAcquire(limit, rpm int) bool {
	if rpm <= 0 && s.rate.size.Load() == 0 {
		return s.takeSlot(limit)
	}
	now := s.clock().Now().UnixNano()
	s.rate.mu.Lock()
	defer s.rate.mu.Unlock()
	if rpm > 0 {
		if ok, at := s.rate.admitLocked(rpm, now); !ok {
			s.wakeAtLocked(at, now)
			return false
		}
	}
	if !s.takeSlot(limit) {
		return false
	}
	s.rate.recordLocked(now) // another frontend may limit the server
	return true
}

// rateAdmits reports whether a request may start on the server now under
// rpm; if not, the server's queues are woken when it may.
func (s *server) rateAdmits(rpm int) bool {
	if rpm <= 0 {
		return true
	}
	now := s.clock().Now().UnixNano()
	s.rate.mu.Lock()
	defer s.rate.mu.Unlock()
	ok, at := s.rate.admitLocked(rpm, now)
	if !ok {
		s.wakeAtLocked(at, now)
	}
	return ok
}

// wakeAtLocked makes the server wake its queues at at, when its window
// admits a request again: nothing else would, since no slot frees. One
// wake is pending at a time, the earliest asked for; a queue still
// refused then asks again. s.rate.mu must be held.
func (s *server) wakeAtLocked(at, now int64) {
	if s.rate.wakeAt != 0 && s.rate.wakeAt <= at {
		return
	}
	if s.rate.stop != nil {
		s.rate.stop()
	}
	s.rate.wakeAt = at
	s.rate.stop = s.clock().AfterFunc(time.Duration(at-now), s.rateWake)
}

func (s *server) rateWake() {
	defer func() {
		if rec := recover(); rec != nil {
			if st := s.settings.Load(); st != nil && st.logger != nil {
				st.logger.Error("panic in rate wake", zap.Any("panic", rec), zap.Stack("stack"))
			}
		}
	}()
	s.rate.mu.Lock()
	s.rate.wakeAt, s.rate.stop = 0, nil
	s.rate.mu.Unlock()
	s.wakeQueues()
}

// stopRateWake cancels a pending wake (the server is destroyed).
func (s *server) stopRateWake() {
	s.rate.mu.Lock()
	defer s.rate.mu.Unlock()
	if s.rate.stop != nil {
		s.rate.stop()
		s.rate.stop, s.rate.wakeAt = nil, 0
	}
}
