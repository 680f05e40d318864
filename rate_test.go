package ollamaflow

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeClock is a clock the test moves; timers fire, synchronously, when
// it is moved past them.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at            time.Time
	f             func()
	stopped, done bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !t.stopped && !t.done
		t.stopped = true
		return was
	}
}

// pending is the earliest time a live timer waits for, zero if none.
func (c *fakeClock) pending() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	var at time.Time
	for _, t := range c.timers {
		if !t.stopped && !t.done && (at.IsZero() || t.at.Before(at)) {
			at = t.at
		}
	}
	return at
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	for _, t := range c.timers {
		if !t.stopped && !t.done && !t.at.After(c.now) {
			t.done = true
			due = append(due, t)
		}
	}
	c.mu.Unlock()
	for _, t := range due {
		t.f()
	}
}

func ratedBackend(name string, rpm int, clk clock) *backend {
	b := testBackend(name, func(c *Backend) { c.RequestsPerMinute = rpm })
	b.srv.clk = clk
	return b
}

func TestRateWindowAdmitsNPerMinute(t *testing.T) {
	clk := newFakeClock()
	a := ratedBackend("a", 3, clk)
	for i := range 3 {
		require.True(t, a.tryAcquire(), "start %d of 3", i+1)
		a.srv.inFlight.Add(-1) // each finishes at once: only the rate limits
		clk.advance(10 * time.Second)
	}
	// Three started at 0, 10 and 20 s; at 30 s a fourth must wait until
	// the first leaves the window, at 60 s.
	assert.False(t, a.hasRoom(), "at its rate")
	assert.False(t, a.tryAcquire())
	assert.Equal(t, time.Unix(1_700_000_060, 0), clk.pending(), "the queues are woken when the window admits again")
	clk.advance(29 * time.Second)
	assert.False(t, a.hasRoom(), "59 s: still three in the last minute")
	clk.advance(time.Second)
	assert.True(t, a.hasRoom(), "60 s: the first start left the window")
	require.True(t, a.tryAcquire())
	assert.False(t, a.tryAcquire(), "and only one place came back")
	assert.Equal(t, 3, a.srv.rate.startedSince(clk.Now().Add(-rateSpan).UnixNano()))
}

func TestRateWindowIsTheServersAcrossFrontends(t *testing.T) {
	clk := newFakeClock()
	limited := ratedBackend("a", 4, clk)
	// Another frontend's view of the same server, with no limit of its own.
	cfg := &Backend{Name: "a2", URL: "127.0.0.1:1"}
	require.NoError(t, cfg.provision())
	other := newBackendView(cfg, limited.srv.base)
	other.srv = limited.srv
	assert.True(t, limited.tryAcquire())
	for range 3 {
		assert.True(t, other.tryAcquire(), "the unlimited frontend is not refused")
	}
	assert.False(t, limited.hasRoom(), "but its requests count for the limited one")
	// A limit raised by a reload keeps what was counted.
	bigger := ratedBackend("a3", 6, clk)
	bigger.srv = limited.srv
	assert.True(t, bigger.tryAcquire(), "the fifth of 6")
	assert.True(t, bigger.tryAcquire(), "the sixth of 6")
	assert.False(t, bigger.tryAcquire(), "a seventh")
	assert.Equal(t, 6, limited.srv.rate.startedSince(clk.Now().Add(-rateSpan).UnixNano()))
}

func TestRateLimitedBackendIsSkippedAndTheQueueWokenWhenItAdmits(t *testing.T) {
	clk := newFakeClock()
	a := ratedBackend("a", 2, clk)
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 1 })
	h := queueHandler(pickFirst, a, b)
	a.srv.clk = clk // queueHandler leaves it
	cands := []*backend{a, b}
	assert.Same(t, a, h.acquire(cands, &job{}))
	assert.Same(t, a, h.acquire(cands, &job{}))
	assert.Same(t, b, h.acquire(cands, &job{}), "a at its rate is skipped like one at its cap")
	assert.Nil(t, h.acquire(cands, &job{}), "both full: the request queues")

	out := make(chan served, 2)
	enqueue(t, context.Background(), h, 1, "c1", cands, out)
	enqueue(t, context.Background(), h, 2, "c2", cands, out)
	// Requests finishing on a free nothing: only its rate holds it.
	a.srv.release()
	a.srv.release()
	assert.Equal(t, 2, h.queue.length())
	clk.advance(rateSpan)
	// The window admits two again: both waiters get a (together, so
	// in whichever order their goroutines report).
	ids := map[int]bool{}
	for range 2 {
		s := <-out
		require.NoError(t, s.err)
		assert.Same(t, a, s.b)
		ids[s.id] = true
	}
	assert.Equal(t, map[int]bool{1: true, 2: true}, ids)
	assert.Zero(t, h.queue.length())
	assert.Zero(t, a.srv.queued.Load())
}

func TestRateWakeStopsWithTheServer(t *testing.T) {
	clk := newFakeClock()
	a := ratedBackend("a", 1, clk)
	require.True(t, a.tryAcquire())
	assert.False(t, a.hasRoom())
	require.False(t, clk.pending().IsZero())
	a.srv.stopRateWake()
	assert.True(t, clk.pending().IsZero(), "no wake outlives the server")
}

func TestRequestsPerMinuteOption(t *testing.T) {
	d := caddyfile.NewTestDispenser("backend gpu1 10.0.0.5 {\n\trequests_per_minute 120\n\tmax_parallel 2\n}")
	var b Backend
	require.NoError(t, b.UnmarshalCaddyfile(d))
	assert.Equal(t, 120, b.RequestsPerMinute)
	require.NoError(t, b.provision())

	for _, tc := range []struct{ in, want string }{
		{"requests_per_minute -1", "requests_per_minute: must not be negative, got -1"},
		{"requests_per_minute lots", "requests_per_minute: want an integer, got 'lots'"},
		{"requests_per_minute", "requests_per_minute: want exactly one argument"},
	} {
		var b Backend
		err := b.UnmarshalCaddyfile(caddyfile.NewTestDispenser("backend a localhost {\n\t" + tc.in + "\n}"))
		if assert.Error(t, err, tc.in) {
			assert.Contains(t, err.Error(), tc.want)
		}
	}
	for rpm, want := range map[int]string{-5: "requests_per_minute: must not be negative", maxRequestsPerMinute + 1: "requests_per_minute: at most 100000"} {
		b := Backend{Name: "a", URL: "localhost", RequestsPerMinute: rpm}
		assert.ErrorContains(t, b.provision(), want)
	}
}
