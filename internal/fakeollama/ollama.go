package fakeollama

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"path"
	"slices"
	"strings"
	"time"
)

// The native API, answered the way Ollama v0.17.4 (gin) answers: errors are {"error":"..."}
// with "application/json; charset=utf-8", streams are NDJSON with one flushed line per token.

const (
	jsonUTF8 = "application/json; charset=utf-8"
	ndjson   = "application/x-ndjson"
)

// route dispatches to the endpoint, or answers 404/405 like gin with HandleMethodNotAllowed.
func (s *Server) route(c *call) {
	methods, handle := s.endpoint(c.r.URL.Path)
	switch {
	case handle == nil:
		c.header(http.StatusNotFound, "text/plain")
		c.send([]byte("404 page not found"), false)
	case !slices.Contains(methods, c.r.Method):
		c.w.Header().Set("Allow", strings.Join(methods, ", "))
		c.header(http.StatusMethodNotAllowed, "text/plain")
		c.send([]byte("405 method not allowed"), false)
	default:
		handle(c)
	}
}

func (s *Server) endpoint(path string) ([]string, func(*call)) {
	get, post := []string{http.MethodGet}, []string{http.MethodPost}
	getHead := []string{http.MethodHead, http.MethodGet} // gin's Allow order
	switch path {
	case "/":
		return getHead, func(c *call) { c.text(http.StatusOK, "Ollama is running") }
	case "/api/version":
		return getHead, func(c *call) { c.json(http.StatusOK, map[string]string{"version": s.cfg.Version}) }
	case "/api/tags":
		return getHead, s.tags
	case "/api/ps":
		return get, s.ps
	case "/api/show":
		return post, s.show
	case "/api/generate":
		return post, s.generate
	case "/api/chat":
		return post, s.chat
	case "/api/embed":
		return post, s.embed
	case "/api/embeddings":
		return post, s.embeddings
	case "/api/pull":
		return post, s.pull
	case "/api/delete":
		return []string{http.MethodDelete}, s.delete
	case "/api/copy":
		return post, s.copyModel
	case "/api/create":
		return post, s.create
	case "/api/push":
		return post, s.push
	case "/v1/chat/completions":
		return post, s.openaiChat
	case "/v1/completions":
		return post, s.openaiCompletion
	case "/v1/embeddings":
		return post, s.openaiEmbeddings
	case "/v1/models":
		return get, s.openaiModels
	case CachePath:
		return get, s.serveCacheStats
	}
	if m, ok := strings.CutPrefix(path, "/v1/models/"); ok && m != "" && !strings.Contains(m, "/") {
		return get, s.openaiModel
	}
	if isBlobPath(path) {
		return []string{http.MethodHead, http.MethodPost}, func(c *call) {
			if c.r.Method == http.MethodHead {
				s.headBlob(c)
			} else {
				s.postBlob(c)
			}
		}
	}
	return nil, nil
}

// Wire types, with Ollama's field order.

type details struct {
	ParentModel       string   `json:"parent_model"`
	Format            string   `json:"format"`
	Family            string   `json:"family"`
	Families          []string `json:"families"`
	ParameterSize     string   `json:"parameter_size"`
	QuantizationLevel string   `json:"quantization_level"`
}

type metrics struct {
	TotalDuration      time.Duration `json:"total_duration,omitempty"`
	LoadDuration       time.Duration `json:"load_duration,omitempty"`
	PromptEvalCount    int           `json:"prompt_eval_count,omitempty"`
	PromptEvalDuration time.Duration `json:"prompt_eval_duration,omitempty"`
	EvalCount          int           `json:"eval_count,omitempty"`
	EvalDuration       time.Duration `json:"eval_duration,omitempty"`
}

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type generateResponse struct {
	Model      string    `json:"model"`
	CreatedAt  time.Time `json:"created_at"`
	Response   string    `json:"response"`
	Done       bool      `json:"done"`
	DoneReason string    `json:"done_reason,omitempty"`
	Context    []int     `json:"context,omitempty"`
	metrics
}

type chatResponse struct {
	Model      string    `json:"model"`
	CreatedAt  time.Time `json:"created_at"`
	Message    message   `json:"message"`
	Done       bool      `json:"done"`
	DoneReason string    `json:"done_reason,omitempty"`
	metrics
}

type progress struct {
	Status    string `json:"status"`
	Digest    string `json:"digest,omitempty"`
	Total     int64  `json:"total,omitempty"`
	Completed int64  `json:"completed,omitempty"`
}

// apiRequest holds the fields of every native request the fake reads.
type apiRequest struct {
	Model    string         `json:"model"`
	Name     string         `json:"name"`
	Prompt   string         `json:"prompt"`
	System   string         `json:"system"`
	Context  []int          `json:"context"`
	Raw      bool           `json:"raw"`
	Messages []message      `json:"messages"`
	Stream   *bool          `json:"stream"`
	Options  map[string]any `json:"options"`
	Input    any            `json:"input"`
}

func (r *apiRequest) streaming() bool { return r.Stream == nil || *r.Stream }

// numPredict reads options.num_predict; 0 when absent.
func (r *apiRequest) numPredict() int {
	n, _ := r.Options["num_predict"].(float64)
	return int(n)
}

// Models.

type model struct {
	name     string // as listed: "tiny-llama:latest"
	key      string // normalised, for matching
	digest   string // 64 hex digits
	size     int64
	modified time.Time
	embed    bool // an embedding model (BERT): it cannot complete; see Config.Embedding
	layers   []layer
}

// displayName is what Ollama lists: a tag always, the default registry and namespace never.
func displayName(name string) string {
	n := strings.TrimSpace(name)
	for _, p := range []string{"registry.ollama.ai/", "library/"} {
		if len(n) > len(p) && strings.EqualFold(n[:len(p)], p) {
			n = n[len(p):]
		}
	}
	if i := strings.LastIndex(n, ":"); i < 0 || i < strings.LastIndex(n, "/") {
		n += ":latest"
	}
	return n
}

func newModel(name string, modified time.Time) model {
	m := model{name: displayName(name), modified: modified}
	m.key = strings.ToLower(m.name)
	sum := sha256.Sum256([]byte(m.key))
	m.digest = hex.EncodeToString(sum[:])
	m.size = 100_000_000 + int64(binary.BigEndian.Uint32(sum[:4])%1_000_000_000)
	m.embed = strings.Contains(m.key, "bert") || strings.Contains(m.key, "embed")
	m.layers = defaultLayers(m)
	return m
}

// file is where m is kept under dir (Config.ModelsDir), as the FROM of /api/show's modelfile
// names it: its model blob, or its name when it has none.
func (m model) file(dir string) string {
	if len(m.layers) > 0 && m.layers[0].kind == "model" {
		return path.Join(dir, "blobs", blobKey(m.layers[0].digest))
	}
	return m.name
}

// newModel is newModel with the embedding models of Config.Embedding.
func (s *Server) newModel(name string, modified time.Time) model {
	m := newModel(name, modified)
	for _, e := range s.cfg.Embedding {
		if strings.ToLower(displayName(e)) == m.key {
			m.embed = true
		}
	}
	return m
}

// capabilities are what /api/show reports, and what Ollama checks before it schedules a
// completion: an embedding model cannot complete, a completion model can also embed.
func (m model) capabilities() []string {
	if m.embed {
		return []string{"embedding"}
	}
	return []string{"completion"}
}

func (m model) details() details {
	if m.embed {
		return details{Format: "gguf", Family: "bert", Families: []string{"bert"}, ParameterSize: "137M", QuantizationLevel: "F16"}
	}
	return details{Format: "gguf", Family: "llama", Families: []string{"llama"}, ParameterSize: "1.2B", QuantizationLevel: "Q4_K_M"}
}

// SetModels replaces the models the fake has, as if they were pulled or deleted.
func (s *Server) SetModels(names ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.models = s.models[:0:0]
	for i, n := range names {
		// Ollama lists the most recently modified first: keep the order given.
		s.addModelLocked(s.newModel(n, s.started.Add(-time.Duration(i)*time.Minute)))
	}
}

// SetLoaded replaces the models /api/ps shows as loaded.
func (s *Server) SetLoaded(names ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = s.loaded[:0:0]
	for _, n := range names {
		s.loaded = append(s.loaded, newModel(n, s.started).key)
	}
}

// Models returns the names /api/tags lists.
func (s *Server) Models() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, m := range s.models {
		out = append(out, m.name)
	}
	return out
}

// Loaded returns the names /api/ps lists.
func (s *Server) Loaded() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, k := range s.loaded {
		out = append(out, displayName(k))
	}
	return out
}

func (s *Server) lookup(name string) (model, bool) {
	if strings.TrimSpace(name) == "" {
		return model{}, false
	}
	key := strings.ToLower(displayName(name))
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.models {
		if m.key == key {
			return m, true
		}
	}
	return model{}, false
}

// load is Ollama's scheduler at work for a completion or embedding: it takes a slot
// (Config.Parallel), answering 503 ServerBusy when the queue is full, then makes m loaded,
// taking LoadDelay when it was not (and evicting another beyond Config.MaxLoaded). The slot is held until the work is done, before the final
// chunk is written (or until the request ends, whichever comes first).
func (c *call) load(m model) bool {
	if limit := c.s.cfg.MaxContext; limit > 0 {
		if n := c.numCtx(); n > limit {
			c.outOfMemory(n, limit)
			return false
		}
	}
	if ok, busy := c.acquireSlot(); !ok {
		if busy {
			c.busy()
		}
		return false
	}
	return c.loadModel(m) // residency.go
}

// numCtx reads options.num_ctx from the request body as Ollama does (encoding/json: keys match
// case-insensitively); 0 when absent.
func (c *call) numCtx() int {
	var req struct {
		Options struct {
			NumCtx float64 `json:"num_ctx"`
		} `json:"options"`
	}
	_ = json.Unmarshal(c.body, &req)
	return int(req.Options.NumCtx)
}

// outOfMemory answers the way Ollama's scheduler does when a model cannot be loaded with the
// context asked for: 500 with llm's error, in the format of the API the request came in on.
// The sizes are made up (64 KiB per token of context), like the fake's models.
func (c *call) outOfMemory(numCtx, limit int) {
	gib := func(tokens int) string { return fmt.Sprintf("%.1f GiB", float64(tokens)*64/(1<<20)) }
	msg := fmt.Sprintf("model requires more system memory (%s) than is available (%s)", gib(numCtx), gib(limit))
	if strings.HasPrefix(c.r.URL.Path, "/v1/") {
		c.openaiModelError(http.StatusInternalServerError, msg)
		return
	}
	c.ollamaError(http.StatusInternalServerError, msg)
}

// Generation.

var words = []string{"Hello", " from", " a", " fake", " Ollama", " server", ",", " token", " by", " token", "."}

// Text is the completion the fake generates with n tokens: the same for every model and prompt.
func Text(n int) string {
	var b strings.Builder
	for i := range n {
		b.WriteString(token(i))
	}
	return b.String()
}

func token(i int) string { return words[i%len(words)] }

// plan is what a completion will do.
type plan struct {
	model  model
	seq    []int  // the prompt's tokens (promptcache.go)
	prompt int    // prompt tokens, as prompt_eval_count reports them
	tokens int    // tokens to generate
	reason string // done_reason
}

func (s *Server) plan(m model, numPredict int, seq []int) plan {
	p := plan{model: m, seq: seq, prompt: max(len(seq), 1), tokens: s.cfg.Tokens, reason: "stop"}
	if numPredict > 0 {
		p.tokens, p.reason = numPredict, "length"
	}
	return p
}

// run is the fake model at work: load if cold, evaluate the prompt (FirstByteDelay), then emit
// the tokens TokenGap apart, and one more gap before the final chunk. false: stop answering.
func (c *call) run(p plan, emit func(tok string) bool) (metrics, bool) {
	if !c.load(p.model) {
		return metrics{}, false
	}
	t1 := time.Now()
	cache := c.s.takeCacheSlot(p.model.key, p.seq, true)
	finished := false
	defer func() {
		// An answer cut short leaves the slot's content as it was: only a finished one is
		// kept, below. Not generated(p.tokens) here: a cancelled request for millions of
		// tokens must not tokenize them all.
		if !finished {
			cache.done(nil, false)
		}
	}()
	if !c.wait(c.s.scaled(c.s.cfg.FirstByteDelay + time.Duration(cache.evaluated())*c.s.cfg.PromptTokenCost)) {
		return metrics{}, false
	}
	t2 := time.Now()
	for i := range p.tokens {
		if i > 0 && !c.wait(c.s.scaled(c.s.cfg.TokenGap)) {
			return metrics{}, false
		}
		if i == c.errAfter {
			c.runnerDied()
			return metrics{}, false
		}
		if !c.stepped() || !emit(token(i)) {
			return metrics{}, false
		}
	}
	if p.tokens > 0 && !c.wait(c.s.scaled(c.s.cfg.TokenGap)) {
		return metrics{}, false
	}
	if !c.stepped() { // the final chunk
		return metrics{}, false
	}
	t3 := time.Now()
	finished = true
	cache.done(generated(p.tokens), true) // before the slot is free: the next one finds it
	cache = nil
	c.releaseSlot() // the work is done: a client that sees the final chunk finds the slot free
	return metrics{
		TotalDuration:      t3.Sub(c.start),
		LoadDuration:       max(t1.Sub(c.loadStart), time.Microsecond),
		PromptEvalCount:    p.prompt,
		PromptEvalDuration: max(t2.Sub(t1), time.Microsecond),
		EvalCount:          p.tokens,
		EvalDuration:       max(t3.Sub(t2), time.Microsecond),
	}, true
}

// runnerDied answers as Ollama does when the model runner fails during a completion: a 500
// before anything was streamed, else an error line (native API) or nothing more (OpenAI API,
// whose writer drops the error and never sends [DONE]).
func (c *call) runnerDied() {
	openai := strings.HasPrefix(c.r.URL.Path, "/v1/")
	switch {
	case c.streaming && c.chunks > 0 && openai:
	case c.streaming && c.chunks > 0:
		c.line(map[string]string{"error": c.errMsg})
	case openai:
		c.openaiModelError(http.StatusInternalServerError, c.errMsg)
	default:
		c.ollamaError(http.StatusInternalServerError, c.errMsg)
	}
}

func (s *Server) generate(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", req.Model))
		return
	}
	if m.embed { // checked before the model is scheduled: no slot, no load
		c.ollamaError(http.StatusBadRequest, cannot(req.Model, "generate"))
		return
	}
	if req.Prompt == "" { // Ollama loads the model and answers one object, streaming or not
		if c.load(m) {
			c.releaseSlot()
			c.json(http.StatusOK, generateResponse{Model: req.Model, CreatedAt: now(), Done: true, DoneReason: "load"})
		}
		return
	}
	msgs := []message{{Role: "user", Content: req.Prompt}}
	if req.System != "" && !req.Raw {
		msgs = append([]message{{Role: "system", Content: req.System}}, msgs...)
	}
	p := s.plan(m, req.numPredict(), promptOf(req.Context, msgs...))
	final := func(text string, mt metrics) generateResponse {
		r := generateResponse{Model: req.Model, CreatedAt: now(), Response: text, Done: true, DoneReason: p.reason, metrics: mt}
		if !req.Raw { // the prompt and the answer, which a follow-up sends back
			r.Context = append(append([]int{}, p.seq...), generated(p.tokens)...)
		}
		return r
	}
	if req.streaming() {
		c.streaming = true
		c.header(http.StatusOK, ndjson)
		mt, ok := c.run(p, func(tok string) bool {
			return c.line(generateResponse{Model: req.Model, CreatedAt: now(), Response: tok})
		})
		if ok {
			c.line(final("", mt))
		}
		return
	}
	var text strings.Builder
	if mt, ok := c.run(p, func(tok string) bool { text.WriteString(tok); return true }); ok {
		c.json(http.StatusOK, final(text.String(), mt))
	}
}

func (s *Server) chat(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	if strings.TrimSpace(req.Model) == "" {
		c.ollamaError(http.StatusBadRequest, "model is required")
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", req.Model))
		return
	}
	if m.embed {
		c.ollamaError(http.StatusBadRequest, cannot(req.Model, "chat"))
		return
	}
	assistant := func(text string) message { return message{Role: "assistant", Content: text} }
	if len(req.Messages) == 0 { // Ollama loads the model and answers one object
		if c.load(m) {
			c.releaseSlot()
			c.json(http.StatusOK, chatResponse{Model: req.Model, CreatedAt: now(), Message: assistant(""), Done: true, DoneReason: "load"})
		}
		return
	}
	p := s.plan(m, req.numPredict(), promptOf(nil, req.Messages...))
	final := func(text string, mt metrics) chatResponse {
		return chatResponse{Model: req.Model, CreatedAt: now(), Message: assistant(text), Done: true, DoneReason: p.reason, metrics: mt}
	}
	if req.streaming() {
		c.streaming = true
		c.header(http.StatusOK, ndjson)
		mt, ok := c.run(p, func(tok string) bool {
			return c.line(chatResponse{Model: req.Model, CreatedAt: now(), Message: assistant(tok)})
		})
		if ok {
			c.line(final("", mt))
		}
		return
	}
	var text strings.Builder
	if mt, ok := c.run(p, func(tok string) bool { text.WriteString(tok); return true }); ok {
		c.json(http.StatusOK, final(text.String(), mt))
	}
}

// cannot is Ollama's answer (status 400) to a completion with a model that only embeds: what is
// "generate" or "chat", name as the request spelled it.
func cannot(name, what string) string { return fmt.Sprintf("%q does not support %s", name, what) }

// Embeddings.

// embedInputs reads /api/embed's input: a string or an array of strings.
func embedInputs(in any) ([]string, bool) {
	switch v := in.(type) {
	case nil:
		return nil, true
	case string:
		if v == "" {
			return nil, true
		}
		return []string{v}, true
	case []any:
		var out []string
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, false
			}
			out = append(out, s)
		}
		return out, true
	}
	return nil, false
}

// vector is a deterministic unit vector for text.
func vector(text string, dim int) []float32 {
	h := fnv.New64a()
	h.Write([]byte(text))
	seed := h.Sum64()
	r := rand.New(rand.NewPCG(seed, seed>>1|1))
	v := make([]float32, dim)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return normalize(v)
}

// normalize scales v to unit length, as Ollama does with every embedding.
func normalize(v []float32) []float32 {
	var sum float64
	for _, x := range v {
		sum += float64(x) * float64(x)
	}
	norm := float32(1 / max(math.Sqrt(sum), 1e-12))
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = x * norm
	}
	return out
}

// embedAll computes the vectors for inputs the way a model would: load, then evaluate.
func (c *call) embedAll(m model, inputs []string) ([][]float32, metrics, bool) {
	if !c.load(m) {
		return nil, metrics{}, false
	}
	t1 := time.Now()
	var seq []int
	for _, in := range inputs {
		seq = append(seq, tokens("user", in)...)
	}
	// Ollama's runner takes a cache slot for an embedding without reusing it, which empties it.
	c.s.takeCacheSlot(m.key, seq, false).done(nil, false)
	if !c.wait(c.s.scaled(c.s.cfg.FirstByteDelay)) {
		return nil, metrics{}, false
	}
	out := make([][]float32, 0, len(inputs))
	count := 0
	for _, in := range inputs {
		out = append(out, vector(in, c.s.cfg.EmbedDim))
		count += max(len(strings.Fields(in)), 1)
	}
	c.releaseSlot()
	return out, metrics{
		TotalDuration:   time.Since(c.start),
		LoadDuration:    max(t1.Sub(c.loadStart), time.Microsecond),
		PromptEvalCount: count,
	}, true
}

func (s *Server) embed(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	inputs, ok := embedInputs(req.Input)
	if !ok {
		c.ollamaError(http.StatusBadRequest, "invalid input type")
		return
	}
	if strings.TrimSpace(req.Model) == "" {
		c.ollamaError(http.StatusInternalServerError, unqualifiedEmpty)
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.ollamaError(http.StatusNotFound, notFoundTryPulling(req.Model))
		return
	}
	type response struct {
		Model      string      `json:"model"`
		Embeddings [][]float32 `json:"embeddings"`
		metrics
	}
	vecs, mt, ok := c.embedAll(m, inputs)
	if !ok {
		return
	}
	if len(inputs) == 0 {
		mt = metrics{}
	}
	c.json(http.StatusOK, response{Model: req.Model, Embeddings: vecs, metrics: metrics{
		TotalDuration: mt.TotalDuration, LoadDuration: mt.LoadDuration, PromptEvalCount: mt.PromptEvalCount,
	}})
}

func (s *Server) embeddings(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	if strings.TrimSpace(req.Model) == "" {
		c.ollamaError(http.StatusBadRequest, "model is required")
		return
	}
	m, ok := s.lookup(req.Model)
	if !ok {
		c.ollamaError(http.StatusNotFound, notFoundTryPulling(req.Model))
		return
	}
	var inputs []string
	if req.Prompt != "" {
		inputs = []string{req.Prompt}
	}
	vecs, _, ok := c.embedAll(m, inputs)
	if !ok {
		return
	}
	e := []float64{}
	for _, v := range vecs {
		for _, x := range v {
			e = append(e, float64(x))
		}
	}
	c.json(http.StatusOK, map[string][]float64{"embedding": e})
}

// unqualifiedEmpty is Ollama's answer (status 500) to an embed request without a model.
const unqualifiedEmpty = "unqualified name: registry.ollama.ai/library/!MISSING!:latest"

// notFoundTryPulling is what Ollama answers when the scheduler cannot find the model (embed
// endpoints); generate, chat and show say "model 'NAME' not found" instead.
func notFoundTryPulling(name string) string {
	return fmt.Sprintf("model %q not found, try pulling it first", name)
}

// Model reads.

func (s *Server) tags(c *call) {
	type entry struct {
		Name       string    `json:"name"`
		Model      string    `json:"model"`
		ModifiedAt time.Time `json:"modified_at"`
		Size       int64     `json:"size"`
		Digest     string    `json:"digest"`
		Details    details   `json:"details"`
	}
	s.mu.Lock()
	list := []entry{}
	for _, m := range s.models {
		list = append(list, entry{m.name, m.name, m.modified, m.size, m.digest, m.details()})
	}
	s.mu.Unlock()
	slices.SortStableFunc(list, func(a, b entry) int { return b.ModifiedAt.Compare(a.ModifiedAt) })
	c.json(http.StatusOK, map[string]any{"models": list})
}

func (s *Server) ps(c *call) {
	type entry struct {
		Name          string    `json:"name"`
		Model         string    `json:"model"`
		Size          int64     `json:"size"`
		Digest        string    `json:"digest"`
		Details       details   `json:"details"`
		ExpiresAt     time.Time `json:"expires_at"`
		SizeVRAM      int64     `json:"size_vram"`
		ContextLength int       `json:"context_length"`
	}
	s.mu.Lock()
	list := []entry{}
	for _, k := range s.loaded {
		m := s.newModel(k, s.started)
		if i := slices.IndexFunc(s.models, func(o model) bool { return o.key == k }); i >= 0 {
			m = s.models[i]
		}
		list = append(list, entry{m.name, m.name, m.size, m.digest, m.details(), time.Now().Add(5 * time.Minute), 0, 4096})
	}
	s.mu.Unlock()
	c.json(http.StatusOK, map[string]any{"models": list})
}

func (s *Server) show(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	name := cmp.Or(req.Model, req.Name)
	if name == "" {
		c.ollamaError(http.StatusBadRequest, "model is required")
		return
	}
	m, ok := s.lookup(name)
	if !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", name))
		return
	}
	from := m.file(s.cfg.ModelsDir)
	info, tensors := m.gguf(s.cfg.EmbedDim)
	// Over 2 KB: net/http sends it chunked, as Ollama's answer is.
	c.json(http.StatusOK, struct {
		Modelfile    string         `json:"modelfile"`
		Parameters   string         `json:"parameters"`
		Template     string         `json:"template"`
		Details      details        `json:"details"`
		ModelInfo    map[string]any `json:"model_info"`
		Tensors      []tensor       `json:"tensors"`
		Capabilities []string       `json:"capabilities"`
		ModifiedAt   time.Time      `json:"modified_at"`
	}{
		Modelfile: fmt.Sprintf("# Modelfile generated by \"ollama show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM %s\n\nFROM %s\nTEMPLATE {{ .Prompt }}\nPARAMETER num_ctx 4096\n",
			m.name, from),
		Parameters:   "num_ctx                        4096",
		Template:     "{{ .Prompt }}",
		Details:      m.details(),
		ModelInfo:    info,
		Tensors:      tensors,
		Capabilities: m.capabilities(),
		ModifiedAt:   m.modified,
	})
}

// tensor is one tensor of a model, as /api/show lists it.
type tensor struct {
	Name  string   `json:"name"`
	Type  string   `json:"type"`
	Shape []uint64 `json:"shape"`
}

// gguf is what /api/show reads from a model's GGUF file: its metadata (model_info, with the
// keys Ollama's tiny models have; the tokenizer's arrays are null, as without "verbose") and
// its tensors. A completion model is a llama of 16 blocks quantized Q4_K_M, an embedding model
// a bert of 12 blocks in F16; both have embeddings of dim values, the length of the vectors the
// fake computes.
func (m model) gguf(dim int) (map[string]any, []tensor) {
	e := uint64(dim)
	if m.embed {
		const blocks, ff, vocab, ctx = 12, 3072, 30522, 2048
		info := map[string]any{
			"general.architecture":              "bert",
			"general.file_type":                 1, // F16
			"general.parameter_count":           136_731_648,
			"bert.attention.causal":             false,
			"bert.attention.head_count":         12,
			"bert.attention.layer_norm_epsilon": 1e-12,
			"bert.block_count":                  blocks,
			"bert.context_length":               ctx,
			"bert.embedding_length":             dim,
			"bert.feed_forward_length":          ff,
			"bert.pooling_type":                 1, // mean
			"tokenizer.ggml.add_bos_token":      true,
			"tokenizer.ggml.add_eos_token":      true,
			"tokenizer.ggml.cls_token_id":       101,
			"tokenizer.ggml.mask_token_id":      103,
			"tokenizer.ggml.model":              "bert",
			"tokenizer.ggml.padding_token_id":   0,
			"tokenizer.ggml.seperator_token_id": 102, // sic
			"tokenizer.ggml.token_type":         nil,
			"tokenizer.ggml.tokens":             nil,
			"tokenizer.ggml.unknown_token_id":   100,
		}
		var ts []tensor
		for i := range blocks {
			blk := fmt.Sprintf("blk.%d.", i)
			for _, t := range []tensor{
				{"attn_k.bias", "F32", []uint64{e}}, {"attn_k.weight", "F16", []uint64{e, e}},
				{"attn_output.bias", "F32", []uint64{e}}, {"attn_output.weight", "F16", []uint64{e, e}},
				{"attn_output_norm.bias", "F32", []uint64{e}}, {"attn_output_norm.weight", "F32", []uint64{e}},
				{"attn_q.bias", "F32", []uint64{e}}, {"attn_q.weight", "F16", []uint64{e, e}},
				{"attn_v.bias", "F32", []uint64{e}}, {"attn_v.weight", "F16", []uint64{e, e}},
				{"ffn_down.bias", "F32", []uint64{e}}, {"ffn_down.weight", "F16", []uint64{ff, e}},
				{"ffn_up.bias", "F32", []uint64{ff}}, {"ffn_up.weight", "F16", []uint64{e, ff}},
				{"layer_output_norm.bias", "F32", []uint64{e}}, {"layer_output_norm.weight", "F32", []uint64{e}},
			} {
				t.Name = blk + t.Name
				ts = append(ts, t)
			}
		}
		ts = append(ts,
			tensor{"position_embd.weight", "F16", []uint64{e, ctx}},
			tensor{"token_embd.weight", "F16", []uint64{e, vocab}},
			tensor{"token_embd_norm.bias", "F32", []uint64{e}},
			tensor{"token_embd_norm.weight", "F32", []uint64{e}},
			tensor{"token_types.weight", "F32", []uint64{e, 2}},
		)
		return info, ts
	}
	const blocks, heads, kvHeads, ff, vocab = 16, 32, 8, 8192, 32000
	kv := max(e*kvHeads/heads, 1)
	info := map[string]any{
		"general.architecture":                   "llama",
		"general.file_type":                      15, // Q4_K_M
		"general.parameter_count":                1_235_814_400,
		"llama.attention.head_count":             heads,
		"llama.attention.head_count_kv":          kvHeads,
		"llama.attention.layer_norm_rms_epsilon": 1e-05,
		"llama.block_count":                      blocks,
		"llama.context_length":                   4096,
		"llama.embedding_length":                 dim,
		"llama.feed_forward_length":              ff,
		"llama.rope.dimension_count":             max(dim/heads, 1),
		"llama.rope.freq_base":                   10000,
		"llama.vocab_size":                       vocab,
		"tokenizer.ggml.add_bos_token":           true,
		"tokenizer.ggml.add_eos_token":           false,
		"tokenizer.ggml.bos_token_id":            1,
		"tokenizer.ggml.eos_token_id":            2,
		"tokenizer.ggml.model":                   "llama",
		"tokenizer.ggml.scores":                  nil,
		"tokenizer.ggml.token_type":              nil,
		"tokenizer.ggml.tokens":                  nil,
		"tokenizer.ggml.unknown_token_id":        0,
	}
	var ts []tensor
	for i := range blocks {
		blk := fmt.Sprintf("blk.%d.", i)
		for _, t := range []tensor{
			{"attn_k.weight", "Q4_K", []uint64{e, kv}}, {"attn_norm.weight", "F32", []uint64{e}},
			{"attn_output.weight", "Q4_K", []uint64{e, e}}, {"attn_q.weight", "Q4_K", []uint64{e, e}},
			{"attn_v.weight", "Q6_K", []uint64{e, kv}}, {"ffn_down.weight", "Q6_K", []uint64{ff, e}},
			{"ffn_gate.weight", "Q4_K", []uint64{e, ff}}, {"ffn_norm.weight", "F32", []uint64{e}},
			{"ffn_up.weight", "Q4_K", []uint64{e, ff}},
		} {
			t.Name = blk + t.Name
			ts = append(ts, t)
		}
	}
	ts = append(ts,
		tensor{"output.weight", "Q6_K", []uint64{e, vocab}},
		tensor{"output_norm.weight", "F32", []uint64{e}},
		tensor{"token_embd.weight", "Q6_K", []uint64{e, vocab}},
	)
	return info, ts
}

// Writing.

func now() time.Time { return time.Now().UTC() }

// decodeOllama reads the body as gin's ShouldBindJSON does, answering 400 on failure.
func (c *call) decodeOllama(v any) bool {
	err := json.NewDecoder(bytes.NewReader(c.body)).Decode(v)
	switch {
	case errors.Is(err, io.EOF):
		c.ollamaError(http.StatusBadRequest, "missing request body")
	case err != nil:
		c.ollamaError(http.StatusBadRequest, err.Error())
	}
	return err == nil
}

func (c *call) ollamaError(status int, msg string) {
	c.json(status, map[string]string{"error": msg})
}

// json answers v as gin's c.JSON does: no trailing newline.
func (c *call) json(status int, v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	c.header(status, jsonUTF8)
	return c.send(b, false)
}

// line writes v as one NDJSON line.
func (c *call) line(v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return c.chunk(append(b, '\n'))
}

func (c *call) text(status int, body string) {
	c.header(status, "text/plain; charset=utf-8")
	c.send([]byte(body), false)
}
