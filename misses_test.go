package ollamaflow

// Routing misses and /api/ps must not multiply into backend traffic: one
// read of a server's lists at a time, failed reads rate-limited too,
// misses remembered briefly, /api/ps answered from discovery.

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// flood sends n requests at once and returns their statuses.
func flood(t *testing.T, n int, method, path, body string) []int {
	t.Helper()
	return floodTraced(t, n, method, path, body, nil)
}

// floodTraced is flood with trace on each request (nil: none).
func floodTraced(t *testing.T, n int, method, path, body string, trace *httptrace.ClientTrace) []int {
	t.Helper()
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, err := http.NewRequest(method, siteURL+path, strings.NewReader(body))
			if err != nil {
				return
			}
			if trace != nil {
				req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
			}
			res, err := client.Do(req)
			if err != nil {
				return
			}
			res.Body.Close()
			statuses[i] = res.StatusCode
		}()
	}
	wg.Wait()
	return statuses
}

// waitListsAged waits until every fake's lists were last read longer ago
// than d, so the next routing miss or /api/ps would read them again.
func waitListsAged(t *testing.T, fs []*fakeollama.Server, d time.Duration) {
	t.Helper()
	for _, f := range fs {
		s := pooled(t, f.URL)
		require.Eventually(t, func() bool { return time.Since(s.lastRefreshEnd()) > d }, 10*time.Second, 10*time.Millisecond)
	}
}

func TestMissesAreCheap(t *testing.T) {
	defer func(d int64) { missTTL.Store(d) }(missTTL.Load())
	missTTL.Store(int64(time.Hour)) // the test decides when a miss is forgotten
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}}, "model_refresh 1h")
	loadCaddy(t, lines)
	waitKnown(t, fs)

	// Every server's /api/tags fails now (probes still pass): each miss
	// would want to read the lists again.
	for _, f := range fs {
		f.FailWith(http.StatusInternalServerError, `{"error":"boom"}`, "/api/tags")
	}
	waitListsAged(t, fs, minRefreshGap)
	for _, f := range fs {
		f.ResetStats()
	}
	for _, st := range flood(t, 200, http.MethodPost, "/api/chat", chatFor("nope")) {
		require.Equal(t, http.StatusNotFound, st)
	}
	for _, f := range fs {
		assert.Equal(t, 1, f.Count("/api/tags"), "200 concurrent misses read each server's lists once")
		assert.Zero(t, f.Count("/api/ps"))
	}

	// Later misses are answered from memory: no backend hears of them,
	// even once the refresh gap has passed.
	for _, f := range fs {
		f.ClearFaults()
	}
	waitListsAged(t, fs, minRefreshGap)
	for _, f := range fs {
		f.ResetStats()
	}
	for _, st := range flood(t, 200, http.MethodPost, "/api/chat", chatFor("nope")) {
		require.Equal(t, http.StatusNotFound, st)
	}
	res, body := post(t, "/v1/chat/completions", `{"model":"nope","messages":[]}`)
	require.Equal(t, http.StatusNotFound, res.StatusCode, body)
	assert.Contains(t, body, "model_not_found")
	for _, f := range fs {
		assert.Zero(t, f.Count("/api/tags"), "a remembered miss costs no backend a round trip")
	}

	// A change of any server's lists forgets the miss at once.
	fs[1].SetModels("tiny-llama", "nope")
	require.NoError(t, pooled(t, fs[1].URL).refreshModels(context.Background(), 0)) // as discovery would
	res, body = post(t, "/api/chat", chatFor("nope"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
}

func TestPSAnswersFromDiscovery(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama", "other"}}, "model_refresh 1h")
	fs[0].SetLoaded("tiny-llama")
	fs[1].SetLoaded("other")
	loadCaddy(t, lines)
	waitKnown(t, fs)
	waitListsAged(t, fs, psMaxAge) // stale: the flood must read them, once
	for _, f := range fs {
		f.ResetStats()
		// The first read stays in progress until every request of the
		// flood is sent, however slowly a loaded machine sends them: they
		// all find it in progress, rather than a read that ended more than
		// psMaxAge before the last of them arrived.
		f.Hold("/api/ps")
	}
	var sent atomic.Int32
	trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { sent.Add(1) }}
	done := make(chan []int, 1)
	go func() { done <- floodTraced(t, 200, http.MethodGet, "/api/ps", "", trace) }()
	require.Eventually(t, func() bool {
		return sent.Load() == 200 && fs[0].Count("/api/ps") == 1 && fs[1].Count("/api/ps") == 1
	}, 60*time.Second, 5*time.Millisecond, "every request sent, one read per server in progress")
	for _, f := range fs {
		f.Release()
	}
	for _, st := range <-done {
		require.Equal(t, http.StatusOK, st)
	}
	for _, f := range fs {
		assert.Equal(t, 1, f.Count("/api/ps"), "200 concurrent /api/ps share one read per server")
	}

	res, body := send(t, http.MethodGet, siteURL+"/api/ps", "")
	require.Equal(t, http.StatusOK, res.StatusCode)
	var ps struct {
		Models []struct{ Name, Backend string }
	}
	require.NoError(t, json.Unmarshal([]byte(body), &ps), body)
	got := map[string]string{}
	for _, m := range ps.Models {
		got[m.Name] = m.Backend
	}
	assert.Equal(t, map[string]string{"tiny-llama:latest": "a", "other:latest": "b"}, got)
}

// `ollama ps` right after `ollama run` shows the model the run loaded,
// even though the lists were read less than psMaxAge before.
func TestPSShowsAModelJustLoaded(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}}, "model_refresh 1h")
	loadCaddy(t, lines)
	waitKnown(t, fs)
	s := pooled(t, fs[0].URL)
	require.NoError(t, s.refreshModels(context.Background(), 0)) // lists fresh: nothing loaded
	require.False(t, s.models.Load().isLoaded("tiny-llama:latest"))

	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	res, body = send(t, http.MethodGet, siteURL+"/api/ps", "")
	require.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, body, `"name":"tiny-llama:latest"`)
	assert.Contains(t, body, `"backend":"a"`)
}
