package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
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
