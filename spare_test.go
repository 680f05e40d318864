package ollamaflow

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// measuring sends b its first request at at, as least_delay sends one.
func measuring(b *backend, j *job, at time.Time) *task {
	b.srv.speed.claimProbe(1, &b.srv.inFlight, at)
	b.srv.inFlight.Add(1)
	return b.begin(j, at)
}

func TestAFreshPoolSendsASpareRequestBesideEachMeasuringOne(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	a, b := testBackend("a", nil), testBackend("b", nil)
	pool := []*backend{a, b}
	measuring(a, &job{}, now)
	measuring(b, &job{}, now)

	// Nothing is measured: before spares, every request beyond the
	// measuring ones waited for the first answer, and on equal servers of
	// two slots half a burst took two answers' time.
	j := &job{}
	first := pickLeastDelay(h, pool, j)
	require.NotNil(t, first, "the slot beside a measuring request is raced, not left idle")
	assert.Same(t, first.srv, j.spareOn, "sent as a spare: moved if another server answers sooner")
	assert.ElementsMatch(t, names(pool), names(j.spareAmong))
	first.srv.inFlight.Add(1)
	first.begin(j, now)

	j2 := &job{}
	second := pickLeastDelay(h, pool, j2)
	require.NotNil(t, second)
	assert.NotSame(t, first, second, "one spare per server")
	second.srv.inFlight.Add(1)
	second.begin(j2, now)

	assert.Nil(t, pickLeastDelay(h, pool, &job{}), "a measuring request and a spare each: the rest waits for the first answer")

	// With max_parallel, measuring already takes every slot known.
	c, d := testBackend("c", func(c *Backend) { c.MaxParallel = 2 }), testBackend("d", func(c *Backend) { c.MaxParallel = 2 })
	for _, x := range []*backend{c, d} {
		for range 2 {
			measuring(x, &job{}, now)
		}
	}
	assert.Nil(t, pickLeastDelay(h, []*backend{c, d}, &job{}))

	// A server known to load the model first gives no answer to race.
	e, f := testBackend("e", nil), testBackend("f", nil)
	for _, x := range []*backend{e, f} {
		x.srv.models.Store(psWith("other"))
		measuring(x, &job{model: "other"}, now)
	}
	assert.Nil(t, pickLeastDelay(h, []*backend{e, f}, &job{model: "m"}))
}

func TestASpareIsOutrunOnceAnotherServerAnsweredItsMeasuringRequestSooner(t *testing.T) {
	clock := time.Unix(1000, 0)
	fast, slow := testBackend("fast", nil), testBackend("slow", nil)
	pool := []*backend{fast, slow}
	fastProbe := measuring(fast, &job{}, clock)
	probeJob := &job{promptChars: 400}
	slowProbe := measuring(slow, probeJob, clock)
	assert.True(t, outrunAt(slow, pool).IsZero(), "no answer yet: nothing to race")

	// fast answers its first request in 200 ms, 20 of them beyond its
	// total_duration (the network and the proxy).
	fastProbe.learn(final(180*ms, 0, 0, 10, 1), clock.Add(200*ms))
	fast.srv.inFlight.Add(-1)
	require.Equal(t, 20*ms, fast.srv.speed.lastSlack())
	service, ok := fast.srv.speed.serviceFor(probeJob)
	require.True(t, ok)
	require.Greater(t, service, 0.1)
	assert.Equal(t, clock.Add(time.Duration(service*1.1*float64(time.Second))+20*ms), outrunAt(slow, pool),
		"slow's measuring request, sent with fast's, outruns the spare beside it once it has run what it takes "+
			"fast, a tenth more, and fast's slack")
	assert.True(t, outrunAt(fast, pool).IsZero(), "fast is measured: its spare, if any, stays")

	// Once slow answers, it is measured: its spare stays.
	slowProbe.learn(final(180*ms, 0, 0, 10, 1), clock.Add(205*ms))
	assert.True(t, outrunAt(slow, pool).IsZero())
}

// On a fresh pool, a burst of four: each server gets a measuring request
// and a spare beside it. The slow server (one slot, holding its requests)
// has not answered when the fast one has: its spare moves to the fast one,
// before any byte of it reached the client, and is answered there.
func TestASpareRequestOnASlowerServerMovesToTheFirstToAnswer(t *testing.T) {
	tiny := []string{"tiny-llama"} // resident: no load to join
	fast := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 4, FirstByteDelay: 300 * time.Millisecond, Tokens: 2})
	defer fast.Close()
	slow := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 1, FirstByteDelay: 300 * time.Millisecond, Tokens: 2})
	defer slow.Close()
	loadCaddy(t, fmt.Sprintf("backend fast %s\nbackend slow %s", fast.URL, slow.URL))
	waitKnown(t, []*fakeollama.Server{fast, slow})
	slow.Hold(fakeollama.Completions...)
	defer slow.Release()

	type answer struct {
		status  int
		backend string
	}
	answers := make(chan answer, 4)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"question %d"}],"stream":false}`, i)
			res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(body))
			if err != nil {
				answers <- answer{0, err.Error()}
				return
			}
			res.Body.Close()
			answers <- answer{res.StatusCode, res.Header.Get("X-OllamaFlow-Backend")}
		}()
	}
	for range 3 {
		a := <-answers
		assert.Equal(t, http.StatusOK, a.status)
		assert.Equal(t, "fast", a.backend, "slow holds its answers: the spare sent there moved to fast")
	}
	slow.Release()
	a := <-answers
	wg.Wait()
	assert.Equal(t, http.StatusOK, a.status)
	assert.Equal(t, "slow", a.backend, "its measuring request stayed")
	assert.Equal(t, 2, slow.Count("/api/chat"), "slow was sent a spare beside its measuring request")
	assert.Equal(t, 3, fast.Count("/api/chat"))
}
