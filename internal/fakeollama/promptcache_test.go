package fakeollama_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// chatTurn posts a non-streamed /api/chat with msgs and returns the answer's text and metrics.
func chatTurn(t *testing.T, url string, msgs []map[string]string) (string, map[string]any) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"model": "tiny-llama", "messages": msgs, "stream": false})
	require.NoError(t, err)
	resp, body := post(t, url+"/api/chat", string(b))
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	m := decode(t, body)
	return m["message"].(map[string]any)["content"].(string), m
}

func TestPromptCacheFollowUpTurnEvaluatesOnlyNewMessages(t *testing.T) {
	t.Parallel()
	const cost = time.Millisecond
	f := newFake(t, fakeollama.Config{Parallel: 2, Tokens: 4, PromptTokenCost: cost})
	system := strings.Repeat("you are a helpful assistant ", 10) // 50 tokens
	msgs := []map[string]string{{"role": "system", "content": system}, {"role": "user", "content": "why is the sky blue"}}

	answer, m1 := chatTurn(t, f.URL, msgs)
	assert.EqualValues(t, 55, m1["prompt_eval_count"])
	assert.GreaterOrEqual(t, m1["prompt_eval_duration"].(float64), float64(55*cost), "every token evaluated")
	st := f.PromptCacheStats()
	assert.Equal(t, fakeollama.CacheStats{Lookups: 1, PromptTokens: 55, EvaluatedTokens: 55}, st)

	// The next turn sends the conversation back with the answer and a new question: the slot
	// holds the prompt and the answer, so only the new question is evaluated.
	msgs = append(msgs, map[string]string{"role": "assistant", "content": answer}, map[string]string{"role": "user", "content": "and at night"})
	_, m2 := chatTurn(t, f.URL, msgs)
	assert.EqualValues(t, 55+4+3, m2["prompt_eval_count"], "the whole prompt is counted, cached or not")
	st = f.PromptCacheStats()
	assert.Equal(t, fakeollama.CacheStats{Lookups: 2, Hits: 1, PromptTokens: 55 + 62, CachedTokens: 59, EvaluatedTokens: 55 + 3}, st)
	assert.InDelta(t, 59.0/117, st.HitRate(), 1e-9)
	assert.GreaterOrEqual(t, m2["prompt_eval_duration"].(float64), float64(3*cost))

	// The same prompt again: everything is cached but the last token, as in Ollama.
	_, _ = chatTurn(t, f.URL, msgs)
	st = f.PromptCacheStats()
	assert.Equal(t, 2, st.Hits)
	assert.Equal(t, 55+3+1, st.EvaluatedTokens)

	// A case variant of a message is another prompt: it shares the system prompt only.
	msgs[1]["content"] = "Why is the sky blue"
	_, _ = chatTurn(t, f.URL, msgs)
	st = f.PromptCacheStats()
	assert.Equal(t, 55+3+1+(62-50), st.EvaluatedTokens)

	// The counters over HTTP, on the fake's own debug path.
	resp, body := do(t, http.MethodGet, f.URL+fakeollama.CachePath, "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	d := decode(t, body)
	assert.EqualValues(t, st.Lookups, d["lookups"])
	assert.EqualValues(t, st.Hits, d["hits"])
	assert.EqualValues(t, st.EvaluatedTokens, d["evaluated_tokens"])
	assert.EqualValues(t, st.CachedTokens, d["cached_tokens"])
	assert.EqualValues(t, st.PromptTokens, d["prompt_tokens"])

	f.ResetStats()
	assert.Equal(t, fakeollama.CacheStats{}, f.PromptCacheStats())
}

func TestPromptCacheTakesTheSlotWithTheLongestPrefix(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Parallel: 2, Tokens: 2, TokenGap: time.Second})
	a := []map[string]string{{"role": "user", "content": "alpha beta gamma delta"}}
	b := []map[string]string{{"role": "user", "content": "one two three four five six"}}

	// Conversation a is generating (it holds its cache slot) when b arrives: b takes the other
	// slot. One after the other, b would have taken a's slot (both share nothing with b, and
	// the lowest wins), as in Ollama.
	body, err := json.Marshal(map[string]any{"model": "tiny-llama", "messages": a})
	require.NoError(t, err)
	resp, err := http.Post(f.URL+"/api/chat", "application/json", strings.NewReader(string(body)))
	require.NoError(t, err)
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	first, err := r.ReadBytes('\n')
	require.NoError(t, err)
	ansB, _ := chatTurn(t, f.URL, b)
	rest, err := io.ReadAll(r)
	require.NoError(t, err)
	var ansA string
	for _, l := range append([][]byte{first}, bytes.Split(bytes.TrimSpace(rest), []byte("\n"))...) {
		ansA += decode(t, string(l))["message"].(map[string]any)["content"].(string)
	}
	require.Equal(t, fakeollama.Text(2), ansA)

	// Each follow-up finds its own conversation, whichever slot holds it.
	f2 := []map[string]string{{"role": "assistant", "content": ansA}, {"role": "user", "content": "more"}}
	chatTurn(t, f.URL, append(append(b, map[string]string{"role": "assistant", "content": ansB}), f2[1]))
	chatTurn(t, f.URL, append(a, f2...))
	st := f.PromptCacheStats()
	assert.Equal(t, 2, st.Hits)
	assert.Equal(t, 4+6+1+1, st.EvaluatedTokens, "each follow-up evaluates only its new message")
}

func TestPromptCacheGenerateContextAndReload(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Parallel: 1, Tokens: 3})
	resp, body := post(t, f.URL+"/api/generate", `{"model":"tiny-llama","system":"be brief","prompt":"hello there","stream":false}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	g := decode(t, body)
	assert.EqualValues(t, 4, g["prompt_eval_count"])
	ctx := g["context"].([]any)
	assert.Len(t, ctx, 4+3, "the prompt and the answer")

	// A follow-up sending the context back evaluates only its own prompt.
	next, err := json.Marshal(map[string]any{"model": "tiny-llama", "context": ctx, "prompt": "and you", "stream": false})
	require.NoError(t, err)
	resp, body = post(t, f.URL+"/api/generate", string(next))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.EqualValues(t, 7+2, decode(t, body)["prompt_eval_count"])
	st := f.PromptCacheStats()
	assert.Equal(t, 1, st.Hits)
	assert.Equal(t, 7, st.CachedTokens)
	assert.Equal(t, 4+2, st.EvaluatedTokens)

	// An embedding takes the slot without reusing it: the conversation is gone from it.
	resp, _ = post(t, f.URL+"/api/embed", `{"model":"tiny-llama","input":"x"}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp, _ = post(t, f.URL+"/api/generate", string(next))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, 7, f.PromptCacheStats().CachedTokens, "nothing more was reused")

	// A model loaded again starts with empty slots.
	resp, _ = post(t, f.URL+"/api/generate", string(next))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	cached := f.PromptCacheStats().CachedTokens
	assert.Greater(t, cached, 7)
	f.SetLoaded()
	resp, _ = post(t, f.URL+"/api/generate", string(next))
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, cached, f.PromptCacheStats().CachedTokens)
}

func TestPromptCacheOneAfterAnotherSharesSlotZeroUnlessMultiUser(t *testing.T) {
	t.Parallel()
	for _, multi := range []bool{false, true} {
		f := newFake(t, fakeollama.Config{Parallel: 2, Tokens: 1, MultiUserCache: multi})
		a := []map[string]string{{"role": "user", "content": "alpha beta gamma"}}
		b := []map[string]string{{"role": "user", "content": "one two three four"}}
		ansA, _ := chatTurn(t, f.URL, a)
		ansB, _ := chatTurn(t, f.URL, b)
		chatTurn(t, f.URL, append(a, map[string]string{"role": "assistant", "content": ansA}, map[string]string{"role": "user", "content": "more"}))
		chatTurn(t, f.URL, append(b, map[string]string{"role": "assistant", "content": ansB}, map[string]string{"role": "user", "content": "more"}))
		st := f.PromptCacheStats()
		if multi {
			// Each conversation kept its own slot.
			assert.Equal(t, 2, st.Hits)
			assert.Equal(t, 3+4+1+1, st.EvaluatedTokens)
		} else {
			// b took slot 0 from a (nothing shared, the lowest wins); a's follow-up then took
			// it back from b: neither follow-up found its conversation.
			assert.Equal(t, 0, st.Hits)
			assert.Equal(t, 3+4+5+6, st.EvaluatedTokens)
		}
	}
}
