//go:build chaos

package ollamaflow

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// least_delay's service time must come from inference only: /api/show and a load-only chat
// (no messages: Ollama loads the model and answers at once) are not completions.
func TestChaosLeastDelayLearnsOnlyFromInference(t *testing.T) {
	fs, lines := chaosFakes(t, 1, fakeollama.Config{Tokens: 1, FirstByteDelay: 200 * time.Millisecond}, "")
	loadCaddy(t, lines)
	waitKnown(t, fs)
	o := chaosSend(context.Background(), "/api/chat", chaosChat, "")
	require.True(t, o.ok(), o.err)
	srv := pooled(t, fs[0].URL)
	// The handler learns after the last byte reached the client and frees
	// the slot after that: the client can read its answer first. Waiting
	// for the slot to be free is waiting for the lesson.
	settled := func() {
		require.Eventually(t, func() bool { return srv.inFlight.Load() == 0 }, 10*time.Second, time.Millisecond)
	}
	settled()
	typical := func() (float64, bool) {
		d, ok := srv.speed.estimate(&job{}, 0, 0, false, time.Now())
		return d.total(), ok
	}
	before, ok := typical()
	require.True(t, ok)
	for range 10 {
		res, body := post(t, "/api/show", `{"model":"tiny-llama"}`)
		require.Equal(t, 200, res.StatusCode, body)
		res, body = post(t, "/api/chat", `{"model":"tiny-llama","messages":[]}`)
		require.Equal(t, 200, res.StatusCode, body)
	}
	settled() // a wrong lesson from the last request would come before this
	after, _ := typical()
	t.Logf("learned service time: %.3fs after one 200 ms completion, %.3fs after 10 /api/show and 10 load-only chats", before, after)
	assert.InDelta(t, before, after, 0.05, "model reads and load-only requests taught least_delay a service time")
}
