// Package ollamaflow is a Caddy v2 module that turns many Ollama servers into
// one highly available, model-aware inference endpoint.
//
// The handler http.handlers.ollamaflow is a frontend: placed in a Caddy site,
// it serves the Ollama API (/api/*) and the OpenAI-compatible API (/v1/*) by
// proxying to the backends it lists.
//
// Map of the files:
//
//	ollamaflow.go  module registration, config types
//	provision.go   Provision/Validate/Cleanup: servers taken from the pool, the queue, settings adopted once started
//	backend.go     a backend's options: defaults, validation, its URL, placeholders in credentials, its Caddyfile block
//	handler.go     ServeHTTP: gate, read and pin the body, learn from a complete answer
//	attempt.go     the attempt loop: a slot on a different backend per attempt, retries before the first byte, timeouts
//	stream.go      copying an answer to the client: idle and client-write clocks, honest ends of cut answers
//	backendconn.go the lean HTTP/1.1 client to http backends: no goroutines per connection, buffers only while bytes wait
//	backendconn_peek.go, backendconn_nopeek.go  waiting for a backend's bytes without a buffer where the socket can be peeked at
//	backendbody.go an answer's body from the lean client: by length, chunked or until close, pooled again at a clean end
//	routes.go      the route table, classification, error bodies per API
//	balancer.go    candidates, slots, taking a slot with the frontend's policy
//	policies.go    the selection policies: least_delay's pick over the cost model, least_conn, round_robin, random, first
//	sticky.go      sticky sessions: the session key, rendezvous hashing, session vs conversation vs policy
//	largepool.go   routing over large pools: kept candidate lists, sampled picks (power of d choices), retries, back-off and SRV tiers without walks
//	conversation.go a completion's conversation: prefix hashes of the conversation so far, read from its body as Ollama decodes it
//	affinity.go    conversation affinity: the table of conversations' servers and the cache slots they hold
//	convroute.go   routing with conversations in mind: keeping a follow-up where its cache is, spreading new ones
//	cacheodds.go   how often a follow-up sent back to its server found its cache there, per server and class
//	crowding.go    where more conversations than cache slots keep the overflow: gathered on the servers that thrash already
//	dnssource.go   backends_from's sources: their options, DNS lookups (A, SRV priority and weight), Caddyfile block
//	discovery.go   backends_from's members: servers joining and leaving the pool without reloads, SRV priority tiers
//	job.go         what a request asks of a server, read from its body; typical answer lengths per model
//	cost.go        the cost model behind least_delay: a request's expected delay on a server
//	speed.go       what each server learns: requests in flight, rates from Ollama's timings, error share
//	slots.go       how a server's parallel slots are learned from Ollama's durations or a stream's first and last bytes
//	promptfit.go   prompt evaluation time against prompt size: a fixed part and a part per token, per server and model
//	shift.go       a server that changed speed: answers that disagree twice replace the estimate; re-measurement
//	measurecopy.go measuring copies: a waiting request's copy, capped, read by the proxy, re-measures an idle slow server
//	relief.go      least_delay's relief of a lasting queue onto slower servers' free slots, within the pool's tail
//	spare.go       least_delay on a fresh pool: a spare request beside each measuring one, moved when another server answers sooner
//	measuring.go   least_delay on a fresh pool: holds for another's first answer, and for spares about to move, a bounded while
//	placement.go   model placement: residency, what a load would evict, what the eviction costs the pool
//	loadwait.go    a request offered a load waits for another server loading its model or serving it sooner
//	demand.go      demand placement's shares: each model's part of the recent requests, and how fast it is asked
//	loadcopy.go    load copies: the copy of a model demand placement adds is loaded by a copy of the request
//	room.go        room tests: a load copy that shows whether a server holds more models than its lists showed
//	queue.go       the frontend's queue for requests that found every candidate at its cap: per-server FIFOs, per-client share
//	queuemoves.go  waiters moved keeping their place: into the new config's queue at a reload, to a changed pool
//	fairshare.go   the queue's classes (tenants): strict priority, weighted fair share, each class's share of a full queue
//	bodymem.go     the process-wide budget for request bodies in memory (max_body_memory), reading bodies against it
//	distributed.go tenants' counters shared by the instances that use one storage (distributed)
//	rate.go        a backend's requests_per_minute: the server's sliding window of request starts, waking its queues
//	health.go      the pooled *server (live state shared across reloads), probes, passive health, events
//	modelsync.go   model names, discovery of each server's lists, model routing, the miss cache
//	modelindex.go  per frontend and model, which backends may have it: a bitset per model list generation
//	pulls.go       required_models: pulls onto each server that lacks them, backoff, stalled pulls
//	management.go  aggregated model lists and management fanned out to every backend
//	body.go        one reading of a request body, the way Ollama reads it (model, name, stream)
//	pinning.go     pinned properties: parsed at provision, merged into request bodies
//	pinvocab.go    pins compiled per API vocabulary: the fields Ollama's OpenAI layer reads
//	cors.go        CORS as Ollama answers it: origins, preflights, headers on every answer
//	caddyfile.go   the ollamaflow and ollamaflow_status directives
//	caddyfileargs.go the Caddyfile's argument parsers shared by the directive and its blocks
//	explorer.go    the API Explorer: the embedded explorer.html on the frontend's site, its CSP
//	command.go     the `caddy ollamaflow` subcommand: a frontend from flags, no config file
//	admin.go       admin.api.ollamaflow: status routes, drain, the embedded status.html
//	status.go      http.handlers.ollamaflow_status: the dashboard on any site, its JSON, actions guarded against other sites
//	metrics.go     Prometheus collectors in Caddy's registry
//	history.go     the sampled 15-minute history of GET /ollamaflow/history
//	trace.go       the {http.ollamaflow.*} placeholders, attributes of the request's tracing span
//	tenants.go     tenants: config and Caddyfile block, keys and identity, per-tenant policy
//	tenantusage.go tenants' limits (GCRA buckets, max_parallel), x-ratelimit-* headers, usage counts
//
// Config is immutable after Provision. Live server state lives in a
// package-level caddy.UsagePool keyed by the normalised URL, so every handler
// naming the same server shares it and a reload that keeps the server keeps
// its health, counters and goroutines.
package ollamaflow

import (
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule((*Handler)(nil))
}

// Defaults applied in Provision.
const (
	defaultName               = "ollamaflow"
	defaultPolicy             = "least_delay"
	defaultRetries            = 2
	defaultMaxRequestBody     = 64 << 20
	defaultMaxBodyMemory      = 256 << 20
	defaultDialTimeout        = 5 * time.Second
	defaultFirstByteTimeout   = 5 * time.Minute
	defaultStreamIdleTimeout  = 2 * time.Minute
	defaultResponseTimeout    = 30 * time.Minute
	defaultClientWriteTimeout = 30 * time.Second
	defaultLabelHeader        = "X-OllamaFlow-Label"
	defaultMaxQueue           = 256
	defaultQueueTimeout       = 60 * time.Second
	defaultOllamaPort         = "11434"

	defaultHealthURI      = "/"
	defaultHealthMethod   = http.MethodGet
	defaultHealthStatus   = 2
	defaultHealthInterval = 5 * time.Second
	defaultHealthTimeout  = 2 * time.Second
	defaultHealthPasses   = 2
	defaultHealthFails    = 2
	defaultFailThreshold  = 3
	defaultModelRefresh   = 15 * time.Second
	defaultPullConc       = 1
)

// maxWeight bounds a backend's weight, so that sums of weights over any
// pool cannot overflow.
const maxWeight = 1_000_000

// Handler is a frontend: it serves the Ollama and OpenAI-compatible APIs by
// proxying each request to one of its backends.
type Handler struct {
	// Name identifies this frontend in logs, metrics and the admin API.
	// Default: "ollamaflow".
	Name string `json:"name,omitempty"`

	// LBPolicy selects a backend among the candidates: least_delay,
	// least_conn, round_robin, random or first. Default: least_delay.
	LBPolicy string `json:"lb_policy,omitempty"`

	// Retries is the number of extra attempts, each on another backend,
	// made before the first response byte reaches the client. Default: 2.
	Retries *int `json:"retries,omitempty"`

	// MaxRequestBody is the largest request body accepted, in bytes; larger
	// bodies get 413. Default: 64 MiB.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`

	// MaxBodyMemory bounds the request bodies held in memory at once, pinned
	// copies included. The budget is per process: every frontend draws from
	// one pool sized by the largest max_body_memory among them, and each
	// frontend also stays within its own. A request whose body finds no room
	// waits up to a second for others to finish, then gets 503 with
	// Retry-After. It must be at least max_request_body. Default: 256 MiB.
	MaxBodyMemory int64 `json:"max_body_memory,omitempty"`

	// DialTimeout bounds connecting to a backend. Default: 5s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// FirstByteTimeout bounds the wait for a backend's response headers on a
	// streaming request ("stream":true, the default of Ollama's native API),
	// which covers model load and prompt evaluation; 504 beyond, and the
	// backend is charged a failure. Non-streaming requests are bounded by
	// ResponseTimeout instead. Default: 5m.
	FirstByteTimeout caddy.Duration `json:"first_byte_timeout,omitempty"`

	// ResponseTimeout bounds the whole answer to a non-streaming request
	// ("stream":false, the default of the OpenAI-compatible API, and
	// embeddings), headers and body: Ollama sends nothing before such an
	// answer is complete, so a long generation must not be cut at
	// first_byte_timeout. 504 beyond (or an aborted response if the body had
	// begun); a long answer is never charged to the backend as a failure.
	// Default: 30m.
	ResponseTimeout caddy.Duration `json:"response_timeout,omitempty"`

	// StreamIdleTimeout is the longest the proxy waits for the next chunk of
	// a response body from the backend (time spent writing to the client
	// does not count); beyond it the response ends with an error in the
	// API's format and the backend is charged a failure. Default: 2m.
	StreamIdleTimeout caddy.Duration `json:"stream_idle_timeout,omitempty"`

	// ClientWriteTimeout bounds each write of a response to the client: a
	// client that stops reading for longer is cut off, its backend request
	// cancelled and its slot freed, and the backend is not blamed.
	// Default: 30s.
	ClientWriteTimeout caddy.Duration `json:"client_write_timeout,omitempty"`

	// MaxQueue is the number of requests that may wait for a free backend
	// slot when every candidate is at its max_parallel cap; 429 beyond.
	// Default: 256.
	MaxQueue int `json:"max_queue,omitempty"`

	// MaxQueuePerClient is the number of places in the queue one client may
	// hold at once; its further requests get 429 while others still queue.
	// A client is the session key when sticky is on and the request carries
	// one, else the client IP (Caddy's client_ip, trusted_proxies aware).
	// Default: a quarter of max_queue, at least 1.
	MaxQueuePerClient int `json:"max_queue_per_client,omitempty"`

	// QueueTimeout is how long a request may wait in the queue; 503 beyond.
	// Default: 60s.
	QueueTimeout caddy.Duration `json:"queue_timeout,omitempty"`

	// AllowEmbeddings permits embedding requests through this frontend.
	// Default: true.
	AllowEmbeddings *bool `json:"allow_embeddings,omitempty"`

	// AllowCompletions permits generate and chat requests through this
	// frontend. Default: true.
	AllowCompletions *bool `json:"allow_completions,omitempty"`

	// AllowModelManagement permits pull, delete, copy, create, push and blob
	// uploads through this frontend. Default: false.
	AllowModelManagement bool `json:"allow_model_management,omitempty"`

	// Models, if set, is the allow-list of models clients may use here.
	// Names are compared after normalisation (no tag means :latest).
	Models []string `json:"models,omitempty"`

	// Labels are required of every backend that serves a request here, in
	// addition to any the client names in the label header.
	Labels []string `json:"labels,omitempty"`

	// LabelHeader is the request header that carries extra required labels,
	// comma-separated or repeated. Default: X-OllamaFlow-Label.
	LabelHeader string `json:"label_header,omitempty"`

	// RequiredModels are pulled onto every enabled backend of this frontend
	// that lacks them, and pulled again if they disappear. Names may carry a
	// registry host (registry.internal:5000/library/llama3.2:1b).
	RequiredModels []string `json:"required_models,omitempty"`

	// InsecurePulls pulls required models over plain HTTP, for a private
	// registry without TLS. Default: false.
	InsecurePulls bool `json:"insecure_pulls,omitempty"`

	// PinCompletions is a JSON object merged into the body of every
	// completion request (generate and chat, on both APIs) before a backend
	// is chosen, so a pinned model routes. Objects merge recursively; other
	// values, null included, replace the client's; client keys that Ollama
	// would read as a pinned key (in any case, escaped or repeated) are
	// dropped. Default: none.
	PinCompletions json.RawMessage `json:"pin_completions,omitempty"`

	// PinEmbeddings is PinCompletions for embedding requests. Default: none.
	PinEmbeddings json.RawMessage `json:"pin_embeddings,omitempty"`

	// Sticky, if set, keeps a session (a conversation) on one server, so its
	// context stays warm there. Off by default.
	Sticky *StickyConfig `json:"sticky,omitempty"`

	// ConversationAffinity sends the next turn of a conversation to the
	// server that answered the previous one, where Ollama still holds the
	// conversation's prompt in its cache and evaluates only the new
	// messages, without any header from the client: completions are
	// matched by a hash of their model and earlier messages (or prompt and
	// context on /api/generate and /v1/completions). That server is
	// preferred while its expected delay is within 1.5 × the best
	// candidate's plus 50ms; when it is at its cap or much slower the
	// policy chooses. Sticky sessions, when a request carries a session
	// key, win over it. Default: true with least_delay and least_conn,
	// false with round_robin, random and first, whose users asked for that
	// distribution.
	ConversationAffinity *bool `json:"conversation_affinity,omitempty"`

	// CORSOrigins are the origins whose pages may call this frontend from a
	// browser, matched case-insensitively, as Ollama matches OLLAMA_ORIGINS:
	// an exact origin (https://app.example.com), a pattern with one *
	// (http://localhost:*, app://*, https://*.example.com), "*" for any
	// origin, "null" for sandboxed and file pages, and "default" for
	// Ollama's own default list, so `["default", "https://app.example.com"]`
	// adds to it as OLLAMA_ORIGINS does. An entry may be a comma-separated
	// list and hold placeholders ({env.OLLAMA_ORIGINS}). A request from any
	// other origin is refused with 403. An empty list, or ["off"], turns
	// CORS off: no preflights answered, no origin refused, no
	// Access-Control-* headers. Default: Ollama's list (http and https on
	// localhost, 127.0.0.1 and 0.0.0.0 with any port, app://*, file://*,
	// tauri://*, vscode-webview://*, vscode-file://*).
	CORSOrigins []string `json:"cors_origins,omitempty"`

	// Tenants, if set, turns tenancy on: every request must name one of
	// these tenants by API key or identity (401 otherwise), and each
	// tenant's policy and limits apply to its requests. Off by default.
	Tenants *Tenants `json:"tenants,omitempty"`
	// ExplorerPath, if set, serves the API Explorer, a self-contained page
	// for trying requests from a browser, at this path of the frontend's
	// own site (the Caddyfile's `explorer` gives /explorer/). The page calls
	// the frontend's APIs same-origin, through every policy it enforces. A
	// trailing slash is added; the path without it redirects to it. It may
	// not be /, nor under /api/ or /v1/. Default: off.
	ExplorerPath string `json:"explorer_path,omitempty"`

	// Backends are the Ollama servers this frontend proxies to.
	Backends []*Backend `json:"backends,omitempty"`

	// BackendsFrom are DNS names whose records are more backends, looked
	// up again every refresh and applied without a reload (discovery.go).
	// A frontend needs at least one backend or one source.
	BackendsFrom []*BackendSource `json:"backends_from,omitempty"`

	// backends are the static backends; the pool in rotation, discovered
	// servers included, is members (read it with pool or views).
	backends    []*backend
	members     atomic.Pointer[memberSet]
	discovery   *discovery // nil without backends_from
	provisioned time.Time
	queue       *queue
	misses      missCache                  // models recently found nowhere
	index       atomic.Pointer[modelIndex] // which backends may have each model (modelindex.go)
	events      *caddyevents.App
	maxQueue    int
	// maxQueuePerClient is MaxQueuePerClient with its default applied.
	maxQueuePerClient int
	maxBodyMemory     int64
	bodyUsed          int64 // bytes of bodies this frontend holds; guarded by bodyMemory.mu
	policy            selectionPolicy
	// remeasures says the policy re-measures a server believed slow
	// (least_delay): conversation affinity's spreading does it too.
	remeasures   bool
	retries      int
	allowEmbed   bool
	allowCompl   bool
	models       map[string]struct{}
	labels       []string
	transport    http.RoundTripper // nil: each server's own; tests set one
	logger       *zap.Logger
	poolKeys     []string
	stats        *flowStats // this frontend name's counters and history (history.go)
	rrCounter    uint64
	labelHeader  string
	pinCompl     pinTrees
	pinEmbed     pinTrees
	cors         *corsPolicy    // nil: CORS off
	tenantsState *tenantState   // the frontend's own tenancy counts (unauthorized)
	tenantKeys   []string       // tenantPool keys this handler holds
	affinity     *affinityTable // nil: conversation_affinity off
	demand       *modelDemand   // recent requests per model (placementMove)
	served       *servedDelays  // delays of requests ended lately (relief.go)
	tenantSync   *tenantSync    // tenants' distributed counters, if on (distributed.go)
	syncStaged   *syncSettings  // what this config asks of it, adopted once it runs
	explorerPath string         // ExplorerPath with its slash; empty: no explorer
	explorerPage []byte         // explorer.html for explorerPath

	// Routing over large pools (largepool.go): the candidate filter's
	// answer per kind, the lists picks saw lately, and the last winners.
	candCache    [kindManagement + 1]atomic.Pointer[candidateCache]
	listInfo     [listInfoKept]atomic.Pointer[listInfo]
	listInfoNext uint64
	leaders      [sampleLeader]atomic.Pointer[backend]
	leaderNext   uint64
	sampleRand   *rand.Rand // nil: the global source; tests set a seeded one
}

// StickyConfig says how a request's session key is found.
type StickyConfig struct {
	// Headers are request headers whose first non-empty value is the
	// session key, e.g. x-conversation-id.
	Headers []string `json:"headers,omitempty"`

	// ClientIP falls back to the client's IP (Caddy's client_ip, which
	// honours trusted_proxies) when no header carries a key.
	ClientIP bool `json:"client_ip,omitempty"`
}

// CaddyModule returns the Caddy module information. The pointer receiver
// matters: Caddy's events app asks the emitting module for its info from the
// health checker's goroutine, and a value receiver would copy (read) the
// whole handler while its counters change.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.ollamaflow",
		New: func() caddy.Module { return new(Handler) },
	}
}

func validName(name string) bool {
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return name != ""
}

func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for _, c := range name {
		if c <= ' ' || c >= 0x7f || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, c) {
			return false
		}
	}
	return true
}

func validStatusExpectation(code int) bool {
	return (code >= 1 && code <= 5) || (code >= 100 && code <= 599)
}

func normalizeLabels(in []string) []string {
	var out []string
	seen := make(map[string]bool)
	for _, l := range in {
		l = strings.ToLower(strings.TrimSpace(l))
		if l == "" || seen[l] {
			continue
		}
		seen[l] = true
		out = append(out, l)
	}
	return out
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
