package ollamaflow

import (
	"errors"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics live in Caddy's Prometheus registry (served at the admin
// endpoint's /metrics). The collectors are created once and registered into
// each config's registry, so counters survive reloads; gauges of live state
// (health, in-flight, queues) are read from the pool at scrape time.
//
// The model label only ever carries a model a backend served (or that the
// frontend allows): names a client made up never become label values.
var metrics = struct {
	requests  *prometheus.CounterVec
	retries   *prometheus.CounterVec
	firstByte *prometheus.HistogramVec
	tokens    *prometheus.CounterVec
	coldLoads *prometheus.CounterVec
	queueWait *prometheus.HistogramVec
	pulls     *prometheus.CounterVec
	// responsesCut counts responses ended after their first byte, by reason.
	responsesCut *prometheus.CounterVec
	// Per tenant: names come from the config, so cardinality is bounded.
	tenantRequests *prometheus.CounterVec
	tenantTokens   *prometheus.CounterVec
	affinity       *prometheus.CounterVec
	// measuringCopies counts copies of requests sent to re-measure a
	// server believed slow (measurecopy.go).
	measuringCopies *prometheus.CounterVec
	// loadCopies counts copies of requests sent to load a model where
	// demand placement wants a copy of it (loadcopy.go).
	loadCopies *prometheus.CounterVec
	liveState  prometheus.Collector
}{
	requests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "requests_total",
		Help: "Requests answered, by frontend, backend (none when answered by the proxy itself), model, type and status code.",
	}, []string{"frontend", "backend", "model", "type", "code"}),
	retries: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "retries_total",
		Help: "Attempts that failed before the first byte and moved the request to another backend, by the backend that failed.",
	}, []string{"frontend", "backend"}),
	firstByte: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "ollamaflow", Name: "time_to_first_byte_seconds",
		Help:    "Time from sending a request to a backend to its response headers (model load and prompt evaluation included).",
		Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300},
	}, []string{"frontend", "backend", "model"}),
	tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "tokens_total",
		Help: "Tokens processed, from Ollama's final counts or OpenAI usage; direction is prompt or completion.",
	}, []string{"frontend", "backend", "model", "direction"}),
	coldLoads: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "cold_loads_total",
		Help: "Completions that loaded their model: load_duration the cost model attributes to a load (the model was not resident, or was evicted), whatever its size.",
	}, []string{"frontend", "backend", "model"}),
	queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "ollamaflow", Name: "queue_wait_seconds",
		Help:    "Time requests waited in the frontend's queue for a backend slot.",
		Buckets: []float64{0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
	}, []string{"frontend"}),
	pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "pulls_total",
		Help: "Pulls of required models, by outcome (success or failure).",
	}, []string{"backend", "model", "outcome"}),
	responsesCut: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "responses_cut_total",
		Help: "Responses ended after their first byte: backend_failed (connection broke), stream_idle_timeout, response_timeout (the client got an error in the stream, or an aborted body) and client_write_timeout (the client stopped reading).",
	}, []string{"frontend", "backend", "reason"}),
	tenantRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "tenant_requests_total",
		Help: "Requests of each tenant, by status code (429 for its limits, 403 for its policy).",
	}, []string{"frontend", "tenant", "code"}),
	tenantTokens: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "tenant_tokens_total",
		Help: "Tokens of each tenant's answers, from Ollama's final counts or OpenAI usage; direction is prompt or completion.",
	}, []string{"frontend", "tenant", "model", "direction"}),
	affinity: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "affinity_total",
		Help: "Completions whose conversation was looked up for affinity, by outcome: hit (sent to the server of its previous turn), overflow (that server was busy or much slower: the policy chose) or miss (a conversation not seen before).",
	}, []string{"frontend", "outcome"}),
	measuringCopies: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "measuring_copies_total",
		Help: "Copies of waiting requests sent to re-measure an idle server least_delay believes slow, their answers read by the proxy alone (capped output, not streamed).",
	}, []string{"frontend", "backend"}),
	loadCopies: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "ollamaflow", Name: "load_copies_total",
		Help: "Copies of requests sent to load a model on a server where demand placement wants a copy of it, so that no client waits for the load (one token, not streamed, read by the proxy alone).",
	}, []string{"frontend", "backend", "model"}),
	liveState: liveStateCollector{},
}

// registerMetrics adds the collectors to a config's registry; every
// handler of a config calls it, and the second time is a no-op. (No record
// of registries is kept: that would hold every old config's registry.)
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{metrics.requests, metrics.retries, metrics.firstByte,
		metrics.tokens, metrics.coldLoads, metrics.queueWait, metrics.pulls, metrics.responsesCut,
		metrics.tenantRequests, metrics.tenantTokens, metrics.affinity, metrics.measuringCopies, metrics.loadCopies, metrics.liveState} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

var (
	descHealthy = prometheus.NewDesc("ollamaflow_backend_healthy",
		"1 if the backend is healthy (or not yet probed), 0 if it is down.", []string{"frontend", "backend"}, nil)
	descInFlight = prometheus.NewDesc("ollamaflow_backend_in_flight",
		"Requests in flight on the backend's server, from every frontend.", []string{"frontend", "backend"}, nil)
	descDraining = prometheus.NewDesc("ollamaflow_backend_draining",
		"1 if the backend is draining.", []string{"frontend", "backend"}, nil)
	descQueue = prometheus.NewDesc("ollamaflow_queue_length",
		"Requests waiting in the frontend's queue for a backend slot.", []string{"frontend"}, nil)
	descBodyMemory = prometheus.NewDesc("ollamaflow_body_memory_bytes",
		"Bytes of request bodies held in memory now, by every frontend of the process (max_body_memory).", nil, nil)
	descBodyMemoryLimit = prometheus.NewDesc("ollamaflow_body_memory_limit_bytes",
		"The process-wide budget for request bodies in memory: the largest max_body_memory of the live frontends.", nil, nil)
)

// liveStateCollector reads health, in-flight counts and queues from the
// live handlers at scrape time.
type liveStateCollector struct{}

func (liveStateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descHealthy
	ch <- descInFlight
	ch <- descDraining
	ch <- descQueue
	ch <- descBodyMemory
	ch <- descBodyMemoryLimit
}

func (liveStateCollector) Collect(ch chan<- prometheus.Metric) {
	used, _, limit := bodyMemory.state()
	ch <- prometheus.MustNewConstMetric(descBodyMemory, prometheus.GaugeValue, float64(used))
	ch <- prometheus.MustNewConstMetric(descBodyMemoryLimit, prometheus.GaugeValue, float64(limit))
	seen := map[[2]string]bool{}
	for _, h := range liveFrontends() {
		// During a reload the old and the new handler are both live;
		// report each frontend/backend pair once (the newest config's).
		if seen[[2]string{h.Name, ""}] {
			continue
		}
		seen[[2]string{h.Name, ""}] = true
		ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(h.queue.length()), h.Name)
		for _, b := range h.pool() {
			healthy := 0.0
			if b.healthy() {
				healthy = 1
			}
			draining := 0.0
			if b.srv.draining.Load() {
				draining = 1
			}
			ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, healthy, h.Name, b.cfg.Name)
			ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(b.srv.inFlight.Load()), h.Name, b.cfg.Name)
			ch <- prometheus.MustNewConstMetric(descDraining, prometheus.GaugeValue, draining, h.Name, b.cfg.Name)
		}
	}
}

// statusWriter remembers the status a handler wrote, for the request
// counter. Unwrap keeps flushing and hijacking reachable.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countRequest records one answered request.
func (h *Handler) countRequest(w *statusWriter, kind routeKind, model string) {
	backend := w.Header().Get("X-OllamaFlow-Backend")
	status := w.status
	if status == 0 {
		status = 499 // the client went away before anything was written
	}
	if backend == "" {
		backend = "none"
	}
	if (backend == "none" || status >= 400) && (h.models == nil || !h.modelAllowed(model)) {
		model = "" // not served: the name may be made up by the client
	}
	metrics.requests.WithLabelValues(h.Name, backend, model, kind.String(), strconv.Itoa(status)).Inc()
	if h.stats != nil {
		h.stats.requests.Add(1)
		if status >= 500 {
			h.stats.errors.Add(1)
		}
	}
}

// recordFinalCounts reads the counts in the last chunk of a response and
// returns the token counts it found (-1: not in the answer).
func (h *Handler) recordFinalCounts(b *backend, model string, tail *tailKeeper, loaded bool) (prompt, completion int64) {
	prompt, completion = tail.number("prompt_eval_count"), tail.number("eval_count")
	if prompt < 0 && completion < 0 {
		prompt, completion = tail.number("prompt_tokens"), tail.number("completion_tokens")
	}
	if n := max(prompt, 0) + max(completion, 0); n > 0 {
		b.srv.stats.tokens.Add(n)
		if h.stats != nil {
			h.stats.tokens.Add(n)
		}
	}
	if prompt > 0 {
		metrics.tokens.WithLabelValues(h.Name, b.cfg.Name, model, "prompt").Add(float64(prompt))
	}
	if completion > 0 {
		metrics.tokens.WithLabelValues(h.Name, b.cfg.Name, model, "completion").Add(float64(completion))
	}
	if loaded {
		metrics.coldLoads.WithLabelValues(h.Name, b.cfg.Name, model).Inc()
		b.srv.stats.coldLoads.Add(1)
		if h.stats != nil {
			h.stats.coldLoads.Add(1)
		}
	}
	return prompt, completion
}
