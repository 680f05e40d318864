package fakeollama_test

import (
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

type finalCounts struct {
	TotalDuration      time.Duration `json:"total_duration"`
	LoadDuration       time.Duration `json:"load_duration"`
	PromptEvalDuration time.Duration `json:"prompt_eval_duration"`
}

func chatWith(t *testing.T, f *fakeollama.Server, model string) finalCounts {
	t.Helper()
	res, body := post(t, f.URL+"/api/chat", `{"model":"`+model+`","messages":[{"role":"user","content":"x"}],"stream":false}`)
	require.Equal(t, 200, res.StatusCode, body)
	var fc finalCounts
	require.NoError(t, json.Unmarshal([]byte(body), &fc))
	return fc
}

func TestMaxLoadedEvictsTheLeastRecentlyUsed(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"a", "b", "c"}, Loaded: []string{"a"}, MaxLoaded: 2, LoadDelay: 20 * time.Millisecond})
	chatWith(t, f, "a")
	assert.Zero(t, f.ColdLoads(), "resident: no load")
	assert.GreaterOrEqual(t, chatWith(t, f, "b").LoadDuration, 20*time.Millisecond)
	assert.Equal(t, []string{"a:latest", "b:latest"}, f.Loaded(), "room for two")
	chatWith(t, f, "a") // a is now the most recently used
	chatWith(t, f, "c")
	assert.Equal(t, []string{"a:latest", "c:latest"}, f.Loaded(), "b, used longest ago, made room")
	assert.Equal(t, 2, f.ColdLoads())
	assert.Equal(t, 1, f.Evictions())
	_, body := do(t, "GET", f.URL+"/api/ps", "")
	assert.Contains(t, body, `"name":"c:latest"`)
	assert.NotContains(t, body, `"name":"b:latest"`)

	f.ResetStats()
	assert.Zero(t, f.ColdLoads())
	assert.Zero(t, f.Evictions())
}

func TestConcurrentRequestsShareOneLoad(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"a"}, LoadDelay: 50 * time.Millisecond})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() { chatWith(t, f, "a") })
	}
	wg.Wait()
	assert.Equal(t, 1, f.ColdLoads())
}

func TestSetSpeedSlowsTheBoxDown(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"a"}, Loaded: []string{"a"}, FirstByteDelay: 10 * time.Millisecond})
	f.SetSpeed(5)
	assert.GreaterOrEqual(t, chatWith(t, f, "a").PromptEvalDuration, 50*time.Millisecond)
}

func TestLoadDurationLeavesOutTheWaitForASlot(t *testing.T) {
	t.Parallel()
	// As in Ollama, a request that waits for a parallel slot reports the wait in total_duration
	// only, not in load_duration: the second of two requests on one slot waits for most of the
	// first's 300 ms (both are sent at once; the bound leaves 250 ms for the second to arrive).
	f := newFake(t, fakeollama.Config{Models: []string{"a"}, Loaded: []string{"a"}, Parallel: 1, FirstByteDelay: 300 * time.Millisecond})
	counts := make(chan finalCounts, 2)
	for range 2 {
		go func() { counts <- chatWith(t, f, "a") }()
	}
	a, b := <-counts, <-counts
	second := a
	if b.TotalDuration > a.TotalDuration {
		second = b
	}
	assert.GreaterOrEqual(t, second.TotalDuration, 350*time.Millisecond, "it waited")
	assert.Less(t, second.LoadDuration, second.TotalDuration-second.PromptEvalDuration-50*time.Millisecond, "the wait is not a load")
}
