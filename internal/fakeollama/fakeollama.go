// Package fakeollama is a fake Ollama server for unit tests, integration tests, benchmarks and
// chaos tests. It speaks the wire format of Ollama v0.17.4 on the native API (NDJSON streams) and
// on the OpenAI-compatible API (server-sent events), records what it receives, and injects the
// failures a load balancer meets in production: error answers, hangs, streams cut mid-way, slow
// first bytes and dead boxes.
//
//	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3})
//	t.Cleanup(f.Close)
//	// point the code under test at f.URL ("http://127.0.0.1:PORT") or f.HostPort()
//
// Endpoints: GET|HEAD /, GET|HEAD /api/version, GET|HEAD /api/tags, GET /api/ps, POST /api/show,
// /api/generate, /api/chat, /api/embed, /api/embeddings, /api/pull, DELETE /api/delete, POST
// /api/copy, /api/create, /api/push, HEAD|POST /api/blobs/{digest}, POST /v1/chat/completions,
// /v1/completions, /v1/embeddings, GET /v1/models, /v1/models/{model}. Anything else is 404 "404
// page not found", a wrong method 405 "405 method not allowed" with Allow, in "text/plain", as gin
// answers in Ollama. Every completion generates Text(n): n = Tokens, or the request's num_predict /
// max_tokens (then done_reason "length"). Embedding models (Config.Embedding, and names with
// "bert" or "embed") refuse completions with 400 "\"NAME\" does not support chat" (or generate),
// as Ollama refuses a model without the completion capability; any model embeds.
//
// Capacity, like Ollama's scheduler: with Config.Parallel set, at most that many completions and
// embeddings are processed at once (OLLAMA_NUM_PARALLEL); up to Config.MaxQueue more wait inside,
// first come first served, and any beyond get 503 with ServerBusy (OLLAMA_MAX_QUEUE). A request
// holds its slot for its service time: LoadDelay when its model is cold, then FirstByteDelay, then
// Tokens × TokenGap; Config.MaxLoaded bounds the models resident at once, SetSpeed changes the
// box's speed mid-run, ColdLoads and Evictions count (residency.go). A fast and a slow box: Config{Parallel: 4, FirstByteDelay: 100 * time.Millisecond}
// and Config{Parallel: 1, FirstByteDelay: 400 * time.Millisecond}.
//
// Prompt cache, like Ollama's runner: each parallel slot of a loaded model keeps the tokens of
// its last prompt and answer, a completion takes the free slot with the longest common prefix
// and pays Config.PromptTokenCost only for the tokens it does not find there.
// prompt_eval_count is the whole prompt, prompt_eval_duration the evaluated part.
// PromptCacheStats() counts hits and evaluated tokens; GET CachePath (a path real Ollama does
// not have) answers the same as JSON.
//
// Assertions: Count(path), Counts(), Requests() and LastRequest() (method, path, raw query,
// headers, body), InFlight(), MaxInFlight(), Busy(), MaxBusy(), Waiting(), Rejected() (the
// slots and the queue), Cancellations() (requests whose client went away, with when the context
// was cancelled and when the fake noticed), Models(), Loaded(), Blobs(), ResetStats().
//
// Faults, each optionally restricted to exact paths (Completions, Embeddings, or your own list):
//
//	f.FailWith(503, fakeollama.ServerBusy, fakeollama.Completions...) // a busy box: health passes
//	f.FailAfter(time.Millisecond, 503, fakeollama.ServerBusy) // a box that fails fast, probes too
//	f.HangAfterHeaders()       // 200 + headers, then silence until the client leaves or Close
//	f.DieMidStream(2)          // two chunks, then the connection is hijacked and closed
//	f.ErrorMidStream(2, "an error was encountered while running the model: unexpected EOF")
//	f.SlowFirstByte(time.Second)
//	fakeollama.Config{MaxContext: 8192} // {"options":{"num_ctx":1000000}} gets 500: out of memory
//	f.Hold(fakeollama.Completions...); ...; f.Release() // keep requests in flight, deterministically
//	f.StepTokens("/api/chat"); f.Step(); f.Step() // a stream that grows one token per Step
//	f.FailPulls("pull model manifest: file does not exist")
//	f.FailPushes(`Head "https://registry.ollama.ai/v2/library/x/blobs/sha256:…": dial tcp: …`)
//	f.ClearFaults()
//	f.Close(); f.Restart()     // a dead box (refused connections, cut streams), then back on its port
//	f.SetModels(...); f.SetLoaded(...) // change what /api/tags and /api/ps report
//
// Every method is safe for concurrent use, also while requests are being served. Files:
// fakeollama.go (lifecycle, instrumentation, faults, slots), ollama.go (native API: inference and
// model reads), manage.go (model management: pull, delete, copy, create, blobs, push), openai.go
// (/v1), promptcache.go (the per-slot prompt cache), residency.go (room for loaded models,
// evictions, speed changes).
package fakeollama

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Paths of the inference endpoints, to restrict a fault to them:
// f.FailWith(503, body, fakeollama.Completions...).
var (
	Completions = []string{"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"}
	Embeddings  = []string{"/api/embed", "/api/embeddings", "/v1/embeddings"}
)

// ServerBusy is the body real Ollama answers with status 503 when its queue is full
// (OLLAMA_MAX_QUEUE); note the two spaces.
const ServerBusy = `{"error":"` + serverBusyMsg + `"}`

const serverBusyMsg = "server busy, please try again.  maximum pending requests exceeded"

// Config describes the fake server. The zero value serves no models.
type Config struct {
	// Models are the names served, e.g. "tiny-llama:latest"; a name without a tag means
	// ":latest", as in Ollama. Names match case-insensitively.
	Models []string
	// Embedding are models that only embed, like BERT models: /api/generate, /api/chat and /v1
	// completions answer 400 "\"NAME\" does not support generate" (or chat), as Ollama does for a
	// model without the completion capability; /api/show reports the bert family and the
	// "embedding" capability. Models whose name contains "bert" or "embed" (tiny-bert,
	// nomic-embed-text) are embedding models without being listed.
	Embedding []string
	// Loaded are the models shown as loaded by /api/ps. A completion or embedding request loads
	// its model (after LoadDelay) and adds it here, as Ollama does.
	Loaded []string
	// Tokens is the number of tokens per completion (default 5). A request's num_predict
	// (options.num_predict, or max_tokens on /v1) overrides it and ends with done_reason "length".
	Tokens int
	// TokenGap is the delay between two generated tokens (streamed chunks).
	TokenGap time.Duration
	// FirstByteDelay is the prompt evaluation time of completions and embeddings: nothing is
	// written before it has passed.
	FirstByteDelay time.Duration
	// PromptTokenCost is the evaluation time of each prompt token a completion does not find in
	// its cache slot, added to FirstByteDelay (see promptcache.go): a follow-up turn of a
	// conversation on the server that answered the previous one evaluates only its new
	// messages. 0 makes the cache invisible in timings; its counters still count.
	PromptTokenCost time.Duration
	// MultiUserCache chooses cache slots as OLLAMA_MULTIUSER_CACHE=1 does: a slot whose whole
	// content starts the prompt is reused; otherwise the least recently used free slot takes
	// the longest common prefix found in any slot (a fork) and evaluates the rest, so Parallel
	// conversations keep their prefixes. Without it (Ollama's default) the free slot with the
	// longest common prefix is taken, the lowest on a tie: conversations that share nothing
	// and arrive one after the other all take slot 0, and each evicts the one before.
	MultiUserCache bool
	// LoadDelay is the time to load a model that is not loaded yet, reported as load_duration
	// (which, as in Ollama, does not include a wait for a parallel slot: only total_duration
	// does).
	LoadDelay time.Duration
	// MaxLoaded is the number of models the box holds at once, like OLLAMA_MAX_LOADED_MODELS:
	// loading one more evicts the least recently used model no request is using, waiting for
	// one to be idle (see residency.go). 0 means no limit.
	MaxLoaded int
	// Version is what /api/version reports (default "0.17.4").
	Version string
	// EmbedDim is the length of embedding vectors (default 32).
	EmbedDim int
	// History is the number of requests Requests keeps (default 100).
	History int
	// Parallel is the number of completions and embeddings processed at once, like
	// OLLAMA_NUM_PARALLEL; the others wait for a slot inside the server. 0 means no limit.
	Parallel int
	// ModelsDir is where the fake pretends to keep its models (OLLAMA_MODELS), as error messages
	// name it; default "/root/.ollama/models", Ollama's directory when it runs as root (its Docker
	// image).
	ModelsDir string
	// MaxContext is the largest options.num_ctx the box has memory for; a completion or
	// embedding asking for more answers 500 "model requires more system memory (…) than is
	// available (…)", as Ollama's scheduler does when the model cannot be loaded that large (a
	// failure any client can provoke). 0 means no limit.
	MaxContext int
	// MaxQueue is the number of requests that may wait for a slot when Parallel is set, like
	// OLLAMA_MAX_QUEUE; beyond it the fake answers 503 with ServerBusy. 0 means Ollama's default,
	// 512; a negative value means none may wait (503 as soon as every slot is taken).
	MaxQueue int
}

// defaultMaxQueue is Ollama's OLLAMA_MAX_QUEUE default.
const defaultMaxQueue = 512

// Request is one request the fake received.
type Request struct {
	Method   string
	Path     string
	RawQuery string
	Header   http.Header
	Body     []byte
	At       time.Time
}

// Cancellation records a request whose client went away before the fake had finished answering.
type Cancellation struct {
	Method, Path string
	// Started is when the request arrived.
	Started time.Time
	// CancelledAt is when the request's context was cancelled (the connection closed or the
	// stream was reset); NoticedAt is when the fake saw it and stopped; Lag is the difference.
	CancelledAt, NoticedAt time.Time
	Lag                    time.Duration
	// Chunks is the number of body chunks written before.
	Chunks int
}

// Server is a running (or stopped) fake Ollama.
type Server struct {
	// URL is "http://127.0.0.1:PORT", set by Start.
	URL string

	cfg     Config
	started time.Time

	inFlight    atomic.Int64
	maxInFlight atomic.Int64

	// Slots (Config.Parallel): sem holds a token per busy slot; waiting counts requests queued
	// for one.
	sem      chan struct{}
	waiting  atomic.Int64
	maxBusy  atomic.Int64
	rejected atomic.Int64
	queued   atomic.Int64 // requests that waited for a slot since the start or ResetStats

	mu      sync.Mutex
	models  []model
	loaded  []string         // keys of loaded models, in load order
	blobs   map[string]blob  // by digest with "-" for ":", as Ollama names its blob files
	pushed  map[string]model // the registry: what was pushed, by key, for pulls to find
	counts  map[string]int
	history []Request // ring of cfg.History entries; next is the oldest once full
	next    int
	cancels []Cancellation
	faults  faults
	ts      *httptest.Server
	addr    string
	dead    bool          // Close was called and Restart was not
	killed  chan struct{} // closed by Close; a new one per incarnation

	promptCacheState
	residencyState
}

// faults are the active fault modes; paths restrict a mode to those request paths (none = all).
type faults struct {
	failStatus int
	failBody   string
	failPaths  []string
	failDelay  time.Duration

	hang      bool
	hangPaths []string

	dieAfter int // -1: off
	diePaths []string

	errAfter int // -1: off
	errMsg   string
	errPaths []string

	slow      time.Duration
	slowPaths []string

	hold      chan struct{} // non-nil while held; closed by Release
	holdPaths []string

	step      chan struct{} // non-nil while stepping; one value per token let through
	stepPaths []string

	pullError string
	pushError string
}

// New starts a fake on a random port of 127.0.0.1.
func New(cfg Config) *Server {
	s := NewUnstarted(cfg)
	s.Start()
	return s
}

// NewUnstarted returns a fake that does not listen yet: call Start or StartAt, or serve
// Handler() yourself.
func NewUnstarted(cfg Config) *Server {
	if cfg.Tokens <= 0 {
		cfg.Tokens = 5
	}
	if cfg.Version == "" {
		cfg.Version = "0.17.4"
	}
	if cfg.EmbedDim <= 0 {
		cfg.EmbedDim = 32
	}
	if cfg.History <= 0 {
		cfg.History = 100
	}
	if cfg.MaxQueue == 0 {
		cfg.MaxQueue = defaultMaxQueue
	}
	if cfg.ModelsDir == "" {
		cfg.ModelsDir = defaultModelsDir
	}
	cfg.Embedding = slices.Clone(cfg.Embedding)
	s := &Server{
		cfg:     cfg,
		started: time.Now(),
		counts:  map[string]int{},
		blobs:   map[string]blob{},
		pushed:  map[string]model{},
		killed:  make(chan struct{}),
	}
	if cfg.Parallel > 0 {
		s.sem = make(chan struct{}, cfg.Parallel)
	}
	s.faults.dieAfter, s.faults.errAfter = -1, -1
	s.SetModels(cfg.Models...)
	s.SetLoaded(cfg.Loaded...)
	return s
}

// Handler serves the fake's API with all its instrumentation and faults, for use on a listener
// of your own. Close then only wakes the requests it holds.
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// Start listens on a random port of 127.0.0.1. It panics if it cannot listen, like httptest.
func (s *Server) Start() {
	if err := s.StartAt("127.0.0.1:0"); err != nil {
		panic(err)
	}
}

// StartAt listens on addr ("127.0.0.1:11434").
func (s *Server) StartAt(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	ts := &httptest.Server{Listener: ln, Config: &http.Server{Handler: s.Handler()}}
	ts.Start()
	s.mu.Lock()
	s.ts = ts
	s.addr = ln.Addr().String()
	if s.URL != ts.URL { // Restart keeps the URL: no write a reader could race with
		s.URL = ts.URL
	}
	s.mu.Unlock()
	return nil
}

// HostPort is "127.0.0.1:PORT".
func (s *Server) HostPort() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Close kills the fake like a dead box: the listener closes (new connections are refused) and
// every open connection is closed at once, in the middle of whatever it was sending. It is
// idempotent; Restart brings the fake back on the same address.
func (s *Server) Close() {
	s.mu.Lock()
	ts, killed, dead := s.ts, s.killed, s.dead
	s.ts, s.dead = nil, true
	s.mu.Unlock()
	if dead {
		return
	}
	if ts != nil {
		ts.Listener.Close()
		ts.CloseClientConnections() // before the handlers wake, so no stream ends cleanly
	}
	close(killed)
	if ts != nil {
		ts.Close()
	}
}

// Restart listens again on the address of the previous Start, after Close. Counters, history
// and faults are kept.
func (s *Server) Restart() error {
	s.mu.Lock()
	addr, dead := s.addr, s.dead
	if dead && addr != "" {
		s.killed, s.dead = make(chan struct{}), false
	}
	s.mu.Unlock()
	if !dead || addr == "" {
		return fmt.Errorf("fakeollama: restart needs a fake that was started and closed")
	}
	return s.StartAt(addr)
}

// FailWith answers every request (or those to paths) with status and body, before anything
// else happens. A body starting with "{" is sent as JSON, anything else as text.
func (s *Server) FailWith(status int, body string, paths ...string) {
	s.FailAfter(0, status, body, paths...)
}

// FailAfter is FailWith answering after d, the time a box takes to fail: a server that answers
// 503 in a millisecond to everything is FailAfter(time.Millisecond, 503, ServerBusy).
func (s *Server) FailAfter(d time.Duration, status int, body string, paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.failStatus, s.faults.failBody, s.faults.failPaths, s.faults.failDelay = status, body, paths, d
}

// HangAfterHeaders makes every request (or those to paths) answer 200 with its headers and then
// send nothing more until the client goes away or the fake is closed.
func (s *Server) HangAfterHeaders(paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.hang, s.faults.hangPaths = true, paths
}

// DieMidStream makes every response (or those to paths) stop after afterChunks body chunks
// (NDJSON lines, SSE events; a non-streamed body is one chunk): the fake flushes what it wrote,
// hijacks the connection and closes it, so the client sees a body that ends without its
// terminating chunk.
func (s *Server) DieMidStream(afterChunks int, paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.dieAfter, s.faults.diePaths = max(afterChunks, 0), paths
}

// ErrorMidStream makes completions (all, or those to paths) fail the way Ollama does when its
// model runner dies after afterChunks tokens: a native stream ends cleanly with an
// {"error":msg} line, an OpenAI stream ends cleanly without "data: [DONE]", and a non-streamed
// completion (or a stream failing before its first token) answers 500 with msg.
// A typical msg: "an error was encountered while running the model: unexpected EOF".
func (s *Server) ErrorMidStream(afterChunks int, msg string, paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.errAfter, s.faults.errMsg, s.faults.errPaths = max(afterChunks, 0), msg, paths
}

// SlowFirstByte delays every request (or those to paths) by d before it is handled.
func (s *Server) SlowFirstByte(d time.Duration, paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.slow, s.faults.slowPaths = d, paths
}

// Hold keeps every request that arrives from now on (or those to paths) waiting before it is
// handled, until Release, ClearFaults or Close: a deterministic way to keep requests in flight.
func (s *Server) Hold(paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.faults.hold == nil {
		s.faults.hold = make(chan struct{})
	}
	s.faults.holdPaths = paths
}

// Release lets held requests go on and stops holding new ones.
func (s *Server) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked()
}

func (s *Server) releaseLocked() {
	if s.faults.hold != nil {
		close(s.faults.hold)
		s.faults.hold = nil
	}
}

// StepTokens makes every completion that arrives from now on (or those to paths) emit each token,
// and then its final chunk, only when Step lets it through: a deterministic way to watch a stream
// grow one token at a time. ClearFaults stops stepping new requests.
func (s *Server) StepTokens(paths ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.faults.step == nil {
		s.faults.step = make(chan struct{}, 1024)
	}
	s.faults.stepPaths = paths
}

// Step lets one token (or the final chunk) of a stepped completion through. Steps given before a
// completion waits for them are kept for it (up to 1024).
func (s *Server) Step() {
	s.mu.Lock()
	ch := s.faults.step
	s.mu.Unlock()
	if ch != nil {
		ch <- struct{}{}
	}
}

// FailPulls makes /api/pull fail the way real Ollama does when the registry is unreachable:
// status 200 and an {"error":msg} line after "pulling manifest" (status 500 when not streamed).
func (s *Server) FailPulls(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.pullError = msg
}

// FailPushes makes /api/push fail the way real Ollama does when the registry is unreachable:
// status 200, "retrieving manifest", then an {"error":msg} line (status 500 when not streamed).
func (s *Server) FailPushes(msg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.pushError = msg
}

// ClearFaults turns every fault mode off and releases held requests. Hung requests stay hung.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked()
	s.faults = faults{dieAfter: -1, errAfter: -1}
}

// Count is the number of requests received on path.
func (s *Server) Count(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[path]
}

// Counts is the number of requests received per path.
func (s *Server) Counts() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.counts)
}

// Requests returns the last Config.History requests, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.history) < s.cfg.History {
		return slices.Clone(s.history)
	}
	return append(slices.Clone(s.history[s.next:]), s.history[:s.next]...)
}

// LastRequest returns the most recent request, if any.
func (s *Server) LastRequest() (Request, bool) {
	r := s.Requests()
	if len(r) == 0 {
		return Request{}, false
	}
	return r[len(r)-1], true
}

// LastRequestTo is the last request to path. A test that asks what its own request looked like
// uses it: the proxy's health probes and list refreshes reach the fake between that request and
// the question, and LastRequest would return one of them.
func (s *Server) LastRequestTo(path string) (Request, bool) {
	r := s.Requests()
	for i := len(r) - 1; i >= 0; i-- {
		if r[i].Path == path {
			return r[i], true
		}
	}
	return Request{}, false
}

// InFlight is the number of requests being handled now.
func (s *Server) InFlight() int { return int(s.inFlight.Load()) }

// MaxInFlight is the highest InFlight seen since the start or ResetStats.
func (s *Server) MaxInFlight() int { return int(s.maxInFlight.Load()) }

// Cancellations returns the requests whose client went away before the fake had finished.
func (s *Server) Cancellations() []Cancellation {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.cancels)
}

// Busy is the number of slots (Config.Parallel) processing a request now; 0 without Parallel.
func (s *Server) Busy() int { return len(s.sem) }

// MaxBusy is the highest Busy seen since the start or ResetStats (0 without Config.Parallel).
func (s *Server) MaxBusy() int { return int(s.maxBusy.Load()) }

// Waiting is the number of requests waiting for a slot inside the fake.
func (s *Server) Waiting() int { return int(s.waiting.Load()) }

// Queued is the number of requests that found every slot taken and waited for one (whether
// they got it or gave up), since the start or ResetStats: what a router that knew every
// server's free slots would have avoided while another server had one.
func (s *Server) Queued() int { return int(s.queued.Load()) }

// Rejected is the number of requests answered 503 ServerBusy because every slot was taken and
// Config.MaxQueue requests were already waiting.
func (s *Server) Rejected() int { return int(s.rejected.Load()) }

// ResetStats clears counters, history, cancellations, the rejection and queued counts, the
// in-flight and busy maxima, the prompt cache's counters (not its contents), and the cold-load
// and eviction counts.
func (s *Server) ResetStats() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts = map[string]int{}
	s.history, s.next, s.cancels = nil, 0, nil
	s.maxInFlight.Store(s.inFlight.Load())
	s.maxBusy.Store(int64(len(s.sem)))
	s.rejected.Store(0)
	s.queued.Store(0)
	s.cacheMu.Lock()
	s.cacheStats = CacheStats{}
	s.cacheMu.Unlock()
	s.coldLoads.Store(0)
	s.evictions.Store(0)
}

// serve instruments a request, applies the fault modes in order (fail, slow, hold, hang, die)
// and dispatches it.
func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for m := s.maxInFlight.Load(); n > m && !s.maxInFlight.CompareAndSwap(m, n); m = s.maxInFlight.Load() {
	}

	var body []byte
	if !isBlobPath(r.URL.Path) { // a blob streams through its digest; it may be gigabytes
		var err error
		if body, err = io.ReadAll(r.Body); err != nil {
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	c := &call{s: s, w: w, r: r, body: body, start: time.Now(), dieAfter: -1, errAfter: -1}
	stop := context.AfterFunc(r.Context(), func() { c.cancelledAt.Store(time.Now().UnixNano()) })
	defer stop()
	defer c.releaseSlot()

	s.mu.Lock()
	s.record(r, body, c.start)
	f := s.faults
	c.killed = s.killed
	s.mu.Unlock()

	path := r.URL.Path
	if f.failStatus != 0 && applies(f.failPaths, path) {
		if !c.wait(f.failDelay) {
			return
		}
		ct := "text/plain; charset=utf-8"
		if len(f.failBody) > 0 && f.failBody[0] == '{' {
			ct = jsonUTF8
		}
		c.w.Header().Set("Content-Type", ct)
		c.w.WriteHeader(f.failStatus)
		io.WriteString(c.w, f.failBody)
		return
	}
	if f.slow > 0 && applies(f.slowPaths, path) && !c.wait(f.slow) {
		return
	}
	if f.hold != nil && applies(f.holdPaths, path) && !c.waitFor(f.hold) {
		return
	}
	if f.hang && applies(f.hangPaths, path) {
		c.w.Header().Set("Content-Type", hangContentType(path))
		c.w.WriteHeader(http.StatusOK)
		http.NewResponseController(c.w).Flush()
		c.waitFor(nil)
		return
	}
	if f.dieAfter >= 0 && applies(f.diePaths, path) {
		c.dieAfter = f.dieAfter
	}
	if f.errAfter >= 0 && applies(f.errPaths, path) {
		c.errAfter, c.errMsg = f.errAfter, f.errMsg
	}
	if f.step != nil && applies(f.stepPaths, path) {
		c.step = f.step
	}
	s.route(c)
}

func (s *Server) record(r *http.Request, body []byte, at time.Time) {
	s.counts[r.URL.Path]++
	req := Request{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Header: r.Header.Clone(), Body: body, At: at}
	if len(s.history) < s.cfg.History {
		s.history = append(s.history, req)
		return
	}
	s.history[s.next] = req
	s.next = (s.next + 1) % s.cfg.History
}

func applies(paths []string, path string) bool {
	return len(paths) == 0 || slices.Contains(paths, path)
}

func hangContentType(path string) string {
	switch path {
	case "/api/generate", "/api/chat", "/api/pull":
		return "application/x-ndjson"
	case "/v1/chat/completions", "/v1/completions":
		return "text/event-stream"
	}
	return jsonUTF8
}

// Slots.

// acquireSlot takes one of Config.Parallel slots for a completion or embedding, waiting in FIFO
// order behind at most Config.MaxQueue others, as Ollama's scheduler does. busy is true when
// the queue was full: the caller answers 503 ServerBusy. ok is false when the client went away
// or the fake was closed while waiting.
func (c *call) acquireSlot() (ok, busy bool) {
	s := c.s
	if s.sem == nil || c.holdsSlot {
		return true, false
	}
	select {
	case s.sem <- struct{}{}:
	default:
		if n := s.waiting.Add(1); n > int64(max(s.cfg.MaxQueue, 0)) {
			s.waiting.Add(-1)
			s.rejected.Add(1)
			return false, true
		}
		s.queued.Add(1)
		select {
		case s.sem <- struct{}{}: // blocked senders are served in arrival order
			s.waiting.Add(-1)
		case <-c.r.Context().Done():
			s.waiting.Add(-1)
			c.notice()
			return false, false
		case <-c.killed:
			s.waiting.Add(-1)
			return false, false
		}
	}
	c.holdsSlot = true
	n := int64(len(s.sem))
	for m := s.maxBusy.Load(); n > m && !s.maxBusy.CompareAndSwap(m, n); m = s.maxBusy.Load() {
	}
	return true, false
}

// releaseSlot gives the request's slot back, if it holds one.
func (c *call) releaseSlot() {
	c.unuse()
	if c.holdsSlot {
		c.holdsSlot = false
		<-c.s.sem
	}
}

// busy answers 503 with Ollama's ErrMaxQueue, in the format of the API the request came in on.
func (c *call) busy() {
	if strings.HasPrefix(c.r.URL.Path, "/v1/") {
		c.openaiModelError(http.StatusServiceUnavailable, serverBusyMsg)
		return
	}
	c.ollamaError(http.StatusServiceUnavailable, serverBusyMsg)
}

// call is one request being answered.
type call struct {
	s           *Server
	w           http.ResponseWriter
	r           *http.Request
	body        []byte
	start       time.Time
	killed      <-chan struct{}
	cancelledAt atomic.Int64
	status      int // sent with the first chunk
	wroteHeader bool
	chunks      int
	dieAfter    int
	errAfter    int // ErrorMidStream: the runner dies before this token
	errMsg      string
	streaming   bool // set by completion handlers, for runnerDied
	noticed     bool
	holdsSlot   bool          // one of Config.Parallel slots
	step        chan struct{} // StepTokens: a value per token let through
	using       string        // the resident model it uses until its slot is released (residency.go)
	loadStart   time.Time     // when it had a slot and asked for its model: load_duration counts from here
}

// header sets the status and content type the first chunk will carry.
func (c *call) header(status int, contentType string) {
	c.status = status
	if contentType != "" {
		c.w.Header().Set("Content-Type", contentType)
	}
}

func (c *call) writeHeader() {
	if !c.wroteHeader {
		c.wroteHeader = true
		c.w.WriteHeader(cmp.Or(c.status, http.StatusOK))
	}
}

// wait sleeps d; false means the client went away or the fake was closed: stop answering.
func (c *call) wait(d time.Duration) bool {
	if d <= 0 {
		return c.alive()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.r.Context().Done():
		c.notice()
		return false
	case <-c.killed:
		return false
	}
}

// stepped waits for Step when the call is stepped (StepTokens); false as for wait.
func (c *call) stepped() bool {
	if c.step == nil {
		return true
	}
	select {
	case <-c.step:
		return true
	case <-c.r.Context().Done():
		c.notice()
		return false
	case <-c.killed:
		return false
	}
}

// waitFor waits until ch is closed (never for nil); false as for wait.
func (c *call) waitFor(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-c.r.Context().Done():
		c.notice()
		return false
	case <-c.killed:
		return false
	}
}

func (c *call) alive() bool {
	if c.r.Context().Err() != nil {
		c.notice()
		return false
	}
	return true
}

// notice records that the client went away, once.
func (c *call) notice() {
	if c.noticed || c.r.Context().Err() == nil {
		return
	}
	c.noticed = true
	now := time.Now()
	cancelled := now
	if ns := c.cancelledAt.Load(); ns != 0 {
		cancelled = time.Unix(0, ns)
	}
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.s.cancels = append(c.s.cancels, Cancellation{
		Method: c.r.Method, Path: c.r.URL.Path, Started: c.start,
		CancelledAt: cancelled, NoticedAt: now, Lag: now.Sub(cancelled), Chunks: c.chunks,
	})
}

// chunk writes one body chunk and flushes it; false means stop (client gone, fake closed, or
// DieMidStream killed the connection).
func (c *call) chunk(b []byte) bool { return c.send(b, true) }

// send writes one body chunk, flushed for streams; a body written unflushed in one piece gets a
// Content-Length, as Ollama's non-streamed answers do.
func (c *call) send(b []byte, flush bool) bool {
	if !c.alive() {
		return false
	}
	select {
	case <-c.killed:
		return false
	default:
	}
	rc := http.NewResponseController(c.w)
	c.writeHeader()
	if c.chunks == c.dieAfter {
		c.die(rc)
		return false
	}
	if _, err := c.w.Write(b); err != nil {
		c.notice()
		return false
	}
	if flush {
		if err := rc.Flush(); err != nil {
			c.notice()
			return false
		}
	}
	c.chunks++
	return true
}

// die sends what was written so far (at least the headers) and closes the connection under it.
func (c *call) die(rc *http.ResponseController) {
	rc.Flush()
	conn, _, err := rc.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler) // HTTP/2: reset the stream instead
	}
	conn.Close()
}
