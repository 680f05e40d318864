package ollamaflow

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func TestRendezvousSpreadsEvenly(t *testing.T) {
	list := []*backend{testBackend("a", nil), testBackend("b", nil), testBackend("c", nil), testBackend("d", nil)}
	counts := map[string]int{}
	for i := 0; i < 1000; i++ {
		counts[rendezvous(list, fmt.Sprintf("h:conversation-%d", i)).cfg.Name]++
	}
	t.Logf("1000 keys over 4 backends: %v", counts)
	for name, n := range counts {
		assert.InDelta(t, 250, n, 250*0.15, "backend %s got %d of 1000 keys", name, n)
	}
	assert.Len(t, counts, 4)
}

func TestRendezvousMovesOnlyTheLostBackendsKeys(t *testing.T) {
	a, b, c, d := testBackend("a", nil), testBackend("b", nil), testBackend("c", nil), testBackend("d", nil)
	before := map[string]string{}
	for i := 0; i < 1000; i++ {
		k := fmt.Sprintf("h:%d", i)
		before[k] = rendezvous([]*backend{a, b, c, d}, k).cfg.Name
	}
	moved := 0
	for k, was := range before {
		now := rendezvous([]*backend{a, b, d}, k).cfg.Name // c is gone
		if was == "c" {
			moved++
			assert.NotEqual(t, "c", now)
			continue
		}
		assert.Equal(t, was, now, "key %s moved though its backend stayed", k)
	}
	assert.Positive(t, moved)
	t.Logf("removing c moved %d of 1000 keys, all of them c's", moved)
	// Order of the candidates does not matter: every instance agrees.
	for k, was := range before {
		assert.Equal(t, was, rendezvous([]*backend{d, c, b, a}, k).cfg.Name)
	}
}

func TestRendezvousHonoursWeight(t *testing.T) {
	heavy := testBackend("heavy", func(c *Backend) { c.Weight = 3 })
	light := testBackend("light", nil)
	counts := map[string]int{}
	for i := 0; i < 4000; i++ {
		counts[rendezvous([]*backend{heavy, light}, fmt.Sprint(i)).cfg.Name]++
	}
	assert.InDelta(t, 3000, counts["heavy"], 200)
}

func TestIntegrationStickySessions(t *testing.T) {
	var fs []*fakeollama.Server
	var lines []string
	for _, name := range []string{"a", "b", "c", "d"} {
		f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
		defer f.Close()
		fs = append(fs, f)
		lines = append(lines, fmt.Sprintf("backend %s %s {\n max_parallel 1\n}", name, f.URL))
	}
	loadCaddy(t, fmt.Sprintf("sticky {\n headers x-conversation-id x-thread-id\n}\n%s", strings.Join(lines, "\n")))
	waitKnown(t, fs)

	home := map[string]string{}
	for i := 0; i < 20; i++ {
		key := fmt.Sprintf("conv-%d", i)
		for j := 0; j < 5; j++ {
			res, body := post(t, "/api/chat", chatFor("tiny-llama"), "X-Thread-Id", key)
			require.Equal(t, http.StatusOK, res.StatusCode, body)
			assert.Equal(t, "hit", res.Header.Get("X-OllamaFlow-Sticky"))
			got := res.Header.Get("X-OllamaFlow-Backend")
			if home[key] == "" {
				home[key] = got
			}
			assert.Equal(t, home[key], got, "conversation %s moved", key)
		}
	}
	res, _ := post(t, "/api/chat", chatFor("tiny-llama"))
	assert.Equal(t, "none", res.Header.Get("X-OllamaFlow-Sticky"))

	// The session's server at its cap: the request overflows to another.
	key := "conv-0"
	idx := int(home[key][0] - 'a')
	fs[idx].Hold("/api/chat")
	done := make(chan struct{})
	go func() {
		defer close(done)
		post(t, "/api/chat", chatFor("tiny-llama"), "X-Conversation-Id", key)
	}()
	require.Eventually(t, func() bool { return fs[idx].InFlight() == 1 }, 5e9, 5e6)
	res, body := post(t, "/api/chat", chatFor("tiny-llama"), "X-Conversation-Id", key)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "overflow", res.Header.Get("X-OllamaFlow-Sticky"))
	assert.NotEqual(t, home[key], res.Header.Get("X-OllamaFlow-Backend"))
	fs[idx].Release()
	<-done
}

func TestStickyKey(t *testing.T) {
	h := &Handler{Sticky: &StickyConfig{Headers: []string{"X-Conversation-Id", "X-Thread-Id"}, ClientIP: true}}
	r := httptest.NewRequest("POST", "/api/chat", nil)
	r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{caddyhttp.ClientIPVarKey: "203.0.113.9"}))
	assert.Equal(t, "ip:203.0.113.9", h.stickyKey(r), "no header: the client IP")
	r.Header.Set("X-Thread-Id", "t1")
	assert.Equal(t, "h:t1", h.stickyKey(r))
	r.Header.Set("X-Conversation-Id", "c1")
	assert.Equal(t, "h:c1", h.stickyKey(r), "the first configured header wins")
	h.Sticky.ClientIP = false
	r.Header = http.Header{}
	assert.Empty(t, h.stickyKey(r), "no key: no stickiness")
}
