package ollamaflow

import (
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// The history behind GET /ollamaflow/history: one goroutine samples the
// counters of every live backend and frontend every historyInterval into a
// fixed ring of historySize points each, so memory is bounded by the
// number of configured backends and frontends and a request costs only a
// few atomic adds. A backend's history lives in its pooled server and a
// frontend's in a pool keyed by its name, so both survive reloads.
const (
	historyInterval = 5 * time.Second
	historySize     = 180 // 15 minutes
)

// ttfbBounds are the upper bounds of the time-to-first-byte buckets; a
// percentile is reported as the bound of the bucket it falls in.
var ttfbBounds = [...]time.Duration{
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second,
	10 * time.Second, 30 * time.Second, time.Minute, 5 * time.Minute,
}

// flowCounts are cumulative counters; a sample is the delta of two.
type flowCounts struct {
	requests, errors, tokens, coldLoads int64
	ttfb                                [len(ttfbBounds) + 1]int64 // the last: over every bound
}

// flowStats counts one backend's or one frontend's traffic and keeps its
// history.
type flowStats struct {
	requests, errors, tokens, coldLoads atomic.Int64
	inFlight                            atomic.Int64 // frontends only; a server has its own
	ttfb                                [len(ttfbBounds) + 1]atomic.Int64

	mu     sync.Mutex // guards the rest
	last   flowCounts
	lastAt time.Time
	ring   [historySize]historyPoint
	next   int // where the next point goes
	n      int // points held, at most historySize
}

// historyPoint is one interval's sample.
type historyPoint struct {
	Time      time.Time `json:"time"`
	Requests  float64   `json:"requests_per_second"`
	Tokens    float64   `json:"tokens_per_second"`
	Errors    float64   `json:"errors_per_second"`
	InFlight  int64     `json:"in_flight"`
	Queued    int64     `json:"queued"`
	ColdLoads int64     `json:"cold_loads"`
	TTFBp50   float64   `json:"ttfb_p50_ms,omitempty"`
	TTFBp99   float64   `json:"ttfb_p99_ms,omitempty"`
}

func (s *flowStats) observeTTFB(d time.Duration) {
	i := sort.Search(len(ttfbBounds), func(i int) bool { return d <= ttfbBounds[i] })
	s.ttfb[i].Add(1)
}

func (s *flowStats) counts() flowCounts {
	c := flowCounts{requests: s.requests.Load(), errors: s.errors.Load(), tokens: s.tokens.Load(), coldLoads: s.coldLoads.Load()}
	for i := range s.ttfb {
		c.ttfb[i] = s.ttfb[i].Load()
	}
	return c
}

// sample turns the counters' growth since the last sample into rates over
// the time elapsed and appends the point. The first sample counts from
// zero over one nominal interval.
func (s *flowStats) sample(now time.Time, inFlight, queued int64) {
	c := s.counts()
	s.mu.Lock()
	defer s.mu.Unlock()
	elapsed := historyInterval.Seconds()
	if !s.lastAt.IsZero() {
		elapsed = now.Sub(s.lastAt).Seconds()
	}
	if elapsed <= 0 {
		return // a clock step back: no rate to compute
	}
	p := historyPoint{
		Time:      now,
		Requests:  float64(c.requests-s.last.requests) / elapsed,
		Tokens:    float64(c.tokens-s.last.tokens) / elapsed,
		Errors:    float64(c.errors-s.last.errors) / elapsed,
		InFlight:  inFlight,
		Queued:    queued,
		ColdLoads: c.coldLoads - s.last.coldLoads,
	}
	var buckets [len(ttfbBounds) + 1]int64
	for i := range buckets {
		buckets[i] = c.ttfb[i] - s.last.ttfb[i]
	}
	p.TTFBp50, p.TTFBp99 = bucketQuantile(buckets, 0.5), bucketQuantile(buckets, 0.99)
	s.last, s.lastAt = c, now
	s.ring[s.next] = p
	s.next = (s.next + 1) % historySize
	s.n = min(s.n+1, historySize)
}

// bucketQuantile returns the upper bound in milliseconds of the bucket
// holding quantile q, 0 when the interval saw nothing; the overflow bucket
// reports the largest bound.
func bucketQuantile(b [len(ttfbBounds) + 1]int64, q float64) float64 {
	var total int64
	for _, n := range b {
		total += n
	}
	if total == 0 {
		return 0
	}
	rank := int64(q*float64(total) + 0.999999) // ceil, at least 1
	var seen int64
	for i, n := range b {
		seen += n
		if seen >= rank {
			return float64(ttfbBounds[min(i, len(ttfbBounds)-1)].Milliseconds())
		}
	}
	return float64(ttfbBounds[len(ttfbBounds)-1].Milliseconds())
}

// points returns the history, oldest first.
func (s *flowStats) points() []historyPoint {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]historyPoint, 0, s.n)
	for i := range s.n {
		out = append(out, s.ring[(s.next-s.n+i+historySize)%historySize])
	}
	return out
}

// frontendStatsPool holds each frontend name's stats, shared by the old
// and the new handler across a reload and dropped with the last of them.
var frontendStatsPool = caddy.NewUsagePool()

type pooledStats struct{ *flowStats }

func (pooledStats) Destruct() error { return nil }

func acquireFrontendStats(name string) *flowStats {
	v, _, _ := frontendStatsPool.LoadOrNew(name, func() (caddy.Destructor, error) {
		return pooledStats{new(flowStats)}, nil
	})
	return v.(pooledStats).flowStats
}

// sampler runs one goroutine while it has users: started by the first,
// stopped when the last one leaves.
type sampler struct {
	sync.Mutex
	users int
	stop  chan struct{}
	run   func(stop <-chan struct{})
}

func (s *sampler) start() {
	s.Lock()
	defer s.Unlock()
	s.users++
	if s.users == 1 {
		s.stop = make(chan struct{})
		go s.run(s.stop)
	}
}

func (s *sampler) leave() {
	s.Lock()
	defer s.Unlock()
	s.users--
	if s.users == 0 {
		close(s.stop)
	}
}

// historySampler is the one sampling goroutine, running while any handler
// is provisioned.
var historySampler = &sampler{run: runHistory}

func startHistory() { historySampler.start() }

func stopHistory() { historySampler.leave() }

func runHistory(stop <-chan struct{}) {
	t := time.NewTicker(historyInterval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			sampleHistorySafely(now)
		}
	}
}

// sampleHistorySafely samples, surviving a panic so that one bad tick does
// not end the history.
func sampleHistorySafely(now time.Time) {
	defer func() {
		if rec := recover(); rec != nil {
			caddy.Log().Error("ollamaflow history sampler panicked", zap.Any("panic", rec))
		}
	}()
	sampleHistory(now)
}

// sampleHistory takes one sample of every live backend and frontend; tests
// call it to sample now.
func sampleHistory(now time.Time) {
	frontendsByStats := map[*flowStats]int64{} // queued, summed over a name's live handlers
	var order []*flowStats
	servers := map[*server]bool{}
	var serverOrder []*server
	for _, h := range liveFrontends() {
		if h.stats == nil {
			continue
		}
		if _, ok := frontendsByStats[h.stats]; !ok {
			order = append(order, h.stats)
		}
		if h.queue != nil {
			frontendsByStats[h.stats] += int64(h.queue.length())
		}
		for _, b := range h.views() {
			if !servers[b.srv] {
				servers[b.srv] = true
				serverOrder = append(serverOrder, b.srv)
			}
		}
	}
	for _, s := range order {
		s.sample(now, s.inFlight.Load(), frontendsByStats[s])
	}
	for _, srv := range serverOrder {
		srv.stats.sample(now, srv.inFlight.Load(), srv.queued.Load())
	}
}

// historyJSON is the answer of GET /ollamaflow/history.
type historyJSON struct {
	IntervalSeconds float64               `json:"interval_seconds"`
	Size            int                   `json:"size"`
	Backends        []backendHistoryJSON  `json:"backends"`
	Frontends       []frontendHistoryJSON `json:"frontends"`
}

type backendHistoryJSON struct {
	URL     string         `json:"url"`
	Names   []string       `json:"names"`
	Samples []historyPoint `json:"samples"`
}

type frontendHistoryJSON struct {
	Name    string         `json:"name"`
	Samples []historyPoint `json:"samples"`
}

func historyStatus() historyJSON {
	out := historyJSON{IntervalSeconds: historyInterval.Seconds(), Size: historySize, Backends: []backendHistoryJSON{}, Frontends: []frontendHistoryJSON{}}
	seenF := map[string]bool{}
	seenS := map[*server]int{}
	for _, h := range liveFrontends() {
		if h.stats != nil && !seenF[h.Name] {
			seenF[h.Name] = true
			out.Frontends = append(out.Frontends, frontendHistoryJSON{Name: h.Name, Samples: h.stats.points()})
		}
		for _, b := range h.views() {
			i, ok := seenS[b.srv]
			if !ok {
				i = len(out.Backends)
				seenS[b.srv] = i
				out.Backends = append(out.Backends, backendHistoryJSON{URL: b.srv.key, Names: []string{}, Samples: b.srv.stats.points()})
			}
			if !slices.Contains(out.Backends[i].Names, b.cfg.Name) {
				out.Backends[i].Names = append(out.Backends[i].Names, b.cfg.Name)
			}
		}
	}
	sort.Slice(out.Backends, func(i, j int) bool { return out.Backends[i].URL < out.Backends[j].URL })
	return out
}
