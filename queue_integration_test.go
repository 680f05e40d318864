package ollamaflow

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// queuedAnswer is what a client got: status, serving backend, error or body.
type queuedAnswer struct {
	status  int
	backend string
	err     string
}

// postAsync sends a chat in the background; the queuedAnswer arrives on the
// returned channel with the backend that served it.
func postAsync(path, body string, hdr ...string) <-chan queuedAnswer {
	out := make(chan queuedAnswer, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, siteURL+path, strings.NewReader(body))
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		res, err := client.Do(req)
		if err != nil {
			out <- queuedAnswer{err: err.Error()}
			return
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		out <- queuedAnswer{status: res.StatusCode, backend: res.Header.Get("X-OllamaFlow-Backend"), err: string(b)}
	}()
	return out
}

func TestIntegrationQueueReloadAddsAServer(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer b.Close()
	cfg := func(extra string) string {
		return fmt.Sprintf(`
		name qr
		queue_timeout 30s
		backend a %s {
			max_parallel 1
			health_interval 1h
		}
		%s`, a.URL, extra)
	}
	loadCaddy(t, cfg(""))
	waitKnown(t, []*fakeollama.Server{a})
	a.Hold("/api/chat")
	defer a.Release()
	first := postAsync("/api/chat", chatBody)
	require.Eventually(t, func() bool { return a.InFlight() == 1 }, 5*time.Second, time.Millisecond)
	queued := postAsync("/api/chat", chatBody)
	old := currentHandler(t)
	require.Eventually(t, func() bool { return old.queue.length() == 1 }, 5*time.Second, time.Millisecond)

	// The reload adds b: the request queued in the old config is served by
	// it at once, not after queue_timeout, while a is still busy.
	loadCaddyRaw(t, caddyConfig(cfg(fmt.Sprintf("backend b %s {\n health_interval 1h\n}", b.URL))))
	select {
	case o := <-queued:
		assert.Equal(t, http.StatusOK, o.status, o.err)
		assert.Equal(t, "b", o.backend)
	case <-time.After(20 * time.Second):
		t.Fatal("the queued request was stranded after the reload added a server")
	}
	assert.Zero(t, old.queue.length())
	a.Release()
	assert.Equal(t, http.StatusOK, (<-first).status)
}

func TestIntegrationQueueShareOfOneClient(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, fmt.Sprintf(`
		name share
		max_queue 4
		max_queue_per_client 1
		queue_timeout 30s
		sticky {
			headers x-session
		}
		backend a %s {
			max_parallel 1
			health_interval 1h
		}`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	a.Hold("/api/chat", "/v1/chat/completions")
	defer a.Release()
	h := currentHandler(t)
	first := postAsync("/api/chat", chatBody, "x-session", "s0")
	require.Eventually(t, func() bool { return a.InFlight() == 1 }, 5*time.Second, time.Millisecond)
	mine := postAsync("/api/chat", chatBody, "x-session", "greedy")
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond)

	// The same client again: 429 at once, in each API's format.
	res, body := post(t, "/api/chat", chatBody, "x-session", "greedy")
	assert.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.Equal(t, "1", res.Header.Get("Retry-After"))
	var ol struct{ Error string }
	require.NoError(t, json.Unmarshal([]byte(body), &ol), body)
	assert.Contains(t, ol.Error, "max_queue_per_client")
	res, body = post(t, "/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`, "x-session", "greedy")
	assert.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	var oa struct {
		Error struct{ Message, Type string }
	}
	require.NoError(t, json.Unmarshal([]byte(body), &oa), body)
	assert.Contains(t, oa.Error.Message, "max_queue_per_client")
	assert.Equal(t, "rate_limit_error", oa.Error.Type)

	// Other clients still queue.
	other := postAsync("/api/chat", chatBody, "x-session", "polite")
	require.Eventually(t, func() bool { return h.queue.length() == 2 }, 5*time.Second, time.Millisecond)

	a.Release()
	for _, ch := range []<-chan queuedAnswer{first, mine, other} {
		o := <-ch
		assert.Equal(t, http.StatusOK, o.status, o.err)
	}
}

func TestIntegrationBodyFloodStaysWithinBudget(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, TokenGap: 50 * time.Millisecond})
	defer a.Close()
	const budget = 4 << 20
	loadCaddy(t, fmt.Sprintf(`
		name flood
		max_request_body 1MiB
		max_body_memory %d
		max_queue 6
		max_queue_per_client 6
		queue_timeout 10s
		backend a %s {
			max_parallel 1
			health_interval 1h
		}`, budget, a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	bodyMemory.mu.Lock()
	bodyMemory.peak = bodyMemory.used // the high-water mark of this test
	bodyMemory.mu.Unlock()

	big := `{"model":"tiny-llama","stream":false,"messages":[{"role":"user","content":"` + strings.Repeat("x", 1000*1000) + `"}]}`
	const clients = 30
	var wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[int]int{}
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(big))
			status := 0
			if err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				status = res.StatusCode
				if status == http.StatusServiceUnavailable || status == http.StatusTooManyRequests {
					assert.NotEmpty(t, res.Header.Get("Retry-After"))
				}
			}
			mu.Lock()
			counts[status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("statuses: %v", counts)
	for status, n := range counts {
		assert.Contains(t, []int{http.StatusOK, http.StatusTooManyRequests, http.StatusServiceUnavailable}, status, "%d clients got %d", n, status)
	}
	assert.Positive(t, counts[http.StatusOK])
	assert.Positive(t, counts[http.StatusServiceUnavailable], "7 bodies of 1 MB (one in flight, six queued) do not fit in 4 MiB")
	_, peak, _ := bodyMemory.state()
	assert.LessOrEqual(t, peak, int64(budget), "the bodies held never exceeded max_body_memory")
	assert.Positive(t, peak)

	// The admin API and the metrics show the budget, back to zero once
	// every handler has returned (a client may have its answer a moment
	// before its handler's deferred release).
	require.Eventually(t, func() bool { used, _, _ := bodyMemory.state(); return used == 0 }, 5*time.Second, time.Millisecond)
	status, raw := adminGet(t, "/ollamaflow/frontends")
	require.Equal(t, http.StatusOK, status)
	var fronts []frontendJSON
	require.NoError(t, json.Unmarshal(raw, &fronts))
	require.Len(t, fronts, 1)
	assert.EqualValues(t, budget, fronts[0].BodyMemory.Limit)
	assert.Zero(t, fronts[0].BodyMemory.Used)
	assert.Equal(t, peak, fronts[0].BodyMemory.ProcessPeak)
	assert.Equal(t, 0.0, scrape(t, "ollamaflow_body_memory_bytes"))
	assert.Equal(t, float64(budget), scrape(t, "ollamaflow_body_memory_limit_bytes"))
}
