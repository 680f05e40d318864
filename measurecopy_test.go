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
	"github.com/tidwall/gjson"
)

// The kinds of re-measurement a server believed slow gets, and when.
func TestAServerBelievedSlowIsReMeasuredWithACopyEveryCopyAfter(t *testing.T) {
	clock := time.Unix(1000, 0)
	slow := testBackend("slow", nil)
	sp := &slow.srv.speed
	assert.Equal(t, remeasureNone, sp.claimRemeasure(clock, nil, true), "never measured: it is measured, not re-measured")
	serve(slow, &job{}, clock, final(400*ms, 0, 0, 10, 1))
	clock = clock.Add(400 * ms) // its answer

	assert.Equal(t, remeasureNone, sp.claimRemeasure(clock.Add(copyAfter/2), nil, true), "timed copyAfter/2 ago")
	at := clock.Add(copyAfter)
	assert.Equal(t, remeasureCopy, sp.claimRemeasure(at, nil, true), "no sample for copyAfter: a copy measures it")
	assert.Equal(t, remeasureNone, sp.claimRemeasure(at.Add(2*copyAfter), nil, true), "one copy in flight at most")
	sp.copyDone()
	assert.Equal(t, remeasureNone, sp.claimRemeasure(at.Add(copyAfter/2), nil, true), "one copy per copyAfter")
	second := at.Add(copyAfter)
	assert.Equal(t, remeasureCopy, sp.claimRemeasure(second, nil, true))
	time.Sleep(20 * ms)
	sp.copyDone()
	sp.mu.Lock()
	took := sp.copyTook
	sp.mu.Unlock()
	assert.GreaterOrEqual(t, took, 20*ms, "how long the copy held its slot")

	// A copy that held its slot long holds the next one back: copies take
	// at most 1/copyShare of a slot's time.
	sp.mu.Lock()
	sp.copyTook = 400 * ms
	sp.mu.Unlock()
	assert.Equal(t, remeasureNone, sp.claimRemeasure(second.Add(copyAfter), nil, true), "a copy of 0.4 s: the next one 1.6 s after it was sent")
	assert.Equal(t, remeasureNone, sp.claimRemeasure(second.Add(copyShare*400*ms-ms), nil, true))
	assert.Equal(t, remeasureCopy, sp.claimRemeasure(second.Add(copyShare*400*ms), nil, true))
	sp.copyDone()

	// A request that may not be copied (/v1, embeddings) re-measures it
	// itself, once per remeasureAfter.
	other := testBackend("other", nil)
	serve(other, &job{}, clock.Add(-400*ms), final(400*ms, 0, 0, 10, 1))
	assert.Equal(t, remeasureNone, other.srv.speed.claimRemeasure(clock.Add(copyAfter), nil, false))
	assert.Equal(t, remeasureRequest, other.srv.speed.claimRemeasure(clock.Add(remeasureAfter), nil, false))
	assert.Equal(t, remeasureNone, other.srv.speed.claimRemeasure(clock.Add(remeasureAfter+copyAfter), nil, false))
	// Only by a request of about its typical size: a long one would hold
	// the slot of a server believed slow for longer than any shows its
	// speed in; the claim is left to the next request.
	later := clock.Add(2 * remeasureAfter)
	long, typical := &job{promptChars: 4000}, &job{promptChars: 40}
	longTime, ok := other.srv.speed.serviceFor(long)
	typicalTime, _ := other.srv.speed.serviceFor(typical)
	require.True(t, ok)
	require.Greater(t, longTime, remeasureSpan*typicalTime)
	assert.Equal(t, remeasureNone, other.srv.speed.claimRemeasure(later, long, false), "far longer than its typical request")
	assert.Equal(t, remeasureRequest, other.srv.speed.claimRemeasure(later, typical, false))

	// An answer (the copy's) much faster than believed: the next request
	// goes there, copyable or not, and confirms it.
	sp.mu.Lock()
	sp.remeasureNow = true
	sp.mu.Unlock()
	assert.Equal(t, remeasureRequest, sp.claimRemeasure(clock.Add(remeasureAfter+time.Millisecond), nil, true))
}

// What may be copied: a completion, not too large, on a frontend
// whose policy re-measures.
func TestOnlyCompletionsOfBoundedSizeAreCopied(t *testing.T) {
	h := &Handler{remeasures: true}
	req := func(path string) *http.Request { r, _ := http.NewRequest("POST", "http://x"+path, nil); return r }
	small := []byte(`{"model":"m","prompt":"hi"}`)
	j := newJob("m", apiOllama, small)
	assert.True(t, h.copyable(req("/api/generate"), apiOllama, kindCompletion, small, j))
	assert.True(t, h.copyable(req("/api/chat"), apiOllama, kindCompletion, small, j))
	assert.True(t, h.copyable(req("/v1/chat/completions"), apiOpenAI, kindCompletion, small, j))
	assert.True(t, h.copyable(req("/v1/completions"), apiOpenAI, kindCompletion, small, j))
	assert.False(t, h.copyable(req("/v1/embeddings"), apiOpenAI, kindEmbedding, small, j))
	assert.False(t, h.copyable(req("/api/embed"), apiOllama, kindEmbedding, small, j))
	assert.False(t, h.copyable(req("/api/chat"), apiOllama, kindCompletion, make([]byte, copyMaxBody+1), j), "a large body is not copied")
	assert.False(t, (&Handler{}).copyable(req("/api/chat"), apiOllama, kindCompletion, small, j), "least_conn re-measures nothing")
	long := []byte(`{"model":"m","prompt":"` + strings.Repeat("word ", copyMaxPrompt/5+1) + `"}`)
	assert.False(t, h.copyable(req("/api/generate"), apiOllama, kindCompletion, long, newJob("m", apiOllama, long)),
		"a long prompt is not copied: it would hold the slow server's slot for long")
}

// Copies in flight are bounded in the process: past maxCopies none is
// sent and the server's claim is given back, so a later one may go.
func TestMeasuringCopiesAreBounded(t *testing.T) {
	clock := time.Now().Add(-time.Minute)
	slow := testBackend("slow", nil)
	serve(slow, &job{}, clock, final(400*ms, 0, 0, 10, 1))
	require.Equal(t, remeasureCopy, slow.srv.speed.claimRemeasure(time.Now(), nil, true))

	copiesInFlight.Add(maxCopies)
	defer copiesInFlight.Add(-maxCopies)
	h := &Handler{remeasures: true}
	r, _ := http.NewRequest("POST", "http://x/api/chat", nil)
	j := &job{copyTo: slow, copyable: true}
	h.sendCopy(r, apiOllama, kindCompletion, []byte(`{"model":"m"}`), j)
	assert.Nil(t, j.copyTo)
	assert.False(t, j.copyable, "one copy per request, sent or not")
	assert.Equal(t, int64(maxCopies), copiesInFlight.Load(), "none sent")
	assert.Zero(t, slow.srv.inFlight.Load(), "no slot taken")
	assert.Equal(t, remeasureCopy, slow.srv.speed.claimRemeasure(time.Now().Add(copyAfter), nil, true), "the claim was given back")
}

// End to end: slow is measured at four times fast's time, then recovers
// while nothing is sent to it. With fast's one slot taken, the next
// request waits for fast, and a copy of it, capped and not streamed,
// measures slow: its answer shows slow recovered, and the request after
// goes to slow, copyAfter after slow was last timed instead of
// remeasureAfter. On both APIs.
func TestARecoveredServerIsFoundByACopyOfAWaitingRequest(t *testing.T) {
	for _, path := range []string{"/api/chat", "/v1/chat/completions"} {
		t.Run(strings.TrimPrefix(path, "/"), func(t *testing.T) { recoveredFoundByACopy(t, path) })
	}
}

func recoveredFoundByACopy(t *testing.T, path string) {
	tiny := []string{"tiny-llama"}
	cfg := fakeollama.Config{Models: tiny, Loaded: tiny, Parallel: 1, FirstByteDelay: 100 * time.Millisecond, Tokens: 3, TokenGap: 10 * time.Millisecond}
	fast := fakeollama.New(cfg)
	defer fast.Close()
	cfg.Parallel = 2
	slow := fakeollama.New(cfg)
	defer slow.Close()
	slow.SetSpeed(4)
	loadCaddy(t, fmt.Sprintf("backend fast %s\nbackend slow %s", fast.URL, slow.URL))
	waitKnown(t, []*fakeollama.Server{fast, slow})

	openai := strings.HasPrefix(path, "/v1/")
	ask := func(content string) (backend string) {
		body := `{"model":"tiny-llama","messages":[{"role":"user","content":"` + content + `"}],"stream":true`
		if openai {
			body += `,"stream_options":{"include_usage":true}`
		}
		res, err := client.Post(siteURL+path, "application/json", strings.NewReader(body+"}"))
		require.NoError(t, err)
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		require.Equal(t, http.StatusOK, res.StatusCode, string(b))
		if openai {
			require.Contains(t, string(b), "data: [DONE]")
		} else {
			require.Contains(t, string(b), `"done":true`)
		}
		return res.Header.Get("X-OllamaFlow-Backend")
	}
	// A fresh pool: one measuring request on each.
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { ask(fmt.Sprintf("first %d", i)) })
	}
	wg.Wait()
	require.Equal(t, 1, slow.Count(path), "slow was measured with one request")
	for i := range 3 {
		assert.Equal(t, "fast", ask(fmt.Sprintf("then %d", i)), "slow is believed four times slower")
	}
	time.Sleep(copyAfter + 100*ms)
	slow.SetSpeed(1) // recovered, unseen
	metric := fmt.Sprintf(`ollamaflow_measuring_copies_total{backend="slow",frontend="%s"}`, currentHandler(t).Name)
	copies := max(scrape(t, metric), 0)

	fast.Hold(fakeollama.Completions...)
	held := make(chan string, 1)
	go func() { held <- ask("holds fast's slot") }()
	arrived(t, fast, path, 5)
	waiting := make(chan string, 1)
	go func() { waiting <- ask("waits for fast") }()

	arrived(t, slow, path, 2)
	copyReq, ok := slow.LastRequestTo(path)
	require.True(t, ok)
	content := gjson.GetBytes(copyReq.Body, "messages.0.content").String()
	assert.True(t, strings.HasPrefix(content, "[measure ") && strings.HasSuffix(content, "] waits for fast"),
		"a copy of the waiting request, a nonce first so no cache slot serves it: %q", content)
	assert.Equal(t, "false", gjson.GetBytes(copyReq.Body, "stream").Raw, "read by the proxy whole")
	capField := "options.num_predict"
	if openai {
		capField = "max_tokens"
	}
	assert.Equal(t, int64(copyTokens), gjson.GetBytes(copyReq.Body, capField).Int(), "its answer capped")
	assert.Eventually(t, func() bool { return scrape(t, metric) == copies+1 }, 2*time.Second, 5*time.Millisecond,
		"counted in ollamaflow_measuring_copies_total")

	// Once the copy's answer is in, a request that would wait for fast
	// goes to slow.
	srv := pooled(t, slow.URL)
	require.Eventually(t, func() bool {
		srv.speed.mu.Lock()
		defer srv.speed.mu.Unlock()
		return srv.speed.remeasureNow
	}, 2*time.Second, 5*time.Millisecond, "the copy answered in a quarter of the time believed")
	assert.Equal(t, "slow", ask("after the copy"), "the recovered server is used again")
	assert.Equal(t, 3, slow.Count(path))

	fast.Release()
	assert.Equal(t, "fast", <-held)
	assert.Contains(t, []string{"fast", "slow"}, <-waiting, "the copied request itself was answered")
}

// The pins that make a copy: every cap on both APIs parses.
func TestCopyPinsCapEveryLength(t *testing.T) {
	for n := 1; n <= copyTokens; n++ {
		native, err := copyPins(apiOllama, n).apply([]byte(`{"model":"m","options":{"num_predict":500},"stream":true}`))
		require.NoError(t, err)
		assert.Equal(t, int64(n), gjson.GetBytes(native, "options.num_predict").Int())
		assert.Equal(t, "false", gjson.GetBytes(native, "stream").Raw)
		openai, err := copyPins(apiOpenAI, n).apply([]byte(`{"model":"m","max_tokens":500,"stream":true}`))
		require.NoError(t, err)
		assert.Equal(t, int64(n), gjson.GetBytes(openai, "max_tokens").Int())
		assert.Equal(t, "false", gjson.GetBytes(openai, "stream").Raw)
	}
}

// A copy's prompt begins with a nonce where Ollama reads first, so no
// prompt cache serves any of it and its time is the server's (a server
// that recovered is learned from one copy, not six in a row); where the
// nonce cannot be put where Ollama will read it, the copy goes unchanged
// and is not taken as uncached.
func TestACopysPromptBeginsWithANonce(t *testing.T) {
	for _, c := range []struct {
		path, body string
		want       string // the gjson path Ollama reads first; "" none
	}{
		{"/api/chat", `{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`, "messages.0.content"},
		{"/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, "messages.0.content"},
		{"/api/generate", `{"model":"m","system":"be brief","prompt":"hi"}`, "system"},
		{"/api/generate", `{"model":"m","prompt":"hi"}`, "system"},
		{"/api/generate", `{"model":"m","raw":true,"prompt":"hi"}`, "prompt"},
		{"/v1/completions", `{"model":"m","prompt":"hi"}`, "prompt"},
		// Ollama's decoder matches keys without case and takes the last
		// duplicate: the nonce must land in the value it reads.
		{"/api/generate", `{"model":"m","SYSTEM":"be brief","prompt":"hi"}`, "system"},
		{"/api/chat", `{"model":"m","messages":[{"role":"user","content":"decoy"}],"messages":[{"role":"user","content":"hi"}]}`, ""},
		{"/api/chat", `{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}`, ""},
		{"/v1/completions", `{"model":"m","prompt":["a","b"]}`, ""},
		{"/api/chat", `{"model":"m","messages":[]}`, ""},
		{"/api/embed", `{"model":"m","input":"hi"}`, ""},
	} {
		got, uncached := uncacheable(c.path, []byte(c.body))
		if c.want == "" {
			// Either unchanged, or changed where Ollama reads it.
			if uncached {
				var v struct {
					Messages []struct{ Content string } `json:"messages"`
				}
				require.NoError(t, json.Unmarshal(got, &v), c.body)
				require.NotEmpty(t, v.Messages, c.body)
				assert.True(t, strings.HasPrefix(v.Messages[0].Content, "[measure "), "%s: Ollama reads %q", c.body, v.Messages[0].Content)
			} else {
				assert.Equal(t, c.body, string(got), "unchanged")
			}
			continue
		}
		require.True(t, uncached, c.body)
		var v map[string]any
		require.NoError(t, json.Unmarshal(got, &v), "still JSON: %s", got)
		read := ""
		switch c.want {
		case "messages.0.content":
			var m struct {
				Messages []struct{ Content string } `json:"messages"`
			}
			require.NoError(t, json.Unmarshal(got, &m))
			read = m.Messages[0].Content
		case "system":
			var m struct{ System string }
			require.NoError(t, json.Unmarshal(got, &m))
			read = m.System
		case "prompt":
			var m struct{ Prompt string }
			require.NoError(t, json.Unmarshal(got, &m))
			read = m.Prompt
		}
		assert.True(t, strings.HasPrefix(read, "[measure "), "%s %s: Ollama reads %q first", c.path, c.body, read)
		assert.Equal(t, 1, strings.Count(string(got), "[measure "), "one nonce: %s", got)
		again, _ := uncacheable(c.path, []byte(c.body))
		assert.NotEqual(t, string(got), string(again), "a new nonce each copy")
	}
}

// An uncached copy's prompt much faster than learned is the server now:
// one replaces the fit, where a client's request, which a cache may have
// served, needs cacheSuspectLimit in a row.
func TestAnUncachedCopyReLearnsAServerFasterAtPrompts(t *testing.T) {
	for _, uncached := range []bool{false, true} {
		b, clock := slowAtPrompts()
		j := &job{promptChars: 4 * 12, maxOutput: 1}
		clock = clock.Add(time.Second)
		serve(b, &job{copy: true, uncached: uncached}, clock, finalGen(100*ms, 0, 0, 0, 12, 1))
		d, _ := estimateDelay(b, j, clock)
		if uncached {
			assert.InDelta(t, 0.1, d.prompt, 0.01, "one uncached copy")
		} else {
			assert.InDelta(t, 0.3, d.prompt, 0.01, "a copy a cache may have served")
		}
	}
}
