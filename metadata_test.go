package ollamaflow

import (
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// `ollama run` asks /api/show before it generates: metadata must not wait
// behind generations, nor be refused because the queue is full.
func TestMetadataNeverWaitsForInference(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 2})
	t.Cleanup(f.Close)
	loadCaddy(t, "max_queue 1\nbackend a "+f.URL+" {\n\tmax_parallel 1\n}")
	waitKnown(t, []*fakeollama.Server{f})

	// One generation holds the only slot, a second fills the queue.
	f.Hold(fakeollama.Completions...)
	var wg sync.WaitGroup
	statuses := make([]int, 2)
	for i := range statuses {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(chatFor("tiny-llama")))
			if err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				statuses[i] = res.StatusCode
			}
		}()
	}
	h := currentHandler(t)
	require.Eventually(t, func() bool { return f.InFlight() == 1 && h.queue.length() == 1 }, 10*time.Second, 5*time.Millisecond)
	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusTooManyRequests, res.StatusCode, "inference is at capacity: %s", body)

	start := time.Now()
	res, body = post(t, "/api/show", `{"model":"tiny-llama"}`)
	t.Logf("/api/show answered in %s with every slot busy and the queue full", time.Since(start).Round(time.Microsecond))
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Contains(t, body, `"modelfile"`)
	assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
	res, body = send(t, http.MethodGet, siteURL+"/api/version", "")
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Contains(t, body, `"version"`)
	res, body = send(t, http.MethodGet, siteURL+"/v1/models/tiny-llama", "")
	assert.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Contains(t, body, `"id":"tiny-llama"`)
	res, body = post(t, "/api/show", `{"model":"nope"}`)
	assert.Equal(t, http.StatusNotFound, res.StatusCode, "a model nobody has is still 404: %s", body)

	// The metadata answered while both generations were still waiting.
	assert.Equal(t, 1, f.InFlight())
	assert.Equal(t, 1, h.queue.length())
	assert.Equal(t, int64(1), pooled(t, f.URL).inFlight.Load(), "metadata took no slot")
	f.Release()
	wg.Wait()
	assert.Equal(t, []int{http.StatusOK, http.StatusOK}, statuses)
}

// Metadata still respects health and drain: a draining server is not asked.
func TestMetadataRespectsDrain(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}}, "")
	loadCaddy(t, lines)
	waitKnown(t, fs)
	pooled(t, fs[0].URL).setDraining(true)
	defer pooled(t, fs[0].URL).setDraining(false)
	for range 6 {
		res, body := post(t, "/api/show", `{"model":"tiny-llama"}`)
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Zero(t, fs[0].Count("/api/show"))
}
