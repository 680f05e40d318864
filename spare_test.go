package ollamaflow

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
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

	// A measuring request chosen but not yet in flight (its attempt has
	// not taken the slot) has a spare beside it all the same.
	g, k := testBackend("g", nil), testBackend("k", nil)
	for _, x := range []*backend{g, k} {
		require.True(t, x.srv.speed.claimProbe(1, &x.srv.inFlight, now))
	}
	claimed := &job{}
	spare := pickLeastDelay(h, []*backend{g, k}, claimed)
	require.NotNil(t, spare, "a spare beside a measuring request claimed")
	assert.Same(t, spare.srv, claimed.spareOn)

	// Measuring requests that took their slots (takeOrHold), their attempts
	// not begun: each counts once, and a spare goes beside each.
	h.policy = pickLeastDelay
	m, n := testBackend("m", nil), testBackend("n", nil)
	fresh := []*backend{m, n}
	var took []*backend
	for range 4 {
		b, _ := h.takeOrHold(fresh, &job{})
		require.NotNil(t, b, "two measuring requests, then a spare beside each")
		took = append(took, b)
	}
	assert.ElementsMatch(t, []*backend{m, n, m, n}, took)
	rest, _ := h.takeOrHold(fresh, &job{})
	assert.Nil(t, rest, "a measuring request and a spare each: the rest waits for the first answer")

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

// A spare goes beside the measuring request sent last: one still
// unanswered after t says its server takes at least t. Requests arriving
// every 33 ms at a fresh pool of a fast server of four slots and two slow
// ones of one sent the first two to measure the slow ones and the third
// fast; the fourth, a spare beside a slow server (least conn: all alike), moved
// to fast only once that server had run longer than fast's answer, and
// took 0.27 s against 0.1 (open-loop: p99 0.27 s, 0.14 s beside the
// newest measuring request).
func TestASpareGoesBesideTheMeasuringRequestSentLast(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	now := time.Now()
	slow2, slow1, fast := testBackend("slow2", nil), testBackend("slow1", nil), testBackend("fast", nil)
	pool := []*backend{slow2, slow1, fast}
	measuring(slow2, &job{}, now)
	measuring(slow1, &job{}, now.Add(33*ms))
	measuring(fast, &job{}, now.Add(67*ms))

	at := now.Add(101 * ms)
	assert.Same(t, fast, h.claimSpare(pool, &job{}, at), "fast has run 34 ms unanswered, slow1 68, slow2 101")
	assert.Same(t, slow1, h.claimSpare(pool, &job{}, at), "fast has its spare: the next newest")
	assert.Same(t, slow2, h.claimSpare(pool, &job{}, at))
	assert.Nil(t, h.claimSpare(pool, &job{}, at), "a measuring request and a spare each")
}

// A server offered alone is taken only when it is all there is. A newcomer
// is offered the servers no queued request waits for, and those counts
// move one server at a time as a waiter joins or leaves: a burst's fourth
// request, offered only the server that had its measuring request and a
// spare, went there while the other had room for its spare (about one
// burst in thirty under the race detector).
func TestALoneOfferIsNotTakenWhileAnotherCandidateHasRoom(t *testing.T) {
	h := &Handler{policy: pickLeastDelay}
	h.queue = newQueue(h)
	now := time.Now()
	fast, slow := testBackend("fast", nil), testBackend("slow", nil)
	measuring(fast, &job{}, now)
	measuring(slow, &job{}, now)
	spare := &job{cands: []*backend{fast, slow}}
	require.Same(t, fast, pickLeastDelay(h, []*backend{fast}, spare), "the spare beside fast's measuring request")
	fast.srv.inFlight.Add(1)
	fast.begin(spare, now)

	assert.Nil(t, pickLeastDelay(h, []*backend{fast}, &job{cands: []*backend{fast, slow}}),
		"slow has room: the request waits for an offer of it (or for fast's first answer)")
	got, _ := h.takeOrHold([]*backend{fast, slow}, &job{cands: []*backend{fast, slow}})
	assert.Same(t, slow, got, "offered both, it races beside slow's measuring request")

	assert.Same(t, fast, pickLeastDelay(h, []*backend{fast}, &job{cands: []*backend{fast}}),
		"offered all there is: nothing to wait for")
	slow.srv.draining.Store(true)
	assert.Same(t, fast, pickLeastDelay(h, []*backend{fast}, &job{cands: []*backend{fast, slow}}),
		"the other candidate has no room: nothing to wait for")
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
//
// All four clients once timed out here (30 s, status 0, in a full CI run;
// never reproduced): the wait for the move fails within 5 s with what the
// proxy held of both servers, and a failed answer says the client's error.
func TestASpareRequestOnASlowerServerMovesToTheFirstToAnswer(t *testing.T) {
	fast, slow, answers, wg := placedBurst(t, "", false, "/api/chat")
	movedTo(t, fast, slow, "/api/chat", 3)
	for range 3 {
		a := <-answers
		assert.Equal(t, http.StatusOK, a.status, a.body)
		assert.Equal(t, "fast", a.backend, "slow holds its answers: the spare sent there moved to fast")
	}
	slow.Release()
	a := <-answers
	wg.Wait()
	assert.Equal(t, http.StatusOK, a.status, a.body)
	assert.Equal(t, "slow", a.backend, "its measuring request stayed")
	assert.Equal(t, 2, slow.Count("/api/chat"), "slow was sent a spare beside its measuring request")
	assert.Equal(t, 3, fast.Count("/api/chat"))
}

// burstAnswer is what a client of burst got.
type burstAnswer struct {
	status  int
	backend string
	route   string
	body    string
}

// burst sends n chat requests at once to path, each its own first
// message, and returns their answers as they come.
func burst(n int, stream bool, path string) (chan burstAnswer, *sync.WaitGroup) {
	answers := make(chan burstAnswer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			body := fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"question %d"}],"stream":%v`, i, stream)
			if stream && strings.HasPrefix(path, "/v1/") {
				body += `,"stream_options":{"include_usage":true}` // the token counts that measure a server
			}
			body += "}"
			res, err := client.Post(siteURL+path, "application/json", strings.NewReader(body))
			if err != nil {
				answers <- burstAnswer{body: err.Error()}
				return
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			answers <- burstAnswer{res.StatusCode, res.Header.Get("X-OllamaFlow-Backend"), res.Header.Get("X-OllamaFlow-Route"), string(b)}
		})
	}
	return answers, &wg
}

// placedBurst serves a fresh fastAndSlow behind the proxy (with the extra
// frontend options given, both servers' lists read) and sends it a burst of four, released once
// each server has its measuring request and a spare (see heldBurst).
func placedBurst(t *testing.T, extra string, stream bool, path string) (fast, slow *fakeollama.Server, answers chan burstAnswer, wg *sync.WaitGroup) {
	t.Helper()
	fast, slow, answers, wg = heldBurst(t, extra, stream, path)
	fast.Release()
	return fast, slow, answers, wg
}

// heldBurst is placedBurst with fast still holding its answers: the
// caller changes what it must before fast's first answer, then releases.
// fast holds them however slowly a loaded machine starts the clients (the
// fourth, arriving after fast's first answer, was sent to fast and slow
// had no spare to move). A burst placed otherwise (three on fast, one on
// slow) is not what these tests are about: it is let finish, logged, and
// sent again to fresh servers, three times at most. Two causes were
// traced. A newcomer offered fast alone took it while slow had room
// (roomElsewhere; TestALoneOfferIsNotTakenWhileAnotherCandidateHasRoom),
// about one burst in thirty under the race detector, none in 170 since.
// And a machine stalled for bootstrapHold before the fourth was chosen
// (once in CI): least_conn placed it on slow, beside the measuring
// request but as no spare, and it stayed there; a burst that took as long
// to arrive is sent again too. A cause not seen yet costs a second burst,
// not a red run.
func heldBurst(t *testing.T, extra string, stream bool, path string) (fast, slow *fakeollama.Server, answers chan burstAnswer, wg *sync.WaitGroup) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		fast, slow = fastAndSlow(t)
		loadCaddy(t, fmt.Sprintf("backend fast %s\nbackend slow %s\n%s", fast.URL, slow.URL, extra))
		waitKnown(t, []*fakeollama.Server{fast, slow})
		fast.Hold(fakeollama.Completions...)
		t.Cleanup(fast.Release)
		sent := time.Now()
		answers, wg = burst(4, stream, path)
		deadline := sent.Add(5 * time.Second)
		for fast.Count(path)+slow.Count(path) < 4 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		took := time.Since(sent)
		if fast.Count(path) == 2 && slow.Count(path) == 2 && took < bootstrapHold {
			return fast, slow, answers, wg
		}
		if attempt == 3 {
			t.Fatalf("a measuring request and a spare on each within %v: fast %d, slow %d after %v", bootstrapHold, fast.Count(path), slow.Count(path), took)
		}
		t.Logf("burst placed fast %d, slow %d after %v: again on fresh servers", fast.Count(path), slow.Count(path), took)
		fast.Release()
		slow.Release()
		wg.Wait()
	}
}

// allAnswered waits for every client of a burst and asserts each was
// answered 200.
func allAnswered(t *testing.T, answers chan burstAnswer, wg *sync.WaitGroup) {
	t.Helper()
	wg.Wait()
	close(answers)
	for a := range answers {
		assert.Equal(t, http.StatusOK, a.status, "backend %s: %s", a.backend, a.body)
	}
}

// fastAndSlow are two fresh servers of one speed, a wide one and one with
// a single slot that holds its answers until released.
func fastAndSlow(t *testing.T) (fast, slow *fakeollama.Server) {
	tiny := []string{"tiny-llama"}
	fast = fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 4, FirstByteDelay: 300 * time.Millisecond, Tokens: 3, TokenGap: 10 * time.Millisecond})
	t.Cleanup(fast.Close)
	slow = fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 1, FirstByteDelay: 300 * time.Millisecond, Tokens: 3})
	t.Cleanup(slow.Close)
	slow.Hold(fakeollama.Completions...)
	t.Cleanup(slow.Release)
	return fast, slow
}

// arrived waits until the fake has received n requests on path.
func arrived(t *testing.T, f *fakeollama.Server, path string, n int) {
	t.Helper()
	require.Eventually(t, func() bool { return f.Count(path) >= n }, 5*time.Second, 5*time.Millisecond)
}

// movedTo is arrived for a spare moving from slow to fast: on a timeout
// it fails with what the proxy held of both servers then (this wait
// timed out in two local CI runs, never since; the state says which
// rule kept the spare where it was).
func movedTo(t *testing.T, fast, slow *fakeollama.Server, path string, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for fast.Count(path) < n {
		if time.Now().After(deadline) {
			t.Fatalf("fast received %d of %d on %s within 5 s (slow %d); fast: %s; slow: %s",
				fast.Count(path), n, path, slow.Count(path), speedState(pooled(t, fast.URL)), speedState(pooled(t, slow.URL)))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// speedState is what the proxy knows of s, for a test's failure message.
func speedState(s *server) string {
	now := time.Now()
	sp := &s.speed
	d, ok := sp.estimate(&job{}, 0, int(s.inFlight.Load()), false, now)
	probing, began := sp.probeTimes()
	sp.mu.Lock()
	defer sp.mu.Unlock()
	var tasks []string
	for _, tk := range sp.tasks {
		role := "plain"
		switch {
		case tk.job == nil:
		case tk.job.measureOn == s:
			role = "measuring"
		case tk.job.spareOn == s:
			role = "spare"
		}
		if tk.job != nil && tk.job.spareAmong != nil {
			role += fmt.Sprintf(" among %v", names(tk.job.spareAmong))
		}
		tasks = append(tasks, fmt.Sprintf("#%d %s sent %v ago, work %.3f, due in %v", tk.id, role, now.Sub(tk.started), tk.work, tk.finish.Sub(now)))
	}
	probe := "not being measured"
	if !probing.IsZero() {
		probe = fmt.Sprintf("measuring request sent %v ago (answer began %v)", now.Sub(probing), !began.IsZero())
	}
	return fmt.Sprintf("in flight %d %v; measured %v, %s, slots seen %d-%d; estimate %+v (%v); healthy %v, draining %v",
		s.inFlight.Load(), tasks, sp.measured.Load(), probe, sp.slotsLo, sp.slotsHi, d, ok, s.healthy(), s.draining.Load())
}

// A move is no attempt: the server the spare left stays a candidate for
// the request's retries. Here the server it moved to answers 503 "server
// busy" from then on, and the request is retried on the slow server it
// left (a move that took its server out of the candidates left it none).
func TestAMovedSpareMayStillBeRetriedOnTheServerItLeft(t *testing.T) {
	fast, slow, answers, wg := heldBurst(t, "", false, "/api/chat") // a measuring request and a spare on each
	fast.FailWith(http.StatusServiceUnavailable, fakeollama.ServerBusy, fakeollama.Completions...)
	fast.Release()                   // the two it holds came before the fault: they are answered
	arrived(t, fast, "/api/chat", 3) // the spare moved from slow, or a request held for the first answer
	time.Sleep(300 * time.Millisecond)
	slow.Release()
	allAnswered(t, answers, wg)
}

// The server that answered first is drained before the spare on the slow
// server would move to it: the spare stays where it is (a drained server
// outruns nothing), and nothing waits for the drained server.
func TestASpareIsNotMovedToAServerThatCannotServe(t *testing.T) {
	fast, slow, answers, wg := heldBurst(t, "queue_timeout 3s", false, "/api/chat")
	s := pooled(t, fast.URL)
	s.draining.Store(true)
	defer s.draining.Store(false)
	fast.Release()
	time.Sleep(800 * time.Millisecond) // fast has answered; the spare would have moved
	slow.Release()
	allAnswered(t, answers, wg)
	assert.Equal(t, 2, fast.Count("/api/chat"), "nothing more was sent to the drained server")
}

// A retry's attempt moved as a spare counts the retry once.
func TestAMoveIsNoRetry(t *testing.T) {
	tiny := []string{"tiny-llama"}
	bad := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 4, Tokens: 2})
	defer bad.Close()
	bad.FailWith(http.StatusBadGateway, "bad gateway", fakeollama.Completions...)
	fast, slow := fastAndSlow(t)
	// slow weighs 2: least_conn sends the retry's spare there (1/2 < 1/1).
	loadCaddy(t, fmt.Sprintf("name spare-retries\nbackend bad %s\nbackend fast %s\nbackend slow %s {\n weight 2\n}", bad.URL, fast.URL, slow.URL))
	waitKnown(t, []*fakeollama.Server{bad, fast, slow})
	const metric = `ollamaflow_retries_total{backend="bad",frontend="spare-retries"}`
	before := max(scrape(t, metric), 0)

	answers, wg := burst(3, false, "/api/chat")
	time.Sleep(900 * time.Millisecond)
	slow.Release()
	allAnswered(t, answers, wg)
	require.Equal(t, 1, bad.Count("/api/chat"), "one request failed on bad")
	assert.Equal(t, 2, slow.Count("/api/chat"), "slow had a measuring request and the retry's spare")
	assert.Equal(t, before+1, scrape(t, metric), "one failure on bad, one retry")
}

// A moved request keeps the route it was given first: four first
// messages of new conversations are placed by the policy, none reported
// as an affinity overflow of its own record on the server it left.
func TestAMovedRequestKeepsItsRoute(t *testing.T) {
	fast, slow, answers, wg := placedBurst(t, "conversation_affinity", false, "/api/chat")
	arrived(t, fast, "/api/chat", 3)
	slow.Release()
	wg.Wait()
	close(answers)
	for a := range answers {
		assert.Equal(t, "policy", a.route, "backend %s", a.backend)
	}
	assert.Equal(t, 2, slow.Count("/api/chat"), "slow had a spare, which moved")
}

// A streamed request moved as a spare reaches its client once: one
// stream, whole, of the server it moved to.
func TestAMovedStreamIsWhole(t *testing.T) {
	for _, path := range []string{"/api/chat", "/v1/chat/completions"} {
		t.Run(path, func(t *testing.T) {
			fast, slow, answers, wg := placedBurst(t, "", true, path)
			movedTo(t, fast, slow, path, 3)
			time.Sleep(300 * time.Millisecond)
			slow.Release()
			wg.Wait()
			close(answers)
			for a := range answers {
				assert.Equal(t, http.StatusOK, a.status)
				if path == "/api/chat" {
					assert.Equal(t, 1, strings.Count(a.body, `"done":true`), a.body)
					continue
				}
				assert.Equal(t, 1, strings.Count(a.body, "[DONE]"), a.body)
				ids := map[string]bool{}
				for _, m := range regexp.MustCompile(`"id":"([^"]+)"`).FindAllStringSubmatch(a.body, -1) {
					ids[m[1]] = true
				}
				assert.Len(t, ids, 1, a.body)
			}
			assert.Equal(t, 2, slow.Count(path), "slow had a spare, which moved")
		})
	}
}

// A spare picked while another candidate was not offered (a queued
// request waits for it) may move there all the same: that candidate's
// first answer outruns it. Listing only the servers offered, the spare
// on the slow server stayed there after the fast one had answered
// (TestAMovedStreamIsWhole, once in CI).
func TestASpareMayMoveToACandidateItsPickWasNotOffered(t *testing.T) {
	h := &Handler{}
	h.queue = newQueue(h)
	clock := time.Now() // the policy reads the clock: the measuring requests are under way
	fast, slow := testBackend("fast", nil), testBackend("slow", nil)
	probe := measuring(fast, &job{}, clock)
	measuring(slow, &job{}, clock)

	j := &job{cands: []*backend{fast, slow}}
	b := pickLeastDelay(h, []*backend{slow}, j) // fast not offered: a waiter is queued for it
	require.Same(t, slow, b)
	require.True(t, j.spareOn == slow.srv, "a spare beside slow's measuring request")
	assert.ElementsMatch(t, names([]*backend{fast, slow}), names(j.spareAmong))
	slow.srv.inFlight.Add(1)
	slow.begin(j, clock)

	probe.learn(final(100*ms, 0, 0, 10, 1), clock.Add(100*ms))
	fast.srv.inFlight.Add(-1)
	now := clock.Add(300 * ms)
	at := outrunAt(slow, j.spareAmong)
	require.False(t, at.IsZero(), "fast's answer outruns slow's measuring request")
	assert.False(t, now.Before(at))
	assert.True(t, h.movesSooner(slow, j, j.spareAmong, now), "fast is idle: 0.1 s there against 0.45 s staying")
}

// fastMeasuredSlowMeasuring is a pool of two on a clock: fast answered its
// measuring request in 0.1 s (10 prompt tokens, 10 ms each, one slot seen),
// slow's measuring request went out with it and runs still.
func fastMeasuredSlowMeasuring() (fast, slow *backend, clock time.Time) {
	clock = time.Unix(1000, 0)
	fast, slow = testBackend("fast", nil), testBackend("slow", nil)
	probe := measuring(fast, &job{}, clock)
	measuring(slow, &job{}, clock)
	probe.learn(final(100*ms, 0, 0, 10, 1), clock.Add(100*ms))
	fast.srv.inFlight.Add(-1)
	return fast, slow, clock
}

// A spare request outrun (another server answered its measuring request
// sooner) moves only where it is expected to end sooner than staying: the
// server that outran it may have a queue of its own by then.
func TestAnOutrunSpareMovesOnlyWhereItEndsSooner(t *testing.T) {
	h := &Handler{}
	fast, slow, clock := fastMeasuredSlowMeasuring()
	pool := []*backend{fast, slow}
	now := clock.Add(150 * ms) // slow's measuring request: 0.15 s, outrun at 0.11 s
	require.False(t, now.Before(outrunAt(slow, pool)))
	assert.True(t, h.movesSooner(slow, &job{}, pool, now), "fast is idle: 0.1 s there")
	// Sooner by a little only: a move starts the request over.
	assert.False(t, h.movesSooner(slow, &job{}, pool, clock.Add(75*ms)),
		"fast's 0.1 s against 0.11 s staying: it stays")

	// Six queued on fast (one slot seen, a second not ruled out): about
	// 0.45 s before it starts, against 0.225 s expected on slow.
	release := hold(fast, 6, now)
	defer release()
	assert.False(t, h.movesSooner(slow, &job{}, pool, now), "it stays")
	assert.True(t, h.movesSooner(slow, &job{}, pool, now.Add(500*ms)),
		"slow has run 0.65 s, more than fast's queue takes")
}

// A spare that starts a conversation moves only where it has a slot and a
// cache slot of its own: its later turns follow it, and in the first
// server's queue it would share a slot for as long as both conversations
// last (random-176: seven conversations on a fast server's four slots,
// moved there from the slower servers being measured). A request that
// starts none moves as before, and so does one once the traffic is known
// single-turn.
func TestASpareStartingAConversationMovesOnlyToARoomOfItsOwn(t *testing.T) {
	h := &Handler{affinity: newAffinityTable(100, time.Hour)}
	fast, slow, clock := fastMeasuredSlowMeasuring()
	pool := []*backend{fast, slow}
	now := clock.Add(500 * ms) // slow's measuring request has run 0.5 s: 0.75 s staying
	plain := func() *job { return &job{} }
	starting := func() *job { return &job{newConversation: true} }
	require.True(t, h.movesSooner(slow, plain(), pool, now), "fast is idle: 0.1 s there")
	assert.True(t, h.movesSooner(slow, starting(), pool, now), "fast is idle and holds no conversation")

	// fast's slots (one seen, a second not ruled out) are busy.
	release := hold(fast, 2, now)
	require.True(t, h.movesSooner(slow, plain(), pool, now), "fast's queue ends sooner than staying")
	assert.False(t, h.movesSooner(slow, starting(), pool, now), "in fast's queue it would share a slot for good")
	release()

	// fast's slots are free, but each holds a conversation's cache.
	for i := range 2 {
		_, conv := chatTurn(t, []map[string]string{{"role": "user", "content": fmt.Sprint("conversation ", i)}})
		h.affinity.record(conv, fast.srv.key, 0, now.Add(-100*ms))
	}
	require.True(t, h.movesSooner(slow, plain(), pool, now))
	assert.False(t, h.movesSooner(slow, starting(), pool, now), "it would evict a live conversation's cache")

	// Known single-turn: nothing follows it there.
	for range int(1 / followWeight) {
		h.affinity.noteTurn(false)
	}
	require.True(t, h.affinity.singleTurn())
	assert.True(t, h.movesSooner(slow, starting(), pool, now))
	h.affinity = nil
	assert.True(t, h.movesSooner(slow, starting(), pool, now), "no affinity: no conversation to place")
}

// While the best server measured means a wait, a server still being
// measured takes a request as a spare when staying there is expected to
// end sooner and it will have been outrun, if it is slower, before that
// wait ends; a long request is not raced on a server that has already
// taken longer than the best for its measuring request.
func TestARequestFacingAQueueRacesAServerBeingMeasured(t *testing.T) {
	h := &Handler{}
	fast, slow, clock := fastMeasuredSlowMeasuring()
	now := clock.Add(120 * ms)
	unobserved := []*backend{slow}
	claims := 0
	for range 5 {
		if b := h.claimSpareWithin(unobserved, &job{}, queuedSpareLimit, fast, 0.5, 0.4, now); b != nil {
			require.Same(t, slow, b)
			claims++
		}
	}
	assert.Equal(t, queuedSpareLimit-1, claims, "beside its measuring request, up to the limit")

	_, slow, clock = fastMeasuredSlowMeasuring()
	unobserved = []*backend{slow}
	assert.Nil(t, h.claimSpareWithin(unobserved, &job{}, queuedSpareLimit, fast, 0.15, 0.05, clock.Add(120*ms)),
		"a short queue on fast ends before staying on slow would")
	assert.Nil(t, h.claimSpareWithin(unobserved, &job{}, queuedSpareLimit, fast, 0.5, 0.05, clock.Add(20*ms)),
		"slow is outrun only at 0.11 s, after the wait on fast ends")
	assert.NotNil(t, h.claimSpareWithin(unobserved, &job{}, queuedSpareLimit, fast, 0.5, 0.2, clock.Add(20*ms)))

	long := &job{promptChars: 4000}
	sLong, ok := fast.srv.speed.serviceFor(long)
	require.True(t, ok)
	require.Greater(t, sLong, 1.0)
	_, slow, clock = fastMeasuredSlowMeasuring()
	assert.Nil(t, h.claimSpareWithin([]*backend{slow}, long, queuedSpareLimit, fast, 0.4+sLong, 0.4, clock.Add(120*ms)),
		"slow took 1.2× fast's time so far: the long request would take 1.2× its time there")
}

// The measuring request and the spare beside it go out together, and a
// server of one slot may take the spare first: the measuring request then
// waits inside it for the spare's whole answer. Here slow holds its
// measuring chat until the spare (a generation, not held) has begun
// streaming, so the chat waits behind it; once fast has answered what slow
// is still working on (it holds its requests until then), the chat moves
// to fast instead of waiting out slow's second of streaming.
func TestAMeasuringRequestQueuedBehindItsSpareMoves(t *testing.T) {
	tiny := []string{"tiny-llama"}
	fast := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 4, FirstByteDelay: 20 * time.Millisecond, Tokens: 3})
	defer fast.Close()
	slow := fakeollama.New(fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 1, FirstByteDelay: 20 * time.Millisecond, Tokens: 60, TokenGap: 20 * time.Millisecond})
	defer slow.Close()
	loadCaddy(t, fmt.Sprintf("backend fast %s\nbackend slow %s", fast.URL, slow.URL))
	waitKnown(t, []*fakeollama.Server{fast, slow})
	// fast holds everything until the end: measured before slow's spare
	// has begun, it would outrun that spare, which would move instead.
	fast.Hold(fakeollama.Completions...)
	defer fast.Release()
	slow.Hold("/api/chat")
	defer slow.Release()

	type answer struct {
		backend string
		took    time.Duration
		err     error
	}
	send := func(path, body string, out chan<- answer) {
		start := time.Now()
		res, err := client.Post(siteURL+path, "application/json", strings.NewReader(body))
		if err != nil {
			out <- answer{err: err}
			return
		}
		_, err = io.ReadAll(res.Body)
		res.Body.Close()
		if err == nil && res.StatusCode != http.StatusOK {
			err = fmt.Errorf("status %d", res.StatusCode)
		}
		out <- answer{res.Header.Get("X-OllamaFlow-Backend"), time.Since(start), err}
	}
	// A measuring chat on each server, held there.
	chats := make(chan answer, 2)
	for i := range 2 {
		go send("/api/chat", fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"chat %d"}]}`, i), chats)
	}
	arrived(t, fast, "/api/chat", 1)
	arrived(t, slow, "/api/chat", 1)
	// A spare beside each: slow's takes its only slot and streams.
	gens := make(chan answer, 2)
	for i := range 2 {
		go send("/api/generate", fmt.Sprintf(`{"model":"tiny-llama","prompt":"gen %d"}`, i), gens)
	}
	arrived(t, fast, "/api/generate", 1)
	arrived(t, slow, "/api/generate", 1)
	require.Eventually(t, func() bool { return slow.Busy() == 1 }, 5*time.Second, 5*time.Millisecond)
	time.Sleep(100 * time.Millisecond) // slow's spare is streaming: its answer began
	slow.Release()                     // slow's chat now waits for the slot, behind the spare
	fast.Release()

	for range 2 {
		a := <-chats
		require.NoError(t, a.err)
		assert.Equal(t, "fast", a.backend, "the chat slow held moved to fast: it took %s", a.took)
		assert.Less(t, a.took, time.Second, "it did not wait out slow's answer of 1.2 s")
	}
	for range 2 {
		require.NoError(t, (<-gens).err)
	}
	assert.Equal(t, 1, slow.Count("/api/chat"), "sent to slow once: a move, not a retry there")
	assert.Equal(t, 2, fast.Count("/api/chat"))
}
