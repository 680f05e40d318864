package ollamaflow

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
)

// End to end: a is asked for nearly always and its one copy, on s1 (one
// slot), is busy; s2 and s3 hold b, which can spare a copy. Demand
// placement wants a copy of a on one of them: a copy of the waiting
// request, capped at one token, loads it there, while the request itself
// waits for s1 and is answered from there, not held for the load.
func TestADemandMoveLoadsTheModelWithACopyNotAClientsRequest(t *testing.T) {
	models := []string{"model-a", "model-b", "model-c"}
	cfg := fakeollama.Config{Models: models, Loaded: []string{"model-a", "model-c"}, Parallel: 1, MaxLoaded: 2,
		FirstByteDelay: 20 * time.Millisecond, Tokens: 2, TokenGap: 5 * time.Millisecond, LoadDelay: 800 * time.Millisecond}
	s1 := fakeollama.New(cfg)
	defer s1.Close()
	cfg.Loaded, cfg.MaxLoaded = []string{"model-b"}, 1
	s2 := fakeollama.New(cfg)
	defer s2.Close()
	s3 := fakeollama.New(cfg)
	defer s3.Close()
	loadCaddy(t, fmt.Sprintf("backend s1 %s\nbackend s2 %s\nbackend s3 %s", s1.URL, s2.URL, s3.URL))
	pool := []*fakeollama.Server{s1, s2, s3}
	waitKnown(t, pool)

	const path = "/api/chat"
	ask := func(model, content string) string {
		body := fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":%q}],"stream":false}`, model, content)
		res, err := client.Post(siteURL+path, "application/json", strings.NewReader(body))
		require.NoError(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		require.Equal(t, http.StatusOK, res.StatusCode, string(b))
		assert.Equal(t, "2", gjson.GetBytes(b, "eval_count").Raw, "the client's own answer, not a copy's: %s", b)
		return res.Header.Get("X-OllamaFlow-Backend")
	}
	// Every server measured; s1, the server holding a, has one slot (as
	// learned from a request seen waiting behind another).
	for i := range 3 {
		var wg sync.WaitGroup
		for k := range 2 {
			wg.Go(func() { ask("model-b", fmt.Sprintf("warm b %d %d", i, k)) })
		}
		wg.Wait()
		require.Equal(t, "s1", ask("model-a", fmt.Sprintf("warm a %d", i)))
	}
	require.Positive(t, s2.Count(path)*s3.Count(path), "b's servers measured")
	sp := &pooled(t, s1.URL).speed
	sp.mu.Lock()
	sp.slotsLo, sp.slotsHi, sp.hiAt = 1, 1, time.Now()
	sp.mu.Unlock()
	h := currentHandler(t)
	now := time.Now()
	for range planMinRequests {
		h.demand.note(normalizeModel("model-a"), now)
	}
	before2, before3 := s2.Count(path), s3.Count(path)
	before := before2 + before3

	s1.Hold(fakeollama.Completions...)
	held := make(chan string, 1)
	go func() { held <- ask("model-a", "holds s1's slot") }()
	arrived(t, s1, path, 4)
	waiting := make(chan string, 1)
	go func() { waiting <- ask("model-a", "waits for s1") }()

	require.Eventually(t, func() bool { return s2.Count(path)+s3.Count(path) == before+1 }, 5*time.Second, 5*time.Millisecond,
		"one of b's servers gets a copy")
	target, name := s2, "s2"
	if s3.Count(path) > before3 {
		target, name = s3, "s3"
	}
	copyReq, ok := target.LastRequestTo(path)
	require.True(t, ok)
	assert.Equal(t, "model-a", gjson.GetBytes(copyReq.Body, "model").String())
	assert.True(t, strings.HasSuffix(gjson.GetBytes(copyReq.Body, "messages.0.content").String(), "waits for s1"),
		"a copy of the waiting request: %s", copyReq.Body)
	assert.Equal(t, "false", gjson.GetBytes(copyReq.Body, "stream").Raw, "read by the proxy whole")
	assert.Equal(t, int64(loadCopyTokens), gjson.GetBytes(copyReq.Body, "options.num_predict").Int(), "its answer capped")

	s1.Release()
	assert.Equal(t, "s1", <-held)
	assert.Equal(t, "s1", <-waiting, "the request was not sent to wait for the load")
	assert.Equal(t, before+1, s2.Count(path)+s3.Count(path), "the copy alone went to b's servers")
	assert.NotContains(t, target.Loaded(), normalizeModel("model-a"), "its load was still under way when the request was answered")

	metric := fmt.Sprintf(`ollamaflow_load_copies_total{backend="%s",frontend="%s",model="%s"}`, name, h.Name, normalizeModel("model-a"))
	require.Eventually(t, func() bool { return scrape(t, metric) == 1 }, 5*time.Second, 10*time.Millisecond,
		"counted in ollamaflow_load_copies_total")
	require.Eventually(t, func() bool { return slices.Equal(target.Loaded(), []string{normalizeModel("model-a")}) }, 5*time.Second, 10*time.Millisecond,
		"the copy loads a in b's place")
	assert.Equal(t, 1, target.ColdLoads())
	assert.True(t, pooled(t, target.URL).models.Load().isLoaded(normalizeModel("model-a")), "and the proxy takes it as resident")
	assert.Equal(t, 0, s1.ColdLoads())
	assert.Equal(t, -1.0, scrape(t, fmt.Sprintf(`ollamaflow_measuring_copies_total{backend="%s",frontend="%s"}`, name, h.Name)),
		"not a measuring copy")
}

// A request that may not be copied is sent to load the model itself: the
// claim is refused, and a request holds one load copy at most.
func TestALoadCopyIsClaimedOnlyForACopyableRequest(t *testing.T) {
	h := &Handler{}
	b := testBackend("s2", nil)
	j := &job{model: "a"}
	assert.False(t, h.claimLoadCopy(b, j), "not copyable")
	_, planned := b.srv.speed.pendingLoad("a", time.Now())
	assert.False(t, planned, "no load planned for a claim refused")

	j.copyable = true
	require.True(t, h.claimLoadCopy(b, j))
	assert.Same(t, b, j.loadTo)
	_, planned = b.srv.speed.pendingLoad("a", time.Now())
	assert.True(t, planned, "the load counts as under way at once: the next move waits for it")
	assert.False(t, h.claimLoadCopy(testBackend("s3", nil), j), "one load copy per request")

	dropCopy(j)
	assert.Nil(t, j.loadTo)
}
