package fakeollama_test

import (
	"encoding/json"
	"strings"
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

// modelFile is the model file /api/show names for model.
func modelFile(t *testing.T, f *fakeollama.Server, model string) string {
	t.Helper()
	res, body := post(t, f.URL+"/api/show", `{"model":"`+model+`"}`)
	require.Equal(t, 200, res.StatusCode, body)
	var show struct{ Modelfile string }
	require.NoError(t, json.Unmarshal([]byte(body), &show))
	for line := range strings.Lines(show.Modelfile) {
		if from, ok := strings.CutPrefix(line, "FROM "); ok {
			return strings.TrimSpace(from)
		}
	}
	t.Fatalf("no FROM in %q", show.Modelfile)
	return ""
}

func TestMaxLoadedEvictsTheIdleModelWhoseFileSortsFirst(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"a", "b", "c"}, Loaded: []string{"a"}, MaxLoaded: 2, LoadDelay: 20 * time.Millisecond})
	chatWith(t, f, "a")
	assert.Zero(t, f.ColdLoads(), "resident: no load")
	assert.GreaterOrEqual(t, chatWith(t, f, "b").LoadDuration, 20*time.Millisecond)
	assert.Equal(t, []string{"a:latest", "b:latest"}, f.Loaded(), "room for two")
	first, other := "a", "b"
	if modelFile(t, f, "b") < modelFile(t, f, "a") {
		first, other = "b", "a"
	}
	chatWith(t, f, first) // used last: Ollama evicts it all the same
	chatWith(t, f, "c")
	assert.ElementsMatch(t, []string{other + ":latest", "c:latest"}, f.Loaded(), "%s, whose file sorts first, made room", first)
	assert.Equal(t, 2, f.ColdLoads())
	assert.Equal(t, 1, f.Evictions())
	_, body := do(t, "GET", f.URL+"/api/ps", "")
	assert.Contains(t, body, `"name":"c:latest"`)
	assert.NotContains(t, body, `"name":"`+first+`:latest"`)

	f.ResetStats()
	assert.Zero(t, f.ColdLoads())
	assert.Zero(t, f.Evictions())
}

func TestALoadWaitsForTheVictimWhenEveryModelIsInUse(t *testing.T) {
	t.Parallel()
	// Ollama picks the model whose file sorts first and waits for it, even when another
	// becomes idle sooner.
	f := newFake(t, fakeollama.Config{Models: []string{"a", "b", "c"}, Loaded: []string{"a", "b"}, MaxLoaded: 2,
		Parallel: 1, FirstByteDelay: 400 * time.Millisecond, LoadDelay: 10 * time.Millisecond})
	first, other := "a", "b"
	if modelFile(t, f, "b") < modelFile(t, f, "a") {
		first, other = "b", "a"
	}
	long := make(chan struct{})
	go func() { defer close(long); chatWith(t, f, first) }()
	short := make(chan struct{})
	go func() {
		defer close(short)
		_, _ = post(t, f.URL+"/api/chat", `{"model":"`+other+`","messages":[{"role":"user","content":"x"}],"stream":false,"options":{"num_predict":1}}`)
	}()
	time.Sleep(50 * time.Millisecond) // both running
	chatWith(t, f, "c")
	<-long
	<-short
	assert.ElementsMatch(t, []string{other + ":latest", "c:latest"}, f.Loaded(), "%s was waited for", first)
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

func TestPsListsAModelWhenItsLoadIsDone(t *testing.T) {
	t.Parallel()
	// As Ollama lists a llama model: the victim is gone from the start of the swap, the model
	// loaded is listed at its end (residency.go), so a list taken during the swap shows fewer
	// models than the box holds.
	f := newFake(t, fakeollama.Config{Models: []string{"a", "b", "c"}, Loaded: []string{"a", "b"}, MaxLoaded: 2, LoadDelay: 300 * time.Millisecond})
	listed := func() (n int, c bool) {
		_, body := do(t, "GET", f.URL+"/api/ps", "")
		return strings.Count(body, `"name":`), strings.Contains(body, `"name":"c:latest"`)
	}
	done := make(chan struct{})
	go func() { defer close(done); chatWith(t, f, "c") }()
	require.Eventually(t, func() bool { n, _ := listed(); return n == 1 }, 250*time.Millisecond, 5*time.Millisecond,
		"a victim is gone when the load starts")
	_, c := listed()
	assert.False(t, c, "c is listed when its load is done")
	<-done
	n, c := listed()
	assert.True(t, c)
	assert.Equal(t, 2, n)
}
