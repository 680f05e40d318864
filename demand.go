package ollamaflow

import (
	"math"
	"sync"
	"time"
)

// Model placement by demand. Priced one request at a time, a second copy
// of a popular model never pays: its load (a second or more) is always
// longer than the wait for a slot where the model is, though that wait
// comes back for every request while the demand lasts. And a model that
// the first burst happened to load on most servers keeps them, with the
// popular one crowded onto the rest (two-models-empty, three-models-four:
// room for one model per server, nothing loaded at the start). So the
// frontend keeps the recent share of requests per model, and a model with
// fewer copies than its share of the pool's places (by planMargin) takes
// one from a model that would, one copy short, lack less than it does
// by planMargin: a request for it is sent to load it on the server
// holding such a model (or with room) where it would be served soonest.
// Models that lack about as much stay where they are, so they settle;
// one move per model at a time, and no model loses its last copy.

// demandTau is how fast the shares forget, on a pool serving more than
// demandMemory/demandTau requests a second; on a slower one (a GPU pool
// of answers taking seconds) each request ages the counts by one
// demandMemory-th instead, so that the shares are always those of at
// least the last demandMemory requests or so. Forgetting by time alone,
// a pool below 10 requests a second never reached planMinRequests and
// never placed a model by demand: with three requests in four for
// model-a, on one server of three while the other two held model-b,
// model-a kept one or two copies for good (slow-mix).
//
// planMinRequests is the (decayed) number of requests below which shares
// say too little to move a model: with 20, a share of 40 % read as 50 %
// now and then and moved a model that fitted (models-room-2-3: one load
// more per 300 requests). On a slow pool it is reached after about 160
// requests.
const (
	planMargin      = 0.5 // copies: what a move must gain, so that models settle
	demandTau       = 10 * time.Second
	demandMemory    = 150
	planMinRequests = 100
	maxDemandModels = 64
)

// modelDemand is a frontend's recent requests per model, decayed.
type modelDemand struct {
	mu     sync.Mutex
	at     time.Time
	counts map[string]float64
	total  float64
	timed  float64 // requests decayed by time alone (demandTau): the rate
}

func newModelDemand() *modelDemand { return &modelDemand{counts: make(map[string]float64)} }

// decayLocked ages the counts from the last request to now, as a request
// arrives: by time (demandTau), or by one demandMemory-th where that
// forgets less (a slow pool, or the first request after a quiet spell:
// what the pool was asked before it is still all it knows).
func (d *modelDemand) decayLocked(now time.Time) {
	if dt := now.Sub(d.at); dt > 0 {
		if !d.at.IsZero() {
			ft := math.Exp(-dt.Seconds() / demandTau.Seconds())
			d.timed *= ft
			f := max(ft, 1-1.0/demandMemory)
			for m, c := range d.counts {
				d.counts[m] = c * f
			}
			d.total *= f
		}
		d.at = now
	}
}

// note counts a request for model. A client naming endless models cannot
// grow the table: the least requested one is dropped.
func (d *modelDemand) note(model string, now time.Time) {
	if d == nil || model == "" {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.decayLocked(now)
	if _, ok := d.counts[model]; !ok && len(d.counts) >= maxDemandModels {
		least, lc := "", math.Inf(1)
		for m, c := range d.counts {
			if c < lc {
				least, lc = m, c
			}
		}
		d.total -= lc
		delete(d.counts, least)
	}
	d.counts[model]++
	d.total++
	d.timed++
}

// rateOf is how many requests a second for model the frontend was
// lately asked (by time alone), as of the last request.
func (d *modelDemand) rateOf(model string) float64 {
	share, _, timed := d.read(model)
	return share * timed / demandTau.Seconds()
}

// shareOf returns model's share of the recent requests, and how many
// (decayed) there were, as of the last request: between requests nothing
// ages (on a slow pool, the wait for the next request is no news).
func (d *modelDemand) shareOf(model string) (share, total float64) {
	share, total, _ = d.read(model)
	return share, total
}

// read is model's share, the (decayed) requests and those decayed by time
// alone, as of the last request; zeros before any.
func (d *modelDemand) read(model string) (share, total, timed float64) {
	if d == nil {
		return 0, 0, 0
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.total <= 0 {
		return 0, 0, 0
	}
	return d.counts[model] / d.total, d.total, d.timed
}
