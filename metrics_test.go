package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// BenchmarkMetricsScrape measures one scrape of the module's collectors
// with 50 backends on a frontend, each with request, token and TTFB
// series for two models, as Caddy's /metrics handler gathers them.
//
//	go test -run '^$' -bench MetricsScrape -benchmem .
func BenchmarkMetricsScrape(b *testing.B) {
	var backends []string
	for i := 0; i < 50; i++ {
		backends = append(backends, fmt.Sprintf(`{"name":"b%d","url":"127.0.0.1:%d","health_interval":"1h"}`, i, 20000+i))
	}
	var h Handler
	require.NoError(b, json.Unmarshal([]byte(`{"name":"bench","backends":[`+strings.Join(backends, ",")+`]}`), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	require.NoError(b, h.Provision(ctx))
	defer h.Cleanup()
	reg := prometheus.NewRegistry()
	require.NoError(b, registerMetrics(reg))
	for _, be := range h.backends {
		for _, m := range []string{"llama3:latest", "nomic-embed-text:latest"} {
			metrics.requests.WithLabelValues("bench", be.cfg.Name, m, "completion", "200").Add(10)
			metrics.tokens.WithLabelValues("bench", be.cfg.Name, m, "completion").Add(100)
			metrics.firstByte.WithLabelValues("bench", be.cfg.Name, m).Observe(0.2)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		mfs, err := reg.Gather()
		if err != nil || len(mfs) == 0 {
			b.Fatal(err)
		}
	}
}

// retries_total counts retries that happened: an attempt that failed with
// no other backend left to try is not one.
func TestRetriesCountOnlyRetriesThatHappen(t *testing.T) {
	// Probes pass; every chat is cut before any answer (a connection error).
	cutter := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/chat" {
			if r.URL.Path == "/api/tags" {
				fmt.Fprint(w, `{"models":[{"name":"tiny-llama:latest","model":"tiny-llama:latest"}]}`)
				return
			}
			if r.URL.Path == "/api/ps" {
				fmt.Fprint(w, `{"models":[]}`)
			}
			return
		}
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	defer cutter.Close()
	good := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer good.Close()

	const metric = `ollamaflow_retries_total{backend="cutter",frontend="retries-test"}`
	loadCaddy(t, fmt.Sprintf("name retries-test\nlb_policy first\nretries 1\nbackend cutter %s {\n\tfail_threshold 100\n}", cutter.URL))
	before := max(scrape(t, metric), 0)
	waitHealthy(t, cutter.URL, stateHealthy)
	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusBadGateway, res.StatusCode, body)
	assert.Equal(t, before, max(scrape(t, metric), 0), "a failure with nobody left to try is no retry")

	loadCaddy(t, fmt.Sprintf("name retries-test\nlb_policy first\nretries 1\nbackend cutter %s {\n\tfail_threshold 100\n}\nbackend good %s", cutter.URL, good.URL))
	waitHealthy(t, good.URL, stateHealthy)
	waitKnown(t, []*fakeollama.Server{good})
	res, body = post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "good", res.Header.Get("X-OllamaFlow-Backend"))
	assert.Equal(t, before+1, scrape(t, metric), "the retry on good")
}
