package ollamaflow

import (
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// requestInfo is what serve learned about a request, for the metrics, the
// placeholders and the span Caddy's tracing handler started.
type requestInfo struct {
	kind     routeKind
	api      apiFormat
	model    string        // the normalised model the proxy decided
	backend  string        // the backend of the last attempt
	attempts int           // attempts made on backends
	sticky   string        // X-OllamaFlow-Sticky's value, when sticky is on
	tenant   *Tenant       // the tenant the request named (nil: tenancy off, or none)
	admitted bool          // the tenant's limits let it in: it holds a max_parallel place
	route    string        // X-OllamaFlow-Route's value, when proxied
	ttfb     time.Duration // time to the backend's response headers, last attempt
	// Token counts from the answer's final counts; -1 when unknown.
	inputTokens, outputTokens int64
}

// Placeholder names, set per request so access logs (log_append, a log
// format) and later handlers (header, respond) can use them.
const (
	placeholderBackend = "http.ollamaflow.backend"
	placeholderModel   = "http.ollamaflow.model"
	placeholderTenant  = "http.ollamaflow.tenant"
)

// setPlaceholder sets a placeholder in the request's replacer, the one
// Caddy's access log and every handler of the route read.
func setPlaceholder(r *http.Request, key, value string) {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set(key, value)
	}
}

// annotateSpan adds what the request was to the span in its context, if
// one records (Caddy's tracing directive); without tracing it costs one
// interface call.
func (h *Handler) annotateSpan(r *http.Request, status int, info *requestInfo) {
	span := trace.SpanFromContext(r.Context())
	if !span.IsRecording() {
		return
	}
	api := "ollama"
	if info.api == apiOpenAI {
		api = "openai"
	}
	attrs := make([]attribute.KeyValue, 0, 12)
	attrs = append(attrs,
		attribute.String("ollamaflow.frontend", h.Name),
		attribute.String("ollamaflow.request_kind", info.kind.String()),
		attribute.String("ollamaflow.api", api),
	)
	if status != 0 {
		attrs = append(attrs, attribute.Int("http.response.status_code", status))
	}
	if info.model != "" {
		attrs = append(attrs, attribute.String("gen_ai.request.model", info.model))
	}
	if info.attempts > 0 {
		attrs = append(attrs,
			attribute.String("ollamaflow.backend", info.backend),
			attribute.Int("ollamaflow.attempts", info.attempts),
			attribute.Int("ollamaflow.retries", info.attempts-1),
			attribute.Float64("ollamaflow.time_to_first_byte_ms", float64(info.ttfb.Microseconds())/1000),
		)
	}
	if info.tenant != nil {
		attrs = append(attrs, attribute.String("ollamaflow.tenant", info.tenant.Name))
	}
	if info.route != "" {
		attrs = append(attrs, attribute.String("ollamaflow.route", info.route))
	}
	if info.sticky != "" {
		attrs = append(attrs, attribute.String("ollamaflow.sticky", info.sticky))
	}
	if info.inputTokens >= 0 {
		attrs = append(attrs, attribute.Int64("gen_ai.usage.input_tokens", info.inputTokens))
	}
	if info.outputTokens >= 0 {
		attrs = append(attrs, attribute.Int64("gen_ai.usage.output_tokens", info.outputTokens))
	}
	span.SetAttributes(attrs...)
}

// traceAttempt records one attempt on the span as an event, so a retried
// request shows every backend it went to and why it moved on.
func traceAttempt(r *http.Request, backend, cause string) {
	span := trace.SpanFromContext(r.Context())
	if !span.IsRecording() {
		return
	}
	attrs := []attribute.KeyValue{attribute.String("ollamaflow.backend", backend)}
	if cause != "" {
		attrs = append(attrs, attribute.String("ollamaflow.failure", cause))
	}
	span.AddEvent("ollamaflow.attempt", trace.WithAttributes(attrs...))
}
