package ollamaflow

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// frontends holds every provisioned handler, for the admin API: admin
// modules are recreated at every load and take no config, so they read this
// (and the server pool) instead.
var frontends = struct {
	sync.Mutex
	m map[*Handler]struct{}
}{m: make(map[*Handler]struct{})}

func registerFrontend(h *Handler) {
	frontends.Lock()
	frontends.m[h] = struct{}{}
	frontends.Unlock()
}

func unregisterFrontend(h *Handler) {
	frontends.Lock()
	delete(frontends.m, h)
	frontends.Unlock()
}

// liveFrontends returns the registered handlers, newest config last within
// a name, sorted by name.
func liveFrontends() []*Handler {
	frontends.Lock()
	list := make([]*Handler, 0, len(frontends.m))
	for h := range frontends.m {
		list = append(list, h)
	}
	frontends.Unlock()
	sort.SliceStable(list, func(i, j int) bool {
		if list[i].Name != list[j].Name {
			return list[i].Name < list[j].Name
		}
		return list[i].provisioned.Before(list[j].provisioned)
	})
	return list
}

// adminAPI is the admin.api.ollamaflow module: read-mostly routes on
// Caddy's admin endpoint. It has no state of its own.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.ollamaflow",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes, all under /ollamaflow/.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/ollamaflow/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

//go:embed status.html
var statusPage []byte

func (a adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	path := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/ollamaflow"), "/")
	parts := strings.Split(strings.TrimPrefix(path, "/"), "/")
	switch {
	case path == "":
		if err := allowMethods(r, http.MethodGet, http.MethodHead); err != nil {
			return err
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(statusPage)
		return nil
	case len(parts) == 1 && statusReads[parts[0]] != nil:
		if err := allowMethods(r, http.MethodGet); err != nil {
			return err
		}
		return writeAdminJSON(w, statusReads[parts[0]]())
	case len(parts) == 2 && parts[0] == "backends":
		if err := allowMethods(r, http.MethodGet); err != nil {
			return err
		}
		srv, err := serverByName(parts[1], r.URL.Query().Get("frontend"))
		if err != nil {
			return err
		}
		return writeAdminJSON(w, backendStatus(srv, viewsOf(srv)))
	case len(parts) == 3 && parts[0] == "backends":
		if err := allowMethods(r, http.MethodPost); err != nil {
			return err
		}
		st, err := backendAction(r.Context(), parts[1], r.URL.Query().Get("frontend"), parts[2])
		if err != nil {
			return err
		}
		return writeAdminJSON(w, st)
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown route %s", r.URL.Path)}
}

// statusReads are the read-only JSON documents, by route, that both the
// admin endpoint and the ollamaflow_status handler serve.
var statusReads = map[string]func() any{
	"backends":  func() any { return backendStatuses() },
	"frontends": func() any { return frontendStatuses() },
	"history":   func() any { return historyStatus() },
	"usage":     func() any { return usageStatus() },
}

// backendActions are what an operator may do to a backend, from the admin
// endpoint or the dashboard.
var backendActions = []string{"drain", "undrain", "refresh"}

// backendAction drains, undrains or refreshes the backend a name (and,
// when the name is ambiguous, a frontend) refers to, and returns its state
// afterwards. Errors are caddy.APIError with the status to answer.
func backendAction(ctx context.Context, name, frontend, action string) (backendJSON, error) {
	if !slices.Contains(backendActions, action) {
		return backendJSON{}, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use drain, undrain or refresh", action)}
	}
	srv, err := serverByName(name, frontend)
	if err != nil {
		return backendJSON{}, err
	}
	switch action {
	case "drain":
		srv.setDraining(true)
	case "undrain":
		srv.setDraining(false)
	case "refresh":
		if err := srv.refreshModels(ctx, 0); err != nil {
			return backendJSON{}, caddy.APIError{HTTPStatus: http.StatusBadGateway, Err: fmt.Errorf("refreshing %s: %v", name, err)}
		}
	}
	return backendStatus(srv, viewsOf(srv)), nil
}

func allowMethods(r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed; use %s", r.Method, strings.Join(methods, " or "))}
}

func writeAdminJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// view is one frontend's name for a server.
type view struct {
	h *Handler
	b *backend
}

// viewsOf lists the frontends that name srv, and how.
func viewsOf(srv *server) []view {
	var out []view
	for _, h := range liveFrontends() {
		for _, b := range h.views() {
			if b.srv == srv {
				out = append(out, view{h, b})
			}
		}
	}
	return out
}

// serverByName finds the server a backend name refers to. A name used for
// different servers by different frontends needs ?frontend= to say which.
func serverByName(name, frontend string) (*server, error) {
	found := map[*server]bool{}
	var first *server
	for _, h := range liveFrontends() {
		if frontend != "" && h.Name != frontend {
			continue
		}
		for _, b := range h.views() {
			if b.cfg.Name == name && !found[b.srv] {
				found[b.srv] = true
				if first == nil {
					first = b.srv
				}
			}
		}
	}
	switch len(found) {
	case 0:
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no backend named %q", name)}
	case 1:
		return first, nil
	default:
		return nil, caddy.APIError{HTTPStatus: http.StatusConflict, Err: fmt.Errorf("backend name %q refers to %d servers in different frontends; add ?frontend=NAME", name, len(found))}
	}
}

// backendJSON is a server's live state as the admin API shows it. It never
// carries a secret: no token, header value or query string.
type backendJSON struct {
	URL          string            `json:"url"`
	Names        []string          `json:"names"`
	Frontends    []frontendRefJSON `json:"frontends"`
	State        string            `json:"state"`
	Since        time.Time         `json:"since"`
	LastProbe    time.Time         `json:"last_probe,omitzero"`
	LastError    string            `json:"last_error,omitempty"`
	FailStreak   int32             `json:"fail_streak"`
	InFlight     int64             `json:"in_flight"`
	Queued       int               `json:"queued"`
	Draining     bool              `json:"draining"`
	Idle         bool              `json:"idle"`
	Models       []string          `json:"models"`
	LoadedModels []string          `json:"loaded_models"`
	ModelsAt     time.Time         `json:"models_refreshed,omitzero"`
	Pulls        []pullState       `json:"pulls"`
	Speed        *speedJSON        `json:"speed,omitempty"`
	Labels       []string          `json:"labels"`
	Caps         map[string]int    `json:"max_parallel"`
	// Per frontend that limits the server, its requests_per_minute, and
	// the requests started on the server in the last minute (counted once
	// some frontend limits it).
	RateLimits    map[string]int          `json:"requests_per_minute,omitempty"`
	StartedRecent *int                    `json:"requests_last_minute,omitempty"`
	Credentials   map[string]credentialsJ `json:"credentials,omitempty"`
}

type frontendRefJSON struct {
	Frontend string `json:"frontend"`
	Name     string `json:"name"`
	Disabled bool   `json:"disabled,omitempty"`
	// Source is the backends_from source that found the server, if any;
	// Leaving says its records are gone and it finishes its requests.
	Source  string `json:"source,omitempty"`
	Leaving bool   `json:"leaving,omitempty"`
	// SRVPriority is the priority of the SRV record that named the
	// server; Standby says a server of a lower priority in the frontend
	// can serve, so this one takes none of its requests now.
	SRVPriority *int `json:"srv_priority,omitempty"`
	Standby     bool `json:"standby,omitempty"`
}

// credentialsJ says which credentials a frontend sends, never what they are.
type credentialsJ struct {
	BearerToken bool     `json:"bearer_token,omitempty"`
	Headers     []string `json:"headers,omitempty"`
	Query       bool     `json:"query,omitempty"`
}

type speedJSON struct {
	ServiceMS  float64 `json:"service_ms"`
	Slots      int     `json:"slots"`
	Samples    int     `json:"samples"`
	ColdLoadMS float64 `json:"cold_load_ms,omitempty"`
	// Learned from Ollama's final counts: seconds per prompt token and per
	// generated token (in ms), and models seen resident at once (0: unknown).
	PromptTokenMS float64 `json:"prompt_token_ms"`
	OutputTokenMS float64 `json:"output_token_ms"`
	ModelRoom     int     `json:"model_room,omitempty"`
}

func backendStatuses() []backendJSON {
	seen := map[*server]bool{}
	var out []backendJSON
	for _, h := range liveFrontends() {
		for _, b := range h.views() {
			if !seen[b.srv] {
				seen[b.srv] = true
				out = append(out, backendStatus(b.srv, viewsOf(b.srv)))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
	return out
}

func backendStatus(s *server, views []view) backendJSON {
	s.mu.Lock()
	since, lastProbe, lastErr := s.since, s.lastProbe, s.lastErr
	s.mu.Unlock()
	inFlight := s.inFlight.Load()
	out := backendJSON{
		URL:          s.key,
		Names:        []string{},
		Frontends:    []frontendRefJSON{},
		State:        healthState(s.state.Load()).String(),
		Since:        since,
		LastProbe:    lastProbe,
		LastError:    lastErr,
		FailStreak:   s.failStreak.Load(),
		InFlight:     inFlight,
		Draining:     s.draining.Load(),
		Idle:         inFlight == 0,
		Models:       []string{},
		LoadedModels: []string{},
		Pulls:        s.pullSnapshot(),
		Labels:       []string{},
		Caps:         map[string]int{},
	}
	snap := s.models.Load()
	for m := range snap.present {
		out.Models = append(out.Models, m)
	}
	for m := range snap.loaded {
		out.LoadedModels = append(out.LoadedModels, m)
	}
	sort.Strings(out.Models)
	sort.Strings(out.LoadedModels)
	out.ModelsAt = snap.at
	if v, ok := s.speed.view(); ok {
		out.Speed = &speedJSON{ServiceMS: v.service * 1000, Slots: v.slots, Samples: v.samples, ColdLoadMS: v.coldLoad * 1000,
			PromptTokenMS: v.promptTokMS, OutputTokenMS: v.genTokMS, ModelRoom: v.modelRoom}
	}
	names, labels := map[string]bool{}, map[string]bool{}
	queued := map[*queue]bool{}
	for _, v := range views {
		ref := frontendRefJSON{Frontend: v.h.Name, Name: v.b.cfg.Name, Disabled: v.b.cfg.Disabled,
			Source: v.b.source, Leaving: v.b.leaving.Load()}
		if v.b.discovered && v.b.srvPriority >= 0 {
			prio := v.b.srvPriority
			ref.SRVPriority = &prio
			tier, ok := v.h.lowestTier(v.h.pool())
			ref.Standby = ok && v.b.tier.Load() > tier
		}
		out.Frontends = append(out.Frontends, ref)
		if !names[v.b.cfg.Name] {
			names[v.b.cfg.Name] = true
			out.Names = append(out.Names, v.b.cfg.Name)
		}
		for l := range v.b.labels {
			if !labels[l] {
				labels[l] = true
				out.Labels = append(out.Labels, l)
			}
		}
		out.Caps[v.h.Name] = v.b.cfg.MaxParallel
		if rpm := v.b.cfg.RequestsPerMinute; rpm > 0 {
			if out.RateLimits == nil {
				out.RateLimits = map[string]int{}
				n := s.rate.startedSince(s.clock().Now().Add(-rateSpan).UnixNano())
				out.StartedRecent = &n
			}
			out.RateLimits[v.h.Name] = rpm
		}
		if v.h.queue != nil && !queued[v.h.queue] {
			queued[v.h.queue] = true
			out.Queued += v.h.queue.waitingFor(s)
		}
		if c := credentialsOf(v.b); c != nil {
			if out.Credentials == nil {
				out.Credentials = map[string]credentialsJ{}
			}
			out.Credentials[v.h.Name] = *c
		}
	}
	sort.Strings(out.Labels)
	return out
}

func credentialsOf(b *backend) *credentialsJ {
	c := credentialsJ{BearerToken: b.cfg.BearerToken != "", Query: b.query != ""}
	for k := range b.cfg.Headers {
		c.Headers = append(c.Headers, k)
	}
	sort.Strings(c.Headers)
	if !c.BearerToken && !c.Query && len(c.Headers) == 0 {
		return nil
	}
	return &c
}

type frontendJSON struct {
	Name           string         `json:"name"`
	Policy         string         `json:"lb_policy"`
	Backends       []string       `json:"backends"`
	BackendsFrom   []sourceStatus `json:"backends_from,omitempty"`
	Queued         int            `json:"queued"`
	QueuedTotal    int64          `json:"queued_total"`
	QueueWaitAvgMS float64        `json:"queue_wait_avg_ms"`
	QueueWaitMaxMS float64        `json:"queue_wait_max_ms"`
	MaxQueue       int            `json:"max_queue"`
	MaxPerClient   int            `json:"max_queue_per_client"`
	QueueTimeout   string         `json:"queue_timeout"`
	BodyMemory     bodyMemoryJSON `json:"body_memory"`
	Retries        int            `json:"retries"`
	Labels         []string       `json:"labels"`
	Models         []string       `json:"models,omitempty"`
	RequiredModels []string       `json:"required_models,omitempty"`
	Embeddings     bool           `json:"allow_embeddings"`
	Completions    bool           `json:"allow_completions"`
	Management     bool           `json:"allow_model_management"`
	Sticky         bool           `json:"sticky"`
}

// bodyMemoryJSON is the request body budget: this frontend's share and
// the process-wide pool every frontend draws from.
type bodyMemoryJSON struct {
	Used         int64 `json:"used_bytes"`
	Limit        int64 `json:"max_body_memory"`
	ProcessUsed  int64 `json:"process_used_bytes"`
	ProcessPeak  int64 `json:"process_peak_bytes"`
	ProcessLimit int64 `json:"process_limit_bytes"`
}

func frontendStatuses() []frontendJSON {
	out := []frontendJSON{}
	for _, h := range liveFrontends() {
		f := frontendJSON{
			Name: h.Name, Policy: h.LBPolicy, Backends: []string{}, MaxQueue: h.maxQueue, MaxPerClient: h.maxQueuePerClient,
			QueueTimeout: time.Duration(h.QueueTimeout).String(), Retries: h.retries,
			Labels: append([]string{}, h.labels...), Models: h.Models, RequiredModels: h.RequiredModels,
			Embeddings: h.allowEmbed, Completions: h.allowCompl, Management: h.AllowModelManagement,
			Sticky: h.Sticky != nil,
		}
		f.BodyMemory.ProcessUsed, f.BodyMemory.ProcessPeak, f.BodyMemory.ProcessLimit = bodyMemory.state()
		f.BodyMemory.Used, f.BodyMemory.Limit = heldBy(h), h.maxBodyMemory
		if q := h.queue; q != nil {
			f.Queued = q.length()
			f.QueuedTotal = q.waited.Load()
			if f.QueuedTotal > 0 {
				f.QueueWaitAvgMS = float64(q.waitedNanos.Load()) / float64(f.QueuedTotal) / 1e6
			}
			f.QueueWaitMaxMS = float64(q.longestNanos.Load()) / 1e6
		}
		for _, b := range h.pool() {
			f.Backends = append(f.Backends, b.cfg.Name)
		}
		if h.discovery != nil {
			f.BackendsFrom = h.discovery.status()
		}
		out = append(out, f)
	}
	return out
}

// Interface guards
var _ caddy.AdminRouter = (*adminAPI)(nil)
