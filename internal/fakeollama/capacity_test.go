package fakeollama_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

const chatNoStream = `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":false}`

func TestParallelSlotsAndMaxQueue(t *testing.T) {
	t.Parallel()
	const service = 300 * time.Millisecond
	f := newFake(t, fakeollama.Config{Parallel: 2, MaxQueue: 1, FirstByteDelay: service, Tokens: 1})

	type answer struct {
		status int
		body   string
		took   time.Duration
	}
	answers := make(chan answer, 3)
	start := time.Now()
	for range 3 {
		go func() {
			resp, body := post(t, f.URL+"/api/chat", chatNoStream)
			answers <- answer{resp.StatusCode, body, time.Since(start)}
		}()
	}
	require.Eventually(t, func() bool { return f.Busy() == 2 && f.Waiting() == 1 }, 5*time.Second, time.Millisecond)

	// Both slots taken, one waiting: the queue (MaxQueue 1) is full.
	resp, body := post(t, f.URL+"/api/chat", chatNoStream)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, fakeollama.ServerBusy, body, "Ollama's exact body, two spaces included")
	assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	resp, body = post(t, f.URL+"/v1/chat/completions", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"stream":true}`)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, `{"error":{"message":"server busy, please try again.  maximum pending requests exceeded","type":"api_error","param":null,"code":null}}`+"\n", body)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	assert.Equal(t, 2, f.Rejected())
	assert.Equal(t, 1, f.Queued(), "the third waited; the two rejected never queued")

	// Probes and model reads take no slot.
	resp, _ = do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	resp, _ = do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Equal(t, http.StatusOK, resp.StatusCode)

	var got []answer
	for range 3 {
		got = append(got, <-answers)
	}
	for _, a := range got {
		assert.Equal(t, http.StatusOK, a.status, a.body)
	}
	// Two served at once, the third after a slot freed: one service time later.
	slowest := max(got[0].took, got[1].took, got[2].took)
	assert.GreaterOrEqual(t, slowest, 2*service)
	assert.Less(t, slowest, 3*service)
	assert.Equal(t, 2, f.MaxBusy())
	assert.Zero(t, f.Busy())
	assert.Zero(t, f.Waiting())

	assert.Equal(t, 1, f.Queued(), "a request that waited counts once it got its slot")

	f.ResetStats()
	assert.Zero(t, f.Rejected())
	assert.Zero(t, f.Queued())
	assert.Zero(t, f.MaxBusy())
}

func TestNoQueueRejectsAtOnce(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Parallel: 1, MaxQueue: -1, FirstByteDelay: 300 * time.Millisecond})
	done := make(chan int)
	go func() {
		resp, _ := post(t, f.URL+"/api/embed", `{"model":"tiny-bert","input":"x"}`)
		done <- resp.StatusCode
	}()
	require.Eventually(t, func() bool { return f.Busy() == 1 }, 5*time.Second, time.Millisecond)
	start := time.Now()
	resp, body := post(t, f.URL+"/api/generate", `{"model":"tiny-llama","prompt":"x"}`)
	assert.Less(t, time.Since(start), 200*time.Millisecond, "no waiting with a negative MaxQueue")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "embeddings and completions share the slots")
	assert.Equal(t, fakeollama.ServerBusy, body)
	assert.Equal(t, http.StatusOK, <-done)
}

func TestWaitingClientThatLeavesFreesItsPlace(t *testing.T) {
	t.Parallel()
	// A long stream holds the only slot (Hold would act before the slot is taken).
	f := newFake(t, fakeollama.Config{Parallel: 1, MaxQueue: 1, Tokens: 1000, TokenGap: 10 * time.Millisecond})
	ctx1, cancel1 := context.WithCancel(context.Background())
	defer cancel1()
	go http.DefaultClient.Do(mustRequest(t, ctx1, f.URL+"/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"x"}]}`))
	require.Eventually(t, func() bool { return f.Busy() == 1 }, 5*time.Second, time.Millisecond)

	ctx2, cancel2 := context.WithCancel(context.Background())
	go http.DefaultClient.Do(mustRequest(t, ctx2, f.URL+"/api/chat", chatNoStream))
	require.Eventually(t, func() bool { return f.Waiting() == 1 }, 5*time.Second, time.Millisecond)
	cancel2()
	require.Eventually(t, func() bool { return f.Waiting() == 0 }, 5*time.Second, time.Millisecond, "a client that went away leaves the queue")
	require.Eventually(t, func() bool { return len(f.Cancellations()) == 1 }, 5*time.Second, time.Millisecond)
	assert.Zero(t, f.Cancellations()[0].Chunks)
	cancel1()
	require.Eventually(t, func() bool { return f.Busy() == 0 }, 5*time.Second, time.Millisecond, "the slot is given back when the client leaves")
}

func mustRequest(t *testing.T, ctx context.Context, url, body string) *http.Request {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	return req
}

func TestServiceTimeIsFirstByteDelayPlusTokenGaps(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{FirstByteDelay: 50 * time.Millisecond, Tokens: 5, TokenGap: 20 * time.Millisecond})
	start := time.Now()
	_, body := post(t, f.URL+"/api/chat", chatNoStream)
	took := time.Since(start)
	assert.GreaterOrEqual(t, took, 150*time.Millisecond, "50ms + 5 × 20ms")
	assert.Less(t, took, 400*time.Millisecond)
	m := decode(t, body)
	assert.GreaterOrEqual(t, m["eval_duration"], float64(100*time.Millisecond))
}

func TestFailAfter(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	f.FailAfter(50*time.Millisecond, http.StatusServiceUnavailable, fakeollama.ServerBusy)
	start := time.Now()
	resp, body := post(t, f.URL+"/api/chat", chatNoStream)
	assert.GreaterOrEqual(t, time.Since(start), 50*time.Millisecond)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, fakeollama.ServerBusy, body)
	resp, _ = do(t, http.MethodGet, f.URL+"/", "")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "everything fails, probes too")
}
