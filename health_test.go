package ollamaflow

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// probeTarget is a health endpoint whose answer the test controls.
type probeTarget struct {
	status atomic.Int32
	hits   atomic.Int32
	auth   atomic.Value
	srv    *httptest.Server
}

func newProbeTarget(t *testing.T) *probeTarget {
	p := &probeTarget{}
	p.status.Store(200)
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.hits.Add(1)
		p.auth.Store(r.Header.Get("Authorization") + "|" + r.URL.RawQuery)
		w.WriteHeader(int(p.status.Load()))
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func testSettings(logger *zap.Logger) *serverSettings {
	return &serverSettings{
		probePath: "/", probeMethod: http.MethodGet, expectStatus: 2,
		interval: 20 * time.Millisecond, timeout: time.Second,
		passes: 2, fails: 2, failThreshold: 3, logger: logger,
	}
}

func waitState(t *testing.T, s *server, want healthState) {
	t.Helper()
	require.Eventually(t, func() bool { return healthState(s.state.Load()) == want },
		5*time.Second, 5*time.Millisecond, "state never became %s", want)
}

func TestFirstProbeDecidesAtOnce(t *testing.T) {
	p := newProbeTarget(t)
	base, _ := url.Parse(p.srv.URL)
	st := testSettings(zap.NewNop())
	st.interval = time.Hour // only the immediate probe can run
	s := newServer(base, st)
	defer s.Destruct()
	waitState(t, s, stateHealthy)

	p.status.Store(500)
	s2 := newServer(base, st)
	defer s2.Destruct()
	waitState(t, s2, stateUnhealthy)
	assert.Contains(t, s2.lastErr, "status 500")
}

func TestProbeStreaksAndLogsOnce(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	p := newProbeTarget(t)
	base, _ := url.Parse(p.srv.URL)
	s := newServer(base, testSettings(zap.New(core)))
	defer s.Destruct()
	waitState(t, s, stateHealthy)

	p.status.Store(503)
	waitState(t, s, stateUnhealthy)
	p.status.Store(200)
	waitState(t, s, stateHealthy)
	// Let a few more passing probes run: they must not log again.
	hits := p.hits.Load()
	require.Eventually(t, func() bool { return p.hits.Load() >= hits+3 }, 5*time.Second, 5*time.Millisecond)

	ups := logs.FilterMessage("backend up").All()
	downs := logs.FilterMessage("backend down").All()
	require.Len(t, ups, 2, "first probe, then recovery")
	require.Len(t, downs, 1)
	assert.Equal(t, "first probe passed", ups[0].ContextMap()["reason"])
	assert.Contains(t, downs[0].ContextMap()["reason"], "2 consecutive probes failed")
	assert.Contains(t, downs[0].ContextMap()["reason"], "status 503")
	assert.Contains(t, ups[1].ContextMap()["reason"], "2 consecutive probes passed")
}

func TestPassiveFailuresMarkDownAndProbesBringBack(t *testing.T) {
	p := newProbeTarget(t)
	base, _ := url.Parse(p.srv.URL)
	st := testSettings(zap.NewNop())
	st.interval = 150 * time.Millisecond
	s := newServer(base, st)
	defer s.Destruct()
	waitState(t, s, stateHealthy)

	s.recordFailure("connection refused")
	s.recordFailure("status 502")
	s.recordSuccess() // a success resets the streak
	s.recordFailure("status 502")
	s.recordFailure("status 502")
	assert.True(t, s.healthy(), "only %d in a row so far", 2)
	s.recordFailure("status 503")
	assert.False(t, s.healthy(), "the third consecutive failure marks it down at once")
	assert.Contains(t, s.lastErr, "status 503")
	// The active checker, still passing, brings it back after health_passes.
	waitState(t, s, stateHealthy)
}

func TestProbeSendsCredentialsAndHonoursTimeout(t *testing.T) {
	p := newProbeTarget(t)
	base, _ := url.Parse(p.srv.URL)
	st := testSettings(zap.NewNop())
	st.query = "token=abc"
	st.header = http.Header{"Authorization": {"Bearer s3cret"}}
	s := newServer(base, st)
	defer s.Destruct()
	waitState(t, s, stateHealthy)
	assert.Equal(t, "Bearer s3cret|token=abc", p.auth.Load())

	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}))
	defer hang.Close()
	hbase, _ := url.Parse(hang.URL)
	hst := testSettings(zap.NewNop())
	hst.timeout = 50 * time.Millisecond
	hs := newServer(hbase, hst)
	defer hs.Destruct()
	waitState(t, hs, stateUnhealthy)
	assert.Contains(t, hs.lastErr, "no answer within 50ms")
}

func TestDestructStopsProbing(t *testing.T) {
	p := newProbeTarget(t)
	base, _ := url.Parse(p.srv.URL)
	s := newServer(base, testSettings(zap.NewNop()))
	waitState(t, s, stateHealthy)
	require.NoError(t, s.Destruct())
	time.Sleep(50 * time.Millisecond) // a request cancelled by Destruct may still reach the handler
	n := p.hits.Load()
	time.Sleep(100 * time.Millisecond)
	assert.Equal(t, n, p.hits.Load(), "no probe after Destruct")
}

func TestStatusMatches(t *testing.T) {
	assert.True(t, statusMatches(204, 2))
	assert.False(t, statusMatches(301, 2))
	assert.True(t, statusMatches(200, 200))
	assert.False(t, statusMatches(204, 200))
}

// A backend that redirects (a misconfigured proxy in front of it, or a
// hostile one) must not receive our secrets on the redirect's target:
// probes, discovery and pulls take a redirect as the answer.
func TestOwnRequestsDoNotFollowRedirects(t *testing.T) {
	var leaked atomic.Int32
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaked.Add(1)
		w.WriteHeader(http.StatusOK)
	}))
	defer elsewhere.Close()
	var redirected atomic.Int32
	redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		redirected.Add(1)
		// Same host, another port: Go's client would keep Authorization.
		http.Redirect(w, r, elsewhere.URL+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer redirecting.Close()

	base, _ := url.Parse(redirecting.URL)
	st := testSettings(zap.NewNop())
	st.header = http.Header{"Authorization": {"Bearer s3cret"}, "X-Api-Key": {"k3y"}}
	st.interval = time.Hour
	s := newServer(base, st)
	defer s.Destruct()

	waitState(t, s, stateUnhealthy) // the probe saw 307, not the 200 behind it
	assert.Contains(t, s.lastErr, "status 307")
	s.state.Store(int32(stateHealthy))
	err := s.refreshModels(context.Background(), 0)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "status 307")
	err = s.runPull(requiredModel{name: "tiny", key: "tiny:latest"}, &pullState{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "status 307")

	assert.GreaterOrEqual(t, redirected.Load(), int32(3), "probe, discovery and pull each reached the backend")
	assert.Zero(t, leaked.Load(), "nothing reached the redirect's target")
}
