package ollamaflow

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func TestHistoryRingWrapsAndStaysBounded(t *testing.T) {
	var s flowStats
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const total = historySize + 25
	for i := range total {
		s.requests.Add(int64(i)) // a distinct rate per sample, to tell them apart
		s.sample(t0.Add(time.Duration(i)*historyInterval), int64(i), 0)
	}
	pts := s.points()
	require.Len(t, pts, historySize, "the ring holds historySize points, never more")
	assert.Equal(t, t0.Add(25*historyInterval), pts[0].Time, "the oldest points were overwritten")
	assert.Equal(t, t0.Add((total-1)*historyInterval), pts[len(pts)-1].Time)
	for i := 1; i < len(pts); i++ {
		require.True(t, pts[i].Time.After(pts[i-1].Time), "oldest first")
		assert.Equal(t, int64(25+i), pts[i].InFlight)
		assert.InDelta(t, float64(25+i)/historyInterval.Seconds(), pts[i].Requests, 1e-9)
	}
}

func TestHistorySampleRates(t *testing.T) {
	var s flowStats
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s.requests.Add(10)
	s.errors.Add(1)
	s.tokens.Add(50)
	s.sample(t0, 3, 2)
	p := s.points()[0]
	// The first sample counts from zero over one nominal interval.
	assert.InDelta(t, 10/historyInterval.Seconds(), p.Requests, 1e-9)
	assert.InDelta(t, 1/historyInterval.Seconds(), p.Errors, 1e-9)
	assert.InDelta(t, 50/historyInterval.Seconds(), p.Tokens, 1e-9)
	assert.Equal(t, int64(3), p.InFlight)
	assert.Equal(t, int64(2), p.Queued)
	assert.Zero(t, p.TTFBp50, "no first byte in the interval: no percentile")

	// 10 seconds later (a late tick): deltas over the real elapsed time.
	s.requests.Add(40)
	s.tokens.Add(1000)
	s.coldLoads.Add(2)
	for range 98 {
		s.observeTTFB(40 * time.Millisecond)
	}
	s.observeTTFB(20 * time.Second)
	s.observeTTFB(20 * time.Second)
	s.sample(t0.Add(10*time.Second), 0, 0)
	p = s.points()[1]
	assert.InDelta(t, 4.0, p.Requests, 1e-9)
	assert.InDelta(t, 100.0, p.Tokens, 1e-9)
	assert.Zero(t, p.Errors)
	assert.Equal(t, int64(2), p.ColdLoads, "cold loads are a count per interval")
	assert.Equal(t, 50.0, p.TTFBp50, "the bound of the bucket holding the median")
	assert.Equal(t, 30000.0, p.TTFBp99, "the two slow ones make the 99th percentile")

	// The histogram is per interval: the next one saw only a slow start.
	s.observeTTFB(6 * time.Minute) // past every bound
	s.sample(t0.Add(15*time.Second), 0, 0)
	p = s.points()[2]
	assert.Zero(t, p.Requests)
	assert.Zero(t, p.ColdLoads)
	assert.Equal(t, 300000.0, p.TTFBp50)

	// A clock stepping back adds no point.
	s.sample(t0, 0, 0)
	assert.Len(t, s.points(), 3)
}

// totalOf undoes the rates: each sample's rate times its interval (the
// first counts over one nominal interval, as sample does).
func totalOf(interval float64, pts []historyPoint, rate func(historyPoint) float64) float64 {
	var sum float64
	for i, p := range pts {
		d := interval
		if i > 0 {
			d = p.Time.Sub(pts[i-1].Time).Seconds()
		}
		sum += rate(p) * d
	}
	return sum
}

func TestAdminHistoryAfterKnownTraffic(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 4})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf("name history-test\nmodels tiny-llama\nbackend a %s", a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	reqs := func(p historyPoint) float64 { return p.Requests }
	toks := func(p historyPoint) float64 { return p.Tokens }
	errs := func(p historyPoint) float64 { return p.Errors }
	// The frontend's history is pooled by name and outlives this config (and
	// an earlier run of this test in the same process): count from here.
	sampleHistory(time.Now())
	_, raw := adminGet(t, "/ollamaflow/history")
	var before historyJSON
	require.NoError(t, json.Unmarshal(raw, &before))
	require.Len(t, before.Frontends, 1)
	feReqs0 := totalOf(before.IntervalSeconds, before.Frontends[0].Samples, reqs)
	feErrs0 := totalOf(before.IntervalSeconds, before.Frontends[0].Samples, errs)
	feToks0 := totalOf(before.IntervalSeconds, before.Frontends[0].Samples, toks)

	for range 3 {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
	}
	res, _ := post(t, "/api/chat", chatFor("made-up"))
	require.Equal(t, http.StatusForbidden, res.StatusCode)
	sampleHistory(time.Now())

	status, raw := adminGet(t, "/ollamaflow/history")
	require.Equal(t, http.StatusOK, status, string(raw))
	var h historyJSON
	require.NoError(t, json.Unmarshal(raw, &h))
	assert.Equal(t, historySize, h.Size)
	require.Len(t, h.Backends, 1)
	require.Len(t, h.Frontends, 1)
	be, fe := h.Backends[0], h.Frontends[0]
	assert.Equal(t, a.URL, be.URL)
	assert.Equal(t, []string{"a"}, be.Names)
	assert.Equal(t, "history-test", fe.Name)
	require.NotEmpty(t, be.Samples)
	require.NotEmpty(t, fe.Samples)

	assert.InDelta(t, 3.0, totalOf(h.IntervalSeconds, be.Samples, reqs), 1e-3, "the backend answered three")
	assert.InDelta(t, 4.0, totalOf(h.IntervalSeconds, fe.Samples, reqs)-feReqs0, 1e-3, "the frontend answered four, the refusal included")
	assert.InDelta(t, 0.0, totalOf(h.IntervalSeconds, fe.Samples, errs)-feErrs0, 1e-3, "a 403 is no error of ours")
	bt := totalOf(h.IntervalSeconds, be.Samples, toks)
	assert.GreaterOrEqual(t, bt, 12.0-1e-6, "three answers of 4 tokens, plus the prompts")
	assert.InDelta(t, bt, totalOf(h.IntervalSeconds, fe.Samples, toks)-feToks0, 1e-3)
	last := be.Samples[len(be.Samples)-1]
	assert.Zero(t, last.InFlight)
	var sawTTFB bool
	for _, p := range be.Samples {
		sawTTFB = sawTTFB || p.TTFBp50 > 0
	}
	assert.True(t, sawTTFB, "first bytes were timed")

	status, _ = adminPost(t, "/ollamaflow/history")
	assert.Equal(t, http.StatusMethodNotAllowed, status)

	// A reload keeps both histories: the server and the frontend name stay.
	loadCaddy(t, fmt.Sprintf("name history-test\nmodels tiny-llama\nretries 0\nbackend a %s", a.URL))
	status, raw = adminGet(t, "/ollamaflow/history")
	require.Equal(t, http.StatusOK, status, string(raw))
	var after historyJSON
	require.NoError(t, json.Unmarshal(raw, &after))
	require.Len(t, after.Backends, 1)
	require.Len(t, after.Frontends, 1)
	assert.InDelta(t, 3.0, totalOf(after.IntervalSeconds, after.Backends[0].Samples, reqs), 1e-3)
	assert.InDelta(t, 4.0, totalOf(after.IntervalSeconds, after.Frontends[0].Samples, reqs)-feReqs0, 1e-3)
}

func TestHistorySamplerStopsWithItsLastUser(t *testing.T) {
	started := make(chan (<-chan struct{}), 4)
	s := &sampler{run: func(stop <-chan struct{}) { started <- stop }}
	running := func() <-chan struct{} {
		select {
		case stop := <-started:
			return stop
		case <-time.After(10 * time.Second): // bounds a hang only
			t.Fatal("the sampler's goroutine did not start")
			return nil
		}
	}

	s.start()
	s.start()
	s.Lock()
	assert.Equal(t, 2, s.users)
	var first <-chan struct{} = s.stop
	s.Unlock()
	stop := running()
	require.Equal(t, first, stop, "the goroutine runs until the first user's stop channel closes")
	s.leave()
	select {
	case <-stop:
		t.Fatal("the sampler stopped while a user was left")
	default:
	}
	s.leave()
	select {
	case <-stop:
	default:
		t.Fatal("the sampler's stop channel is still open with no user left")
	}

	// A new first user starts a new goroutine with a new stop channel.
	s.start()
	assert.NotEqual(t, stop, running())
	s.leave()
}
