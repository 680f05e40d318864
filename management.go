package ollamaflow

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
)

// This file answers the model endpoints that concern the whole pool rather
// than one server: the aggregated lists (/api/tags, /v1/models, /api/ps) and
// model management fanned out to every eligible backend (pull, delete,
// copy, create, blob uploads).

// serveTags answers GET /api/tags with the union of the models on the
// frontend's eligible backends, each once, in Ollama's shape.
func (h *Handler) serveTags(w http.ResponseWriter, r *http.Request, cands []*backend) error {
	entries := h.unionModels(r.Context(), cands)
	var buf bytes.Buffer
	buf.WriteString(`{"models":[`)
	for i, e := range entries {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(e.raw)
	}
	buf.WriteString("]}")
	return writeJSON(w, http.StatusOK, buf.Bytes())
}

// serveModelList answers GET /v1/models with the same union in OpenAI's
// shape, as Ollama's own compatibility layer builds it.
func (h *Handler) serveModelList(w http.ResponseWriter, r *http.Request, cands []*backend) error {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	list := struct {
		Object string  `json:"object"`
		Data   []model `json:"data"`
	}{Object: "list", Data: []model{}}
	for _, e := range h.unionModels(r.Context(), cands) {
		list.Data = append(list.Data, model{ID: e.name, Object: "model", Created: e.modified.Unix(), OwnedBy: ownerOf(e.name)})
	}
	body, _ := json.Marshal(list)
	return writeJSON(w, http.StatusOK, body)
}

type modelEntry struct {
	name     string
	modified time.Time
	raw      []byte
}

// unionModels refreshes the candidates' lists (at most once a second per
// server) and merges them: each model once, taken from the first backend in
// config order that has it, limited to the frontend's and the tenant's allow-lists, newest
// first like Ollama's own list.
func (h *Handler) unionModels(ctx context.Context, cands []*backend) []modelEntry {
	t := tenantOf(ctx)
	refreshAll(ctx, cands, minRefreshGap)
	seen := make(map[string]bool)
	var out []modelEntry
	for _, b := range cands {
		for key, raw := range b.srv.models.Load().present {
			if seen[key] || !h.modelAllowed(key) || !t.modelAllowed(key) {
				continue
			}
			seen[key] = true
			e := gjson.ParseBytes(raw)
			name := e.Get("name").String()
			if name == "" {
				name = e.Get("model").String()
			}
			out = append(out, modelEntry{name: name, modified: e.Get("modified_at").Time(), raw: raw})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].modified.Equal(out[j].modified) {
			return out[i].modified.After(out[j].modified)
		}
		return out[i].name < out[j].name
	})
	return out
}

func (h *Handler) modelAllowed(key string) bool {
	if h.models == nil {
		return true
	}
	_, ok := h.models[key]
	return ok
}

// ownerOf is the namespace of a model name, as OpenAI's owned_by:
// "library" for Ollama's own models.
func ownerOf(name string) string {
	n := strings.ToLower(name)
	if i := strings.LastIndexByte(n, ':'); i > strings.LastIndexByte(n, '/') {
		n = n[:i]
	}
	parts := strings.Split(n, "/")
	if len(parts) >= 2 {
		return parts[len(parts)-2]
	}
	return "library"
}

// servePS answers GET /api/ps with the models loaded on each eligible
// backend, each entry tagged with "backend". It answers from the lists
// discovery keeps, read at most psMaxAge ago and after any model a request
// found loaded since (`ollama ps` right after `ollama run` shows the model):
// other lists are read again, once per server however many clients ask at
// the same time. A server whose latest read failed contributes nothing.
func (h *Handler) servePS(w http.ResponseWriter, r *http.Request, cands []*backend) error {
	oldest := time.Now().Add(-psMaxAge)
	calls := make([]*refreshCall, len(cands))
	for i, b := range cands {
		since, strict := oldest, false
		if learned := b.srv.models.Load().learnedAt; learned.After(since) {
			since, strict = learned, true // only a read that started after it shows it
		}
		var fresh bool
		if calls[i], fresh = b.srv.startRefresh(since, strict); !fresh {
			calls[i] = nil // a read is in progress, older than the news: wait, then read
			_ = b.srv.refreshSince(r.Context(), since, strict)
		}
	}
	for _, c := range calls {
		if c == nil {
			continue
		}
		select {
		case <-c.done:
		case <-r.Context().Done():
			return nil
		}
	}
	var buf bytes.Buffer
	buf.WriteString(`{"models":[`)
	n := 0
	for _, b := range cands {
		if b.srv.lastReadFailed() {
			continue
		}
		snap := b.srv.models.Load()
		for _, raw := range snap.ps {
			m := gjson.ParseBytes(raw)
			name := m.Get("name").String()
			if name == "" {
				name = m.Get("model").String()
			}
			key := normalizeModel(name)
			if !snap.isLoaded(key) || !h.modelAllowed(key) || !tenantOf(r.Context()).modelAllowed(key) {
				continue // unloaded since (a request found it missing), or not for this frontend
			}
			tagged, err := sjson.SetBytes(raw, "backend", b.cfg.Name)
			if err != nil {
				continue
			}
			if n > 0 {
				buf.WriteByte(',')
			}
			buf.Write(tagged)
			n++
		}
	}
	buf.WriteString("]}")
	return writeJSON(w, http.StatusOK, buf.Bytes())
}

// serveMetadata answers /api/show, /api/version and /v1/models/{model}
// from one of cands (healthy, not draining, and with the model when one is
// named), outside the slot accounting and the queue: `ollama run` asks
// /api/show before it generates, and must not wait behind generations (nor
// get 429) because every inference slot is busy. The answers are small and
// quick, so they take no capacity worth counting. A server that cannot be
// reached, answers 502/503/504 or lacks the model gives way to the next.
func (h *Handler) serveMetadata(w http.ResponseWriter, r *http.Request, api apiFormat, body []byte, cands []*backend) error {
	order := metadataOrder(cands, atomic.AddUint64(&h.rrCounter, 1))
	cause := "no backend answered"
	for i, b := range order {
		if i > h.retries {
			break
		}
		last := i == len(order)-1 || i == h.retries
		ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.FirstByteTimeout))
		res, err := h.roundTrip(b, h.outboundRequest(ctx, r, b, body))
		if err != nil {
			cancel()
			if r.Context().Err() != nil {
				return nil // the client left
			}
			cause = fmt.Sprintf("backend %s: %s", b.cfg.Name, failureInWords(err))
			h.logAttempt(b, "metadata request failed", redactURLError(err))
			continue
		}
		if !last && retryable(res.StatusCode) {
			res.Body.Close()
			cancel()
			cause = fmt.Sprintf("backend %s answered %d", b.cfg.Name, res.StatusCode)
			continue
		}
		if !last && res.StatusCode == http.StatusNotFound {
			missing, head := modelMissing(res)
			if missing {
				res.Body.Close()
				cancel()
				b.srv.poke() // its lists are stale: read them again
				cause = fmt.Sprintf("backend %s does not have the model", b.cfg.Name)
				continue
			}
			res.Body = readCloser{io.MultiReader(bytes.NewReader(head), res.Body), res.Body}
		}
		stripHopByHop(res.Header)
		hdr := w.Header()
		copyBackendHeaders(hdr, res.Header)
		hdr.Set("X-OllamaFlow-Backend", b.cfg.Name)
		w.WriteHeader(res.StatusCode)
		if r.Method != http.MethodHead {
			_, _ = io.Copy(w, res.Body)
		}
		res.Body.Close()
		cancel()
		return nil
	}
	return h.fail(w, api, http.StatusBadGateway, "no backend could serve the request: "+cause)
}

// metadataOrder is the order cands are tried in for a metadata request:
// the servers that have not been failing first, the least busy first
// among them, equals taken in turn so no one server answers them all.
func metadataOrder(cands []*backend, turn uint64) []*backend {
	n := len(cands)
	out := make([]*backend, 0, n)
	for i := range n {
		out = append(out, cands[(int(turn%uint64(n))+i)%n])
	}
	sort.SliceStable(out, func(i, j int) bool {
		fi, fj := out[i].srv.failStreak.Load(), out[j].srv.failStreak.Load()
		if fi != fj {
			return fi < fj
		}
		return out[i].srv.inFlight.Load() < out[j].srv.inFlight.Load()
	})
	return out
}

func writeJSON(w http.ResponseWriter, status int, body []byte) error {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	return nil
}

// answer is one backend's answer to a fanned-out request.
type answer struct {
	b      *backend
	status int    // 0: no answer
	body   []byte // the error body, or the whole body of a short answer
	err    string // why it failed, "" on success
}

// send makes one management request to b, outside the slot accounting:
// management must not wait behind inference, nor take its capacity.
func (h *Handler) send(ctx context.Context, r *http.Request, b *backend, body io.Reader, size int64) (*http.Response, error) {
	out := h.outboundRequest(ctx, r, b, nil)
	if body != nil {
		out.Body = io.NopCloser(body)
		out.ContentLength = size
		if size < 0 {
			out.ContentLength = -1
		}
	}
	res, err := h.roundTrip(b, out)
	if err != nil {
		return nil, inWords(err) // its text reaches the client (answers, progress)
	}
	return res, nil
}

// fanOut sends pull, delete, copy and create to every eligible backend at
// once and merges their answers into one.
func (h *Handler) fanOut(w http.ResponseWriter, r *http.Request, api apiFormat, body []byte, cands []*backend) error {
	switch r.URL.Path {
	case "/api/pull", "/api/create":
		// Ollama's pull and create take stream as *bool: unset streams.
		f, err := readFields(body, modelNone, apiOllama, false)
		if err != nil {
			return h.fail(w, api, http.StatusBadRequest, err.Error())
		}
		clientStreams := f.streams(apiOllama)
		// The backends always stream: their progress is how we tell
		// success from failure. Every spelling of stream goes, as for a pin.
		upstream, err := alwaysStream.apply(body)
		if err != nil {
			return h.fail(w, api, http.StatusBadRequest, err.Error())
		}
		return h.mergeProgress(w, r, upstream, cands, clientStreams)
	default: // delete, copy
		if !isJSONObject(body) {
			return h.fail(w, api, http.StatusBadRequest, "request body must be a JSON object")
		}
		answers := make([]answer, len(cands))
		var wg sync.WaitGroup
		for i, b := range cands {
			wg.Add(1)
			go func() {
				defer wg.Done()
				answers[i] = h.shortAnswer(r, b, bytes.NewReader(body), int64(len(body)))
			}()
		}
		wg.Wait()
		refreshAll(r.Context(), cands, 0) // routing sees the change at once
		return h.mergeShort(w, api, answers, true)
	}
}

// alwaysStream pins stream on for the backends of a fanned-out pull or
// create.
var alwaysStream = &pins{root: []pinNode{{name: "stream", keyRaw: `"stream"`, value: "true"}}, extra: len(`,"stream":true`)}

// shortAnswer sends a request whose answer is small and reads it whole.
func (h *Handler) shortAnswer(r *http.Request, b *backend, body io.Reader, size int64) answer {
	res, err := h.send(r.Context(), r, b, body, size)
	if err != nil {
		return answer{b: b, err: err.Error()}
	}
	defer res.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	a := answer{b: b, status: res.StatusCode, body: msg}
	if res.StatusCode >= 300 {
		a.err = fmt.Sprintf("status %d", res.StatusCode)
		if e := gjson.GetBytes(msg, "error").String(); e != "" {
			a.err += ": " + e
		}
	}
	return a
}

// mergeShort turns the answers to a delete, copy or blob request into one.
// Every backend succeeding is success. With notFoundOK, backends answering
// 404 (they never had the model) don't count as failures as long as one
// succeeded; if all answered 404 the client gets that 404.
func (h *Handler) mergeShort(w http.ResponseWriter, api apiFormat, answers []answer, notFoundOK bool) error {
	var ok, notFound []answer
	var failed []string
	for _, a := range answers {
		switch {
		case a.err == "":
			ok = append(ok, a)
		case notFoundOK && a.status == http.StatusNotFound:
			notFound = append(notFound, a)
		default:
			failed = append(failed, a.b.cfg.Name+" ("+a.err+")")
		}
	}
	switch {
	case len(failed) > 0:
		return h.fail(w, api, http.StatusBadGateway, "failed on backends "+strings.Join(failed, ", "))
	case len(ok) == 0 && len(notFound) > 0:
		a := notFound[0]
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(a.status)
		_, _ = w.Write(a.body)
		return nil
	default:
		a := ok[0]
		if len(a.body) > 0 {
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
		}
		w.WriteHeader(a.status)
		_, _ = w.Write(a.body)
		return nil
	}
}

// progress merges the NDJSON progress of one operation on several
// backends into one stream.
type progress struct {
	mu      sync.Mutex
	w       io.Writer
	rc      *http.ResponseController
	stream  bool
	targets int
	// per digest: the blob's size and each backend's completed bytes
	totals    map[string]int64
	completed map[string]map[string]int64
	failed    []string
}

// line writes one NDJSON line to the client (when it streams).
func (p *progress) line(v []byte) {
	if !p.stream {
		return
	}
	_, _ = p.w.Write(v)
	_, _ = p.w.Write([]byte{'\n'})
	_ = p.rc.Flush()
}

// add passes on one backend's progress line. Per-blob progress is merged
// into one figure per digest (the average over all targets), so a client
// such as `ollama pull` draws one steady bar per layer instead of bars
// jumping between servers. Everything else is passed on tagged with the
// backend's name.
func (p *progress) add(backendName string, raw []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	digest := gjson.GetBytes(raw, "digest").String()
	total := gjson.GetBytes(raw, "total")
	if digest != "" && total.Exists() {
		if p.completed[digest] == nil {
			p.completed[digest] = make(map[string]int64)
		}
		p.totals[digest] = max(p.totals[digest], total.Int())
		p.completed[digest][backendName] = gjson.GetBytes(raw, "completed").Int()
		var sum int64
		for _, c := range p.completed[digest] {
			sum += c
		}
		out := fmt.Appendf(nil, `{"status":%q,"digest":%q,"total":%d,"completed":%d,"backend":%q}`,
			gjson.GetBytes(raw, "status").String(), digest, p.totals[digest], sum/int64(p.targets), backendName)
		p.line(out)
		return
	}
	tagged, err := sjson.SetBytes(raw, "backend", backendName)
	if err != nil {
		return
	}
	p.line(tagged)
}

// fail records a backend's failure and tells the client as a status line:
// an "error" line would make Ollama's clients stop reading while other
// backends are still working.
func (p *progress) fail(backendName, msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failed = append(p.failed, backendName+" ("+msg+")")
	out, _ := json.Marshal(map[string]string{"status": "failed on backend " + backendName + ": " + msg, "backend": backendName})
	p.line(out)
}

// mergeProgress fans a pull or create out and merges the progress streams.
// The merged stream ends with {"status":"success"} only if every backend
// succeeded, else with an error line naming the failed ones.
func (h *Handler) mergeProgress(w http.ResponseWriter, r *http.Request, body []byte, cands []*backend, stream bool) error {
	p := &progress{w: w, rc: http.NewResponseController(w), stream: stream, targets: len(cands),
		totals: make(map[string]int64), completed: make(map[string]map[string]int64)}
	if stream {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		_ = p.rc.Flush()
	}
	var wg sync.WaitGroup
	for _, b := range cands {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.followProgress(r, b, body, p)
		}()
	}
	wg.Wait()
	if r.Context().Err() != nil {
		return nil
	}
	refreshAll(r.Context(), cands, 0) // routing sees the new model at once
	if len(p.failed) > 0 {
		sort.Strings(p.failed)
		msg := "failed on backends " + strings.Join(p.failed, ", ")
		if !stream {
			return h.fail(w, apiOllama, http.StatusBadGateway, msg)
		}
		p.line(errorBody(apiOllama, msg, "", nil))
		return nil
	}
	if !stream {
		return writeJSON(w, http.StatusOK, []byte(`{"status":"success"}`))
	}
	p.line([]byte(`{"status":"success"}`))
	return nil
}

// followProgress runs the operation on one backend and feeds its progress
// lines to p, holding back its own "success" for the merged one.
func (h *Handler) followProgress(r *http.Request, b *backend, body []byte, p *progress) {
	res, err := h.send(r.Context(), r, b, bytes.NewReader(body), int64(len(body)))
	if err != nil {
		if r.Context().Err() == nil {
			p.fail(b.cfg.Name, err.Error())
		}
		return
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(res.Body, 4<<10))
		e := gjson.GetBytes(msg, "error").String()
		if e == "" {
			e = strings.TrimSpace(string(msg))
		}
		p.fail(b.cfg.Name, fmt.Sprintf("status %d: %s", res.StatusCode, e))
		return
	}
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		if e := gjson.GetBytes(line, "error"); e.Exists() {
			p.fail(b.cfg.Name, e.String())
			return
		}
		if gjson.GetBytes(line, "status").String() == "success" {
			return
		}
		p.add(b.cfg.Name, line)
	}
	if r.Context().Err() != nil {
		return
	}
	if err := sc.Err(); err != nil {
		p.fail(b.cfg.Name, "progress stream broken: "+redactURLError(err).Error())
		return
	}
	p.fail(b.cfg.Name, `progress stream ended without "success"`)
}

// serveBlob answers HEAD and POST /api/blobs/{digest} for the pool. HEAD
// says 200 only if every backend has the blob, so the client uploads it
// when any lacks it. POST streams the upload to every backend at once,
// through pipes, so the proxy never holds more than a buffer of it.
func (h *Handler) serveBlob(w http.ResponseWriter, r *http.Request, api apiFormat, cands []*backend) error {
	answers := make([]answer, len(cands))
	var wg sync.WaitGroup
	if r.Method == http.MethodHead {
		for i, b := range cands {
			wg.Add(1)
			go func() {
				defer wg.Done()
				answers[i] = h.shortAnswer(r, b, nil, 0)
			}()
		}
		wg.Wait()
		status := http.StatusOK
		for _, a := range answers {
			if a.status != http.StatusOK {
				status = http.StatusNotFound
			}
		}
		w.WriteHeader(status)
		return nil
	}

	readers := make([]*io.PipeReader, len(cands))
	fan := &fanWriter{}
	for i := range cands {
		pr, pw := io.Pipe()
		readers[i] = pr
		fan.ws = append(fan.ws, pw)
	}
	for i, b := range cands {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = h.shortAnswer(r, b, readers[i], r.ContentLength)
			// A backend that answered early takes no more of the upload.
			readers[i].CloseWithError(errBackendDone)
		}()
	}
	_, err := io.Copy(fan, r.Body)
	fan.close(err)
	wg.Wait()
	if err != nil && r.Context().Err() != nil {
		return nil
	}
	return h.mergeShort(w, api, answers, false)
}

var errBackendDone = fmt.Errorf("backend answered")

// fanWriter writes to every pipe that is still read; a backend that stops
// reading (it failed, or answered) is dropped, not allowed to stall or
// fail the others.
type fanWriter struct {
	ws []*io.PipeWriter
}

func (f *fanWriter) Write(p []byte) (int, error) {
	live := 0
	for i, w := range f.ws {
		if w == nil {
			continue
		}
		if _, err := w.Write(p); err != nil {
			f.ws[i] = nil
			continue
		}
		live++
	}
	if live == 0 {
		return 0, io.ErrClosedPipe
	}
	return len(p), nil
}

func (f *fanWriter) close(err error) {
	for _, w := range f.ws {
		if w != nil {
			w.CloseWithError(err)
		}
	}
}
