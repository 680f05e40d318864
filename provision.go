package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"
)

// Provision and Cleanup: a frontend's config checked and completed, its
// servers taken from the pool (or made), its queue, and the settings the
// pooled servers adopt once the config has started.

// Provision applies defaults, builds the per-frontend view of each backend
// and takes a reference to each server's shared live state.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Name == "" {
		h.Name = defaultName
	}
	if h.LBPolicy == "" {
		h.LBPolicy = defaultPolicy
	}
	policy, ok := policies[h.LBPolicy]
	if !ok {
		return fmt.Errorf("lb_policy: unknown policy %q (want one of %s)", h.LBPolicy, policyNames())
	}
	h.policy = policy
	h.remeasures = h.LBPolicy == "least_delay"
	h.retries = defaultRetries
	if h.Retries != nil {
		if *h.Retries < 0 {
			return fmt.Errorf("retries: must not be negative, got %d", *h.Retries)
		}
		h.retries = *h.Retries
	}
	if h.MaxRequestBody < 0 {
		return fmt.Errorf("max_request_body: must not be negative, got %d", h.MaxRequestBody)
	}
	if h.MaxRequestBody == 0 {
		h.MaxRequestBody = defaultMaxRequestBody
	}
	if h.MaxBodyMemory < 0 {
		return fmt.Errorf("max_body_memory: must not be negative, got %d", h.MaxBodyMemory)
	}
	h.maxBodyMemory = h.MaxBodyMemory
	if h.maxBodyMemory == 0 {
		h.maxBodyMemory = defaultMaxBodyMemory
	}
	if h.MaxRequestBody > h.maxBodyMemory {
		return fmt.Errorf("max_body_memory: %d bytes cannot hold one body of max_request_body (%d bytes); raise it or lower max_request_body", h.maxBodyMemory, h.MaxRequestBody)
	}
	for opt, d := range map[string]*caddy.Duration{
		"dial_timeout":         &h.DialTimeout,
		"first_byte_timeout":   &h.FirstByteTimeout,
		"stream_idle_timeout":  &h.StreamIdleTimeout,
		"queue_timeout":        &h.QueueTimeout,
		"response_timeout":     &h.ResponseTimeout,
		"client_write_timeout": &h.ClientWriteTimeout,
	} {
		if *d < 0 {
			return fmt.Errorf("%s: must not be negative, got %s", opt, time.Duration(*d))
		}
	}
	if h.DialTimeout == 0 {
		h.DialTimeout = caddy.Duration(defaultDialTimeout)
	}
	if h.FirstByteTimeout == 0 {
		h.FirstByteTimeout = caddy.Duration(defaultFirstByteTimeout)
	}
	if h.StreamIdleTimeout == 0 {
		h.StreamIdleTimeout = caddy.Duration(defaultStreamIdleTimeout)
	}
	if h.ResponseTimeout == 0 {
		h.ResponseTimeout = caddy.Duration(defaultResponseTimeout)
	}
	if h.ClientWriteTimeout == 0 {
		h.ClientWriteTimeout = caddy.Duration(defaultClientWriteTimeout)
	}
	if h.QueueTimeout == 0 {
		h.QueueTimeout = caddy.Duration(defaultQueueTimeout)
	}
	if h.MaxQueue < 0 {
		return fmt.Errorf("max_queue: must not be negative, got %d", h.MaxQueue)
	}
	h.maxQueue = h.MaxQueue
	if h.maxQueue == 0 {
		h.maxQueue = defaultMaxQueue
	}
	if h.MaxQueuePerClient < 0 {
		return fmt.Errorf("max_queue_per_client: must not be negative, got %d", h.MaxQueuePerClient)
	}
	h.maxQueuePerClient = h.MaxQueuePerClient
	if h.maxQueuePerClient == 0 {
		h.maxQueuePerClient = max(1, h.maxQueue/4)
	}
	h.allowEmbed = h.AllowEmbeddings == nil || *h.AllowEmbeddings
	h.allowCompl = h.AllowCompletions == nil || *h.AllowCompletions
	h.labelHeader = h.LabelHeader
	if h.labelHeader == "" {
		h.labelHeader = defaultLabelHeader
	}
	h.labels = normalizeLabels(h.Labels)
	if err := h.provisionPins(); err != nil {
		return err
	}
	if len(h.Models) > 0 {
		h.models = make(map[string]struct{}, len(h.Models))
		for _, m := range h.Models {
			if strings.TrimSpace(m) == "" {
				return errors.New("models: empty model name")
			}
			h.models[normalizeModel(m)] = struct{}{}
		}
	}
	if h.Tenants != nil {
		if err := h.Tenants.provision(h); err != nil {
			return err
		}
	}
	if h.Sticky != nil && len(h.Sticky.Headers) == 0 && !h.Sticky.ClientIP {
		return errors.New("sticky: name at least one header, or client_ip")
	}
	cors, err := newCORSPolicy(h.CORSOrigins, h.corsRequestHeaders())
	if err != nil {
		return fmt.Errorf("cors_origins: %w", err)
	}
	h.cors = cors
	if err := h.provisionExplorer(); err != nil {
		return err
	}
	var required []requiredModel
	for _, m := range h.RequiredModels {
		if strings.TrimSpace(m) == "" {
			return errors.New("required_models: empty model name")
		}
		required = append(required, requiredModel{name: strings.TrimSpace(m), key: normalizeModel(m), insecure: h.InsecurePulls})
	}
	if len(h.Backends) == 0 && len(h.BackendsFrom) == 0 {
		return errors.New("backends: a frontend needs at least one backend or one backends_from source")
	}
	var sources []*source
	for i, bs := range h.BackendsFrom {
		if bs == nil {
			return fmt.Errorf("backends_from[%d]: empty source", i)
		}
		src, err := bs.provision()
		if err != nil {
			return fmt.Errorf("backends_from %s: %w", bs, err)
		}
		for _, w := range src.tmpl.pinWarnings {
			h.logger.Warn("pin does not apply on every API", zap.String("frontend", h.Name), zap.String("backends_from", src.label), zap.String("pin", w))
		}
		sources = append(sources, src)
	}

	names := make(map[string]bool)
	keys := make(map[string]string)
	for i, bc := range h.Backends {
		if bc == nil {
			return fmt.Errorf("backends[%d]: empty backend", i)
		}
		if err := bc.provision(); err != nil {
			return fmt.Errorf("backend %q: %w", bc.Name, err)
		}
		for _, w := range bc.pinWarnings {
			h.logger.Warn("pin does not apply on every API", zap.String("frontend", h.Name), zap.String("backend", bc.Name), zap.String("pin", w))
		}
		if names[bc.Name] {
			return fmt.Errorf("backend %q: duplicate backend name", bc.Name)
		}
		names[bc.Name] = true
		base, err := parseBackendURL(bc.URL)
		if err != nil {
			return fmt.Errorf("backend %q: url: %w", bc.Name, err)
		}
		key := base.String()
		if other, dup := keys[key]; dup {
			return fmt.Errorf("backend %q: same server as backend %q (%s)", bc.Name, other, key)
		}
		keys[key] = bc.Name
		view := newBackendView(bc, base)
		view.pos.Store(int64(len(h.backends)))
		h.backends = append(h.backends, view)
	}
	h.members.Store(&memberSet{backends: h.backends})

	// Health transitions are Caddy events; the events app is loaded even
	// when the config does not name it, as reverse_proxy does.
	events := eventsApp(ctx)
	h.events = events

	// Take pool references last, so a config error above leaks nothing.
	for _, b := range h.backends {
		b.staged = b.settings(ctx, h.logger, events, time.Duration(h.DialTimeout))
		srv, err := acquireServer(b.base, b.staged)
		if err != nil {
			h.releaseServers()
			return fmt.Errorf("backend %q: %w", b.cfg.Name, err)
		}
		b.srv = srv
		h.poolKeys = append(h.poolKeys, b.base.String())
	}
	// A server this config shares with the running one keeps the running
	// config's settings until this one has started: Caddy emits "started"
	// only once every app of the config started, so a config that fails
	// to provision or to start never gets here.
	if events == nil { // provisioned outside a loaded config (tests, tools)
		h.adoptSettings(nil)
	} else if err := events.On("started", startedHook{h}); err != nil {
		h.releaseServers()
		return fmt.Errorf("events: %v", err)
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		h.releaseServers()
		return fmt.Errorf("metrics: %v", err)
	}
	h.provisioned = time.Now()
	h.stats = acquireFrontendStats(h.Name)
	h.acquireTenants()
	h.acquireTenantSync(ctx)
	if h.affinityOn() {
		h.affinity = acquireAffinity(h.Name)
	}
	h.queue = newQueue(h)
	h.demand = newModelDemand()
	h.served = &servedDelays{}
	if len(sources) > 0 {
		h.discovery = newDiscovery(h, ctx, sources, required)
	}
	startHistory()
	bodyMemory.register(h, h.maxBodyMemory)
	for _, b := range h.backends {
		b.srv.addQueue(h.queue)
		if !b.cfg.Disabled && len(required) > 0 {
			b.srv.setRequired(h, required)
		}
	}
	// Last: the history sampler reads registered frontends (their queue)
	// from its own goroutine.
	registerFrontend(h)
	if h.discovery != nil {
		h.discovery.start()
		if events == nil {
			h.discovery.adopt(nil)
		}
	}
	return nil
}

// affinityOn applies conversation_affinity's default: on for the policies
// that weigh load (affinity refines their choice), off for those that
// promise a distribution.
func (h *Handler) affinityOn() bool {
	if h.ConversationAffinity != nil {
		return *h.ConversationAffinity
	}
	return h.LBPolicy == "least_delay" || h.LBPolicy == "least_conn"
}

// startedHook is subscribed to Caddy's "started" event of the handler's
// own config. No exported fields: the events app logs handlers at debug.
type startedHook struct{ h *Handler }

func (sh startedHook) Handle(context.Context, caddy.Event) error {
	sh.h.adoptSettings(sh.h.events)
	return nil
}

// adoptSettings gives each server the settings this handler built for it,
// now that its config runs. config identifies the config (its events app).
// Among several frontends of one config naming the same server, the one
// whose frontend name, then backend name, sorts first wins.
func (h *Handler) adoptSettings(config any) {
	for _, b := range h.backends {
		b.srv.adopt(b.staged, config, h.Name+"\x00"+b.cfg.Name)
	}
	if h.tenantSync != nil {
		h.tenantSync.settings.Store(h.syncStaged)
	}
	if h.discovery != nil {
		h.discovery.adopt(config)
	}
}

// Validate is a no-op: Provision validates as it applies defaults, because
// most checks need the parsed values.
func (h *Handler) Validate() error { return nil }

// Cleanup releases this handler's references to the shared servers. A
// reload provisions the new config before the old one is cleaned up, so a
// server kept by the new config is never destroyed here.
func (h *Handler) Cleanup() error {
	if h.discovery != nil {
		h.discovery.stop() // first: no server joins or leaves from here on
	}
	unregisterFrontend(h)
	bodyMemory.unregister(h)
	if h.stats != nil {
		_, _ = frontendStatsPool.Delete(h.Name)
		stopHistory()
	}
	if h.queue != nil {
		h.queue.close()
	}
	if h.affinity != nil {
		_, _ = affinityPool.Delete(h.Name)
	}
	h.releaseServers()
	h.releaseTenantSync()
	h.releaseTenants()
	return nil
}

func (h *Handler) releaseServers() {
	for _, b := range h.backends {
		if b.srv != nil {
			b.srv.dropRequired(h)
		}
	}
	for _, k := range h.poolKeys {
		_, _ = servers.Delete(k)
	}
	h.poolKeys = nil
}

// eventsApp returns the config's events app, or nil when there is none: a
// handler provisioned outside a loaded config (a unit test, a tool) has a
// context without one, and Context.App does not guard against that.
func eventsApp(ctx caddy.Context) (app *caddyevents.App) {
	defer func() {
		if recover() != nil {
			app = nil
		}
	}()
	if v, err := ctx.App("events"); err == nil {
		app, _ = v.(*caddyevents.App)
	}
	return app
}
