package ollamaflow

import (
	"encoding/json"
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
)

// TestRequestsPerMinuteThroughCaddy: a backend at its requests_per_minute is
// skipped for the next one; when every backend is, the request queues, and
// (the window being a minute) queue_timeout ends its wait with a 503. The
// admin API shows the limit and the count.
func TestRequestsPerMinuteThroughCaddy(t *testing.T) {
	fs, lines := fakes(t, [][]string{{"tiny-llama"}, {"tiny-llama"}}, "requests_per_minute 2")
	loadCaddy(t, "name rate-test\nlb_policy first\nqueue_timeout 300ms\n"+lines)
	waitKnown(t, fs)

	var got []string
	for range 4 {
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		got = append(got, res.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Equal(t, []string{"a", "a", "b", "b"}, got, "a at its rate is skipped like one at its cap")

	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	assert.Equal(t, http.StatusServiceUnavailable, res.StatusCode, body)
	assert.Contains(t, gjson.Get(body, "error").String(), "queue_timeout")
	assert.NotEmpty(t, res.Header.Get("Retry-After"))
	for _, f := range fs {
		chats := 0
		for _, r := range f.Requests() {
			if r.Path == "/api/chat" {
				chats++
			}
		}
		assert.Equal(t, 2, chats, "each fake saw exactly what its rate let through")
	}

	status, raw := adminGet(t, "/ollamaflow/backends/a")
	require.Equal(t, http.StatusOK, status, string(raw))
	var a backendJSON
	require.NoError(t, json.Unmarshal(raw, &a))
	assert.Equal(t, map[string]int{"rate-test": 2}, a.RateLimits, string(raw))
	if assert.NotNil(t, a.StartedRecent, string(raw)) {
		assert.Equal(t, 2, *a.StartedRecent)
	}
}
