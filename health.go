package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"
)

// servers holds the live state of every Ollama server named by any handler,
// keyed by normalised URL. A handler takes one reference per backend in
// Provision and gives it back in Cleanup; the server's goroutines stop when
// the last reference goes.
var servers = caddy.NewUsagePool()

// healthState is a server's health verdict.
type healthState int32

const (
	stateUnknown healthState = iota // not yet probed: counts as healthy
	stateHealthy
	stateUnhealthy
)

func (s healthState) String() string {
	switch s {
	case stateHealthy:
		return "healthy"
	case stateUnhealthy:
		return "unhealthy"
	default:
		return "unknown"
	}
}

// serverSettings is what the pooled server needs from the config. Each
// Provision that names the server builds a copy; the server adopts it only
// once that config has started (see adopt), so a config that fails to
// provision or start changes nothing, and the newest running config wins
// without restarting the server's goroutines.
type serverSettings struct {
	name          string // the backend's name in the config that last named the server
	probePath     string // health_uri
	probeMethod   string
	expectStatus  int
	interval      time.Duration
	timeout       time.Duration
	passes        int
	fails         int
	failThreshold int
	header        http.Header // bearer token and configured headers
	query         string      // appended to every URL on the server
	dialTimeout   time.Duration
	modelRefresh  time.Duration
	pullConc      int
	logger        *zap.Logger
	events        *caddyevents.App // of the config that last named the server
	ctx           caddy.Context    // the context events are emitted in
}

// server is the live state of one physical Ollama server, shared by every
// handler that names it and kept across config reloads.
type server struct {
	key  string // normalised URL, never carries credentials
	base *url.URL

	settings atomic.Pointer[serverSettings]
	state    atomic.Int32 // healthState
	inFlight atomic.Int64
	draining atomic.Bool // admin: no new requests, in-flight ones finish
	speed    speed       // observed service times, for least_delay
	// failStreak counts consecutive proxy failures (passive health).
	failStreak atomic.Int32
	// busyUntil (Unix nanoseconds) is when a server that answered 503
	// "server busy" is picked again while other candidates remain, unless
	// it has room sooner: busyLevel is how many of our requests it was
	// serving besides the refused one, and one of them finishing frees room.
	busyUntil atomic.Int64
	busyLevel atomic.Int64
	stats     flowStats // traffic counters and history (history.go)

	// Which config and which of its backends the settings came from, for
	// adopt; guarded by settingsMu.
	settingsMu     sync.Mutex
	settingsConfig any
	settingsRank   string

	mu         sync.Mutex
	passStreak int // consecutive passing probes
	probeFails int // consecutive failing probes
	since      time.Time
	lastProbe  time.Time
	lastErr    string

	// Queues (queue.go) of the frontends using the server, woken when a
	// slot frees or the server recovers or is undrained; queued counts the
	// requests waiting in them that could use the server, which newcomers
	// must not overtake.
	queuesMu sync.Mutex
	queues   map[*queue]struct{}
	queued   atomic.Int64

	// requests_per_minute (rate.go), and the clock it reads (nil: real).
	rate rateWindow
	clk  clock

	// Models (modelsync.go): the latest lists, replaced whole on refresh.
	models      atomic.Pointer[modelSnapshot]
	refreshMu   sync.Mutex   // guards the two below
	refreshing  *refreshCall // the read of the lists in progress, if any
	lastRefresh *refreshCall // the last read that ended, good or failed
	wake        chan struct{}

	// Required models and their pulls (modelsync.go), guarded by pullMu.
	pullMu   sync.Mutex
	required map[any][]requiredModel // by the handler that requires them
	pulls    map[string]*pullState   // by normalised model name

	transport *http.Transport // probes, discovery, management, and proxied requests to https servers
	lean      *leanPool       // proxied requests to http servers (backendconn.go); nil for https
	client    *http.Client
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup // every goroutine the server owns
}

// acquireServer returns the pooled server for base, creating and starting it
// with st if this is its first user. A server that already runs keeps its
// settings: st is the caller's to adopt once its config has started.
func acquireServer(base *url.URL, st *serverSettings) (*server, error) {
	key := base.String()
	val, _, err := servers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newServer(base, st), nil
	})
	if err != nil {
		return nil, err
	}
	return val.(*server), nil
}

// adopt makes st the server's settings, on behalf of config (an identity of
// the Caddy config, which has started) and of the backend ranked rank in
// it. A config that started later replaces the settings of an earlier
// one; within one config, when several frontends name the server, the
// lowest rank wins whatever the order Caddy provisions them in, so probes,
// discovery and pulls use one frontend's settings consistently.
func (s *server) adopt(st *serverSettings, config any, rank string) {
	s.settingsMu.Lock()
	defer s.settingsMu.Unlock()
	if s.settingsConfig == config && rank >= s.settingsRank {
		return
	}
	s.settingsConfig, s.settingsRank = config, rank
	s.settings.Store(st)
}

func newServer(base *url.URL, st *serverSettings) *server {
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{
		key:      base.String(),
		base:     base,
		since:    time.Now(),
		ctx:      ctx,
		cancel:   cancel,
		wake:     make(chan struct{}, 1),
		queues:   make(map[*queue]struct{}),
		required: make(map[any][]requiredModel),
		pulls:    make(map[string]*pullState),
	}
	s.speed.loadPrior = &poolLoadPrior
	s.settings.Store(st)
	dialTimeout := func() time.Duration {
		if d := s.settings.Load().dialTimeout; d > 0 {
			return d
		}
		return defaultDialTimeout
	}
	s.transport = newTransport(dialTimeout)
	if base.Scheme == "http" {
		s.lean = newLeanPool(base.Host, dialTimeout)
	}
	// A redirect is an answer, never followed: the request carries the
	// backend's secrets (bearer token, headers, query), and Go's client
	// would send most of them on to wherever the redirect points.
	s.client = &http.Client{Transport: s.transport, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	s.models.Store(&modelSnapshot{})
	s.goSafe("health checker", s.probeLoop)
	s.goSafe("model discovery", s.discoveryLoop)
	return s
}

// goSafe runs fn in a goroutine the server owns: Destruct waits for it,
// and a panic is logged instead of taking Caddy down.
func (s *server) goSafe(what string, fn func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			if rec := recover(); rec != nil {
				s.logger().Error("panic in "+what, zap.Any("panic", rec), zap.Stack("stack"))
			}
		}()
		fn()
	}()
}

// Destruct stops the server's goroutines; the pool calls it when the last
// handler using the server is cleaned up.
func (s *server) Destruct() error {
	s.cancel()
	s.stopRateWake()
	s.wg.Wait()
	s.transport.CloseIdleConnections()
	if s.lean != nil {
		s.lean.closeAll()
	}
	return nil
}

func (s *server) logger() *zap.Logger {
	st := s.settings.Load()
	return st.logger.Named("health").With(zap.String("backend", st.name), zap.String("url", s.key))
}

// healthy reports whether the server may receive requests as far as health
// goes; a server not yet probed counts as healthy.
func (s *server) healthy() bool {
	return healthState(s.state.Load()) != stateUnhealthy
}

// probeLoop probes at once, so a fresh config routes within one round trip,
// then every interval until the server is destroyed. The second probe
// comes after the server's own phase within the interval rather than a
// whole interval, so servers provisioned together (a config with a
// thousand backends) are probed spread over the interval from then on,
// not all at once every interval.
func (s *server) probeLoop() {
	s.probe()
	wait := probePhase(s.key, s.settings.Load().interval)
	for {
		if hook := probeWaitHook.Load(); hook != nil {
			(*hook)(s.key, wait)
		}
		timer := time.NewTimer(wait)
		select {
		case <-s.ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		s.probe()
		wait = s.settings.Load().interval
	}
}

// probeWaitHook, when set (tests), sees each wait the probe loops start:
// a fake clock that counts probes per part of the interval.
var probeWaitHook atomic.Pointer[func(key string, wait time.Duration)]

// probePhase is the wait before a server's second probe: a fraction of
// interval in (0, interval], fixed by the hash of its key, so phases are
// spread evenly over a pool and a server keeps its phase across restarts.
func probePhase(key string, interval time.Duration) time.Duration {
	frac := float64(mix64(fnv64(key))>>11) / (1 << 53) // uniform in [0, 1)
	return interval - time.Duration(frac*float64(interval))
}

// probe runs one active health check and records its verdict.
func (s *server) probe() {
	st := s.settings.Load()
	ctx, cancel := context.WithTimeout(s.ctx, st.timeout)
	defer cancel()
	err := s.check(ctx, st)
	if s.ctx.Err() != nil {
		return // shutting down: not a verdict on the server
	}
	s.recordProbe(err)
}

func (s *server) check(ctx context.Context, st *serverSettings) error {
	res, err := s.do(ctx, st.probeMethod, st.probePath, nil)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return fmt.Errorf("no answer within %s (health_timeout)", st.timeout)
		}
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	res.Body.Close()
	if !statusMatches(res.StatusCode, st.expectStatus) {
		return fmt.Errorf("answered status %d, want %s", res.StatusCode, statusExpectation(st.expectStatus))
	}
	return nil
}

// recordProbe applies one probe result: the first probe decides the state
// directly, later ones need health_passes / health_fails in a row.
func (s *server) recordProbe(err error) {
	st := s.settings.Load()
	s.mu.Lock()
	s.lastProbe = time.Now()
	cur := healthState(s.state.Load())
	var next healthState
	var reason string
	if err == nil {
		s.passStreak++
		s.probeFails = 0
		if cur == stateHealthy {
			// A healthy server that failed a few proxied requests (not
			// enough to open the breaker) is avoided by least_conn and
			// least_delay; a passing probe gives it a fresh start.
			s.failStreak.Store(0)
		}
		switch {
		case cur == stateUnknown:
			next, reason = stateHealthy, "first probe passed"
		case cur == stateUnhealthy && s.passStreak >= st.passes:
			next, reason = stateHealthy, fmt.Sprintf("%d consecutive probes passed", s.passStreak)
		}
	} else {
		s.lastErr = err.Error()
		s.probeFails++
		s.passStreak = 0
		switch {
		case cur == stateUnknown:
			next, reason = stateUnhealthy, "first probe failed: "+err.Error()
		case cur == stateHealthy && s.probeFails >= st.fails:
			next, reason = stateUnhealthy, fmt.Sprintf("%d consecutive probes failed, last: %s", s.probeFails, err)
		}
	}
	var emit func()
	if next != stateUnknown {
		emit = s.transitionLocked(cur, next, reason)
	}
	s.mu.Unlock()
	if emit != nil {
		emit()
	}
	switch next {
	case stateHealthy:
		s.wakeQueues() // requests queued for it need not wait for a release
	case stateUnhealthy:
		s.requeue()
	}
}

// failStatus reports whether an answer with status counts as the server's
// failure (fail_status).
func (b *backend) failStatus(status int) bool {
	for _, want := range b.cfg.FailStatus {
		if statusMatches(status, want) {
			return true
		}
	}
	return false
}

// backOff passes the server over for at most d while other candidates
// remain: it answered 503 "server busy", which is back-pressure, not a
// fault, so it neither counts towards the breaker nor resets its failure
// run. The refused request still holds its slot when this is called.
func (s *server) backOff(d time.Duration) {
	s.busyLevel.Store(s.inFlight.Load() - 1)
	until := time.Now().Add(d).UnixNano()
	s.busyUntil.Store(until)
	noteBackOff(until)
}

// backingOff reports whether the server is still sitting out a 503: until
// the back-off ends, or until one of the requests it was serving when it
// refused finishes (it has room again), whichever comes first. When our
// requests were not what filled it (another client of the server), only
// the time counts.
func (s *server) backingOff(now time.Time) bool {
	return now.UnixNano() < s.busyUntil.Load() && s.inFlight.Load() >= s.busyLevel.Load()
}

// recordSuccess notes a proxied request the server answered with a status
// outside fail_status (and other than 503).
func (s *server) recordSuccess() {
	if s.failStreak.Load() != 0 {
		s.failStreak.Store(0)
	}
}

// recordFailure notes a proxy failure (connection error, an answer in
// fail_status, a first-byte timeout, a broken or stalled stream). fail_threshold of them in a row mark the server unhealthy at
// once; the active checker brings it back.
func (s *server) recordFailure(cause string) {
	n := int(s.failStreak.Add(1))
	st := s.settings.Load()
	if n < st.failThreshold {
		return
	}
	s.mu.Lock()
	s.lastErr = cause
	cur := healthState(s.state.Load())
	var emit func()
	if cur != stateUnhealthy {
		s.passStreak = 0
		emit = s.transitionLocked(cur, stateUnhealthy, fmt.Sprintf("%d consecutive proxy failures, last: %s", n, cause))
	}
	s.mu.Unlock()
	if emit != nil {
		emit()
	}
}

// transitionLocked changes the state and logs the transition once. It
// returns the emission of the matching Caddy event, for the caller to run
// once s.mu is released (event handlers run synchronously). s.mu must be
// held.
func (s *server) transitionLocked(from, to healthState, reason string) func() {
	s.state.Store(int32(to))
	servingGeneration.Add(1) // kept candidate lists (largepool.go) are stale
	s.since = time.Now()
	if to == stateHealthy {
		s.failStreak.Store(0)
		s.poke()            // read its model lists at once
		modelListsChanged() // a miss remembered while it was down may be on it
	}
	msg, event := "backend up", "ollamaflow.backend_up"
	if to == stateUnhealthy {
		msg, event = "backend down", "ollamaflow.backend_down"
	}
	s.logger().Info(msg,
		zap.String("from", from.String()),
		zap.String("to", to.String()),
		zap.String("reason", reason))
	st := s.settings.Load()
	if st.events == nil {
		return nil
	}
	data := map[string]any{"backend": st.name, "url": s.key, "reason": reason, "from": from.String(), "to": to.String()}
	return func() { s.emit(event, data) }
}

// emit sends an event through the events app of the running config. The
// first probe runs while a config is still being provisioned, before its
// events app has started (and subscribed its handlers), so an event that
// early waits, briefly, for its config to become the running one.
func (s *server) emit(event string, data map[string]any) {
	if st := s.settings.Load(); eventsRunning(st.events) {
		st.events.Emit(st.ctx, event, data)
		return
	}
	s.goSafe("event", func() {
		for range 250 { // 5 s
			select {
			case <-s.ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
			if st := s.settings.Load(); eventsRunning(st.events) {
				st.events.Emit(st.ctx, event, data)
				return
			}
		}
	})
}

// eventsRunning reports whether app belongs to the config Caddy is running.
func eventsRunning(app *caddyevents.App) bool {
	v, err := caddy.ActiveContext().AppIfConfigured("events")
	return err == nil && v == app
}

// setDraining turns drain on or off. A draining server takes no new
// requests; those in flight finish. The flag lives on the pooled server, so
// it survives reloads that keep the server.
func (s *server) setDraining(on bool) {
	if s.draining.Swap(on) == on {
		return
	}
	servingGeneration.Add(1) // kept candidate lists (largepool.go) are stale
	msg := "backend draining"
	if !on {
		msg = "backend undrained"
		s.wakeQueues() // its slots are usable again
	} else {
		s.requeue()
	}
	s.logger().Info(msg, zap.Int64("in_flight", s.inFlight.Load()))
}

// takeSlot takes a request slot if the server has fewer than limit in
// flight (limit 0: no cap); see tryAcquire (rate.go).
func (s *server) takeSlot(limit int) bool {
	if limit <= 0 {
		s.inFlight.Add(1)
		return true
	}
	for {
		n := s.inFlight.Load()
		if n >= int64(limit) {
			return false
		}
		if s.inFlight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// release gives a slot back and hands it to a queued request, if any
// frontend has one waiting for this server.
func (s *server) release() {
	s.inFlight.Add(-1)
	s.wakeQueues()
}

// wakeQueues lets every queue with requests waiting for the server hand
// them its free slots.
func (s *server) wakeQueues() {
	s.eachWaitingQueue(func(q *queue) { q.dispatchFor(s) })
}

// requeue offers every waiter of the queues that wait for the server to
// all their servers, once it can serve no more: when it was the last
// usable server of a lower SRV priority, those of the next one serve the
// waiters now instead of when one of theirs frees a slot.
func (s *server) requeue() {
	s.eachWaitingQueue((*queue).dispatchAll)
}

// eachWaitingQueue calls fn for every queue with requests waiting for the
// server, outside queuesMu (dispatching takes the queue's own lock).
func (s *server) eachWaitingQueue(fn func(*queue)) {
	if s.queued.Load() == 0 {
		return
	}
	var buf [8]*queue
	qs := buf[:0]
	s.queuesMu.Lock()
	for q := range s.queues {
		qs = append(qs, q)
	}
	s.queuesMu.Unlock()
	for _, q := range qs {
		fn(q)
	}
}

func (s *server) addQueue(q *queue) {
	s.queuesMu.Lock()
	s.queues[q] = struct{}{}
	s.queuesMu.Unlock()
}

func (s *server) removeQueue(q *queue) {
	s.queuesMu.Lock()
	delete(s.queues, q)
	s.queuesMu.Unlock()
}

// statusMatches reports whether code meets want: a full code, or a class
// digit (2 means any 2xx).
func statusMatches(code, want int) bool {
	if want < 10 {
		return code/100 == want
	}
	return code == want
}

func statusExpectation(want int) string {
	if want < 10 {
		return fmt.Sprintf("%dxx", want)
	}
	return fmt.Sprint(want)
}

// redactURLError strips the URL from a *url.Error, whose query may carry a
// configured token.
func redactURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

// backendErr is a failed request to a backend as a client may read it: in
// words, without the addresses (internal) and URLs (a configured token)
// the network's errors carry. The error itself stays for errors.Is and
// the logs (redacted).
type backendErr struct {
	words string
	err   error
}

func (e *backendErr) Error() string { return e.words }
func (e *backendErr) Unwrap() error { return e.err }

// inWords wraps err, a backend request's failure, as a backendErr.
func inWords(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(*backendErr); ok {
		return err
	}
	return &backendErr{words: failureInWords(err), err: err}
}

// failureInWords describes why a request to a backend failed before its
// answer, without an address.
func failureInWords(err error) string {
	var dns *net.DNSError
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "it did not answer in time"
	case errors.As(err, &dns):
		return "its host name did not resolve"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "the connection was refused"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "its address is unreachable"
	case errors.Is(err, syscall.ECONNRESET):
		return "the connection was reset"
	case errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNABORTED):
		return "the connection broke"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "the connection closed before an answer"
	case errors.Is(err, errLeanHeaderTooLarge):
		return "its answer's headers were too large"
	case errors.Is(err, errLeanSwitching):
		return "it switched protocols unasked"
	}
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		return "it did not answer in time"
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return "connecting to it failed"
	}
	return "its answer could not be read"
}
