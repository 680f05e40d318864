package ollamaflow

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// normalizeModel gives the form model names are compared in: lowercase,
// without Ollama's default registry and namespace, with ":latest" when no
// tag is given. Tags must then match exactly: "llama3" is "llama3:latest",
// never "llama3:70b". A registry host with a port keeps its colon: the tag
// is only looked for after the last slash.
func normalizeModel(name string) string {
	n := strings.ToLower(strings.TrimSpace(name))
	n = strings.TrimPrefix(n, "registry.ollama.ai/")
	n = strings.TrimPrefix(n, "library/")
	if n == "" {
		return ""
	}
	last := n[strings.LastIndexByte(n, '/')+1:]
	if !strings.Contains(last, ":") && !strings.Contains(last, "@") {
		n += ":latest"
	}
	return n
}

// Timings of discovery and pulls; variables so tests can shorten them.
var (
	minRefreshGap    = time.Second      // a server's lists are read at most this often for routing misses, failed or not
	psMaxAge         = time.Second      // /api/ps answers from lists at most this old (else one shared read)
	refreshTimeout   = 10 * time.Second // one read of /api/tags + /api/ps
	pullStallTimeout = 5 * time.Minute  // a pull with no progress line this long is aborted
	pullBackoffBase  = 30 * time.Second // first retry delay of a failed pull, doubled each time
	pullBackoffMax   = 10 * time.Minute
)

// modelSnapshot is what a server had at its last successful refresh. It is
// never modified once stored: a refresh (or a learned load) stores a new one.
type modelSnapshot struct {
	known   bool              // a refresh has succeeded
	at      time.Time         // when
	present map[string][]byte // normalised name -> the raw /api/tags entry
	loaded  map[string][]byte // normalised name -> the raw /api/ps entry (nil when learned)
	ps      [][]byte          // the raw /api/ps entries, in the server's order
	// learnedAt is when a request last found a model loaded that ps does
	// not list: /api/ps must read the server again to show it.
	learnedAt time.Time
}

// has reports whether the server is known to have model (normalised), and
// whether its lists are known at all.
func (m *modelSnapshot) has(model string) (has, known bool) {
	if !m.known {
		return false, false
	}
	_, ok := m.present[model]
	return ok, true
}

func (m *modelSnapshot) isLoaded(model string) bool {
	_, ok := m.loaded[model]
	return ok
}

// poke wakes the discovery loop for an immediate refresh and sync.
func (s *server) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// discoveryLoop reads the model lists while the server is healthy: every
// model_refresh, at once when it turns healthy or its requirements change,
// and after a pull. After each refresh it starts the pulls required models
// need.
func (s *server) discoveryLoop() {
	for {
		interval := s.settings.Load().modelRefresh
		if interval <= 0 {
			interval = defaultModelRefresh
		}
		timer := time.NewTimer(interval)
		select {
		case <-s.ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		case <-s.wake:
			timer.Stop()
			// Woken within minRefreshGap of the last refresh: wait out
			// the gap rather than skip, so the wake-up is never lost.
			gap := minRefreshGap - time.Since(s.lastRefreshEnd())
			if gap > 0 {
				t := time.NewTimer(gap)
				select {
				case <-s.ctx.Done():
					t.Stop()
					return
				case <-t.C:
				}
			}
		}
		if healthState(s.state.Load()) != stateHealthy {
			continue
		}
		if err := s.refreshModels(s.ctx, 0); err != nil && s.ctx.Err() == nil {
			s.logger().Debug("model refresh failed", zap.Error(err))
		}
		s.syncRequired()
	}
}

// refreshCall is one read of a server's lists, shared by every caller that
// asks while it runs or, within their maxAge, after it ended.
type refreshCall struct {
	started time.Time
	ended   time.Time     // set before done closes
	done    chan struct{} // closed when err is set
	err     error
}

// refreshModels makes sure the server's lists were read (successfully or
// not) no longer than maxAge ago, and returns that read's error. There is
// one read at a time per server whatever the number of callers: they wait
// for the one in progress, each only as long as its own ctx allows, and a
// failed read counts as recent as well as a good one, so a server whose
// /api/tags fails is not asked again on every routing miss. maxAge 0
// asks for a read that starts now (after a pull, say).
func (s *server) refreshModels(ctx context.Context, maxAge time.Duration) error {
	return s.refreshSince(ctx, time.Now().Add(-maxAge), maxAge == 0)
}

// refreshSince waits for a read of the lists that answers for since (see
// startRefresh), starting one if needed.
func (s *server) refreshSince(ctx context.Context, since time.Time, strict bool) error {
	for {
		c, fresh := s.startRefresh(since, strict)
		select {
		case <-c.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if fresh {
			return c.err
		}
		// The read that was in progress started before since, and the
		// caller knows of a change it may have missed. Start another.
	}
}

// startRefresh returns a read that answers for lists as of since, and
// whether it does (fresh): the read in progress (only if it started at or
// after since when strict), else the last one if it ended at or after
// since (and, when strict, started then too), else a new one. Ending, not
// starting, is what rate-limits: a read that took longer than the gap is
// not followed at once by another.
func (s *server) startRefresh(since time.Time, strict bool) (c *refreshCall, fresh bool) {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	if c := s.refreshing; c != nil {
		return c, !strict || !c.started.Before(since)
	}
	if c := s.lastRefresh; c != nil && !c.ended.Before(since) && (!strict || !c.started.Before(since)) {
		return c, true
	}
	c = &refreshCall{started: time.Now(), done: make(chan struct{})}
	s.refreshing = c
	// Not in s.wg: a request of a config being replaced may ask after
	// Destruct began waiting. s.ctx ends the read when the server goes.
	go func() {
		defer func() {
			if rec := recover(); rec != nil {
				s.logger().Error("panic in model refresh", zap.Any("panic", rec), zap.Stack("stack"))
				c.err = fmt.Errorf("model refresh panicked")
			}
			s.refreshMu.Lock()
			c.ended = time.Now()
			s.refreshing, s.lastRefresh = nil, c
			s.refreshMu.Unlock()
			close(c.done)
		}()
		c.err = s.readModels()
	}()
	return c, true
}

// lastRefreshEnd is when the last read of the lists ended: now while one
// is in progress, zero before the first.
func (s *server) lastRefreshEnd() time.Time {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	if s.refreshing != nil {
		return time.Now()
	}
	if s.lastRefresh != nil {
		return s.lastRefresh.ended
	}
	return time.Time{}
}

// firstReadStarted is when the first read of the lists began, while it is
// still under way; zero once one ended (or before one began).
func (s *server) firstReadStarted() time.Time {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	if s.lastRefresh != nil || s.refreshing == nil {
		return time.Time{}
	}
	return s.refreshing.started
}

// lastReadFailed reports whether the latest read of the lists that ended
// failed.
func (s *server) lastReadFailed() bool {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	return s.lastRefresh != nil && s.lastRefresh.err != nil
}

// readModels reads /api/tags and /api/ps and stores the result; when the
// set of models present changed, answers cached for missing models are
// dropped.
func (s *server) readModels() error {
	ctx, cancel := context.WithTimeout(s.ctx, refreshTimeout)
	defer cancel()
	tags, err := s.get(ctx, "/api/tags")
	if err != nil {
		return fmt.Errorf("reading /api/tags: %w", err)
	}
	ps, err := s.get(ctx, "/api/ps")
	if err != nil {
		return fmt.Errorf("reading /api/ps: %w", err)
	}
	snap := &modelSnapshot{known: true, at: time.Now(), present: entriesByName(tags), loaded: entriesByName(ps), ps: rawEntries(ps)}
	old := s.models.Swap(snap)
	s.speed.noticeSwap(snap)
	s.readModelFiles(ctx, snap.loaded)
	if !old.known || !sameKeys(old.present, snap.present) {
		modelListsChanged()
	}
	if !sameKeys(old.loaded, snap.loaded) {
		loadedGeneration.Add(1) // the frontends' model indexes (modelindex.go)
	}
	return nil
}

// readModelFiles learns the file each model listed as loaded is kept in,
// from /api/show's modelfile (its FROM line), once per model and digest:
// Ollama evicts the idle model whose file sorts first (placement.go,
// ollamaVictimLocked). One that cannot be read is tried at the next list.
func (s *server) readModelFiles(ctx context.Context, loaded map[string][]byte) {
	for name, raw := range loaded {
		digest := gjson.GetBytes(raw, "digest").String()
		if !s.speed.fileUnknown(name, digest) {
			continue
		}
		req, _ := json.Marshal(map[string]string{"model": name})
		res, err := s.do(ctx, http.MethodPost, "/api/show", req)
		if err != nil {
			return
		}
		body, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
		res.Body.Close()
		if err != nil || res.StatusCode != http.StatusOK {
			continue
		}
		for line := range strings.Lines(gjson.GetBytes(body, "modelfile").String()) {
			if from, ok := strings.CutPrefix(line, "FROM "); ok {
				s.speed.setFile(name, digest, strings.TrimSpace(from), loaded)
				break
			}
		}
	}
}

func sameKeys(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if _, ok := b[k]; !ok {
			return false
		}
	}
	return true
}

// rawEntries is the "models" array of an Ollama list answer, entry by
// entry.
func rawEntries(body []byte) [][]byte {
	var out [][]byte
	gjson.GetBytes(body, "models").ForEach(func(_, m gjson.Result) bool {
		out = append(out, []byte(m.Raw))
		return true
	})
	return out
}

// entriesByName indexes the "models" array of an Ollama list answer by
// normalised name, keeping each entry's raw JSON for aggregation.
func entriesByName(body []byte) map[string][]byte {
	out := make(map[string][]byte)
	gjson.GetBytes(body, "models").ForEach(func(_, m gjson.Result) bool {
		name := m.Get("name").String()
		if name == "" {
			name = m.Get("model").String()
		}
		if name != "" {
			out[normalizeModel(name)] = []byte(m.Raw)
		}
		return true
	})
	return out
}

// markLoaded records that model answered on the server, so it is loaded
// there now, without waiting for the next /api/ps.
func (s *server) markLoaded(model string) {
	s.editModels(func(cur *modelSnapshot) *modelSnapshot {
		if !cur.known || cur.isLoaded(model) {
			return nil
		}
		next := *cur
		next.loaded = copyWithout(cur.loaded, "")
		next.loaded[model] = nil
		next.learnedAt = time.Now()
		return &next
	})
}

// editModels replaces the snapshot with edit's copy of it (nil: leave it),
// retrying if a refresh or another edit got there first. Snapshots are
// never modified in place: readers hold them without locks.
func (s *server) editModels(edit func(cur *modelSnapshot) *modelSnapshot) {
	for {
		cur := s.models.Load()
		next := edit(cur)
		if next == nil {
			return
		}
		if s.models.CompareAndSwap(cur, next) {
			loadedGeneration.Add(1) // edits change what is loaded (markLoaded)
			return
		}
	}
}

// copyWithout copies a model map, leaving out drop.
func copyWithout(m map[string][]byte, drop string) map[string][]byte {
	out := make(map[string][]byte, len(m)+1)
	for k, v := range m {
		if k != drop {
			out[k] = v
		}
	}
	return out
}

// get fetches path from the server with its credentials and query.
func (s *server) get(ctx context.Context, path string) ([]byte, error) {
	res, err := s.do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", res.StatusCode)
	}
	return body, nil
}

// do sends a request of the module's own (discovery, pulls) to the server.
func (s *server) do(ctx context.Context, method, path string, body []byte) (*http.Response, error) {
	st := s.settings.Load()
	u := *s.base
	u.Path = s.base.Path + path
	u.RawQuery = st.query
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, err
	}
	for k, v := range st.header {
		req.Header[k] = v
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := s.client.Do(req)
	if err != nil {
		return nil, redactURLError(err)
	}
	return res, nil
}

// routeModel narrows cands to the backends that have model (normalised).
// Servers whose lists are not known yet stay in (a 404 from them moves the
// request on). On a miss every candidate is refreshed once (at most once
// per minRefreshGap per server, shared by concurrent misses) before the
// verdict: 503 if the model is only being pulled or only on servers that
// are down, 404 if nobody has it. A 404 is remembered for missTTL, so a
// flood of requests for a model nobody has costs no backend a round trip.
func (h *Handler) routeModel(ctx context.Context, cands []*backend, model string) ([]*backend, int, string) {
	// Lists read within the gap before now will do, even if this request
	// gets to ask only later (a busy machine): a read that ended while it
	// waited for the CPU answers for it.
	since := time.Now().Add(-minRefreshGap)
	if have := h.withModel(cands, model); len(have) > 0 {
		return have, 0, ""
	}
	notFound := fmt.Sprintf("model %q not found on any backend of this frontend; pull it first", model)
	key := missKey(cands, model)
	if h.misses.has(key) {
		return nil, http.StatusNotFound, notFound
	}
	gen := missGeneration.Load() // before the refresh: a change during it invalidates
	refreshAllSince(ctx, cands, since, false)
	if have := h.withModel(cands, model); len(have) > 0 {
		return have, 0, ""
	}
	for _, b := range cands {
		if b.srv.pulling(model) {
			return nil, http.StatusServiceUnavailable, fmt.Sprintf("model %q is being pulled onto backend %s; retry shortly", model, b.cfg.Name)
		}
	}
	for _, b := range h.pool() {
		if has, _ := b.srv.models.Load().has(model); has && !b.cfg.Disabled {
			return nil, http.StatusServiceUnavailable, fmt.Sprintf("model %q is only on backends that are unavailable now (%s); retry shortly", model, b.cfg.Name)
		}
	}
	if ctx.Err() == nil {
		h.misses.add(key, gen)
	}
	return nil, http.StatusNotFound, notFound
}

// refreshAll makes sure the servers' lists were read no longer than maxAge
// ago, reading those that are older all at once, and waits for them (as
// long as ctx allows).
func refreshAll(ctx context.Context, list []*backend, maxAge time.Duration) {
	refreshAllSince(ctx, list, time.Now().Add(-maxAge), maxAge == 0)
}

// refreshAllSince is refreshAll for lists as of since (see startRefresh).
func refreshAllSince(ctx context.Context, list []*backend, since time.Time, strict bool) {
	calls := make([]*refreshCall, len(list))
	fresh := make([]bool, len(list))
	for i, b := range list {
		calls[i], fresh[i] = b.srv.startRefresh(since, strict)
	}
	for i, c := range calls {
		select {
		case <-c.done:
		case <-ctx.Done():
			return
		}
		if !fresh[i] {
			_ = list[i].srv.refreshSince(ctx, since, strict)
		}
	}
}

// Answers for missing models, remembered briefly. A remembered miss is
// forgotten after missTTL, and at once when any server's model lists
// change, a server turns healthy or a pull completes.
var (
	missTTL        atomic.Int64 // nanoseconds; 2 s (init), tests lengthen it
	missCacheSize  = 1024       // per frontend: distinct missing models remembered
	missGeneration atomic.Uint64
)

func init() { missTTL.Store(int64(2 * time.Second)) }

// modelListsChanged forgets every remembered miss.
func modelListsChanged() { missGeneration.Add(1) }

// missKey names a miss: the model and the servers it was missing from.
func missKey(cands []*backend, model string) string {
	var sb strings.Builder
	sb.WriteString(model)
	for _, b := range cands {
		sb.WriteByte(0)
		sb.WriteString(b.srv.key)
	}
	return sb.String()
}

// missCache is a frontend's remembered misses, bounded: a client naming
// endless distinct models evicts old entries, it cannot grow the map.
type missCache struct {
	mu sync.Mutex
	m  map[string]missEntry
}

type missEntry struct {
	until time.Time
	gen   uint64
}

func (c *missCache) has(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok {
		return false
	}
	if e.gen != missGeneration.Load() || time.Now().After(e.until) {
		delete(c.m, key)
		return false
	}
	return true
}

func (c *missCache) add(key string, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[string]missEntry)
	}
	if len(c.m) >= missCacheSize {
		now, cur := time.Now(), missGeneration.Load()
		for k, e := range c.m {
			if e.gen != cur || now.After(e.until) {
				delete(c.m, k)
			}
		}
		for k := range c.m { // all live: drop arbitrary ones
			if len(c.m) < missCacheSize {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[key] = missEntry{until: time.Now().Add(time.Duration(missTTL.Load())), gen: gen}
}
