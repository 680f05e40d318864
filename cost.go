package ollamaflow

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// speed is what a server has been observed to deliver, for least_delay:
// its service time with a free slot, how many requests it serves at once
// before they start to wait inside it, and what a cold model load costs.
// It lives on the shared server, so it survives reloads.
type speed struct {
	mu          sync.Mutex
	samples     int
	service     float64 // seconds, EWMA, for requests that had a slot
	slots       int     // learned parallel capacity, at least 1
	coldLoad    float64 // seconds, EWMA of load_duration when a model was loaded
	coldSamples int
	probing     time.Time // when least_delay first sent it a request, before any sample
}

// startProbe notes that a request is going to a server not observed yet.
func (sp *speed) startProbe(now time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 && sp.probing.IsZero() {
		sp.probing = now
	}
}

// probingSince is when the server's first request went out, zero if none
// did or it has been observed.
func (sp *speed) probingSince() time.Time {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples > 0 {
		return time.Time{}
	}
	return sp.probing
}

const (
	speedAlpha       = 0.2 // EWMA weight of a new sample
	coldLoadPrior    = 2.0 // seconds assumed for a model load before one is seen
	slotGrowSlack    = 1.5 // served k at once within this × service: it has k slots
	slotShrinkFactor = 2.0 // took this × service with a slot "free": fewer slots
)

// observe records a request that took d, which had k requests in flight on
// the server (itself included) when it started.
func (sp *speed) observe(d time.Duration, k int) {
	sec := d.Seconds()
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 {
		sp.samples, sp.service, sp.slots = 1, sec, 1
		if k > 1 && sec > 0 {
			// Its first answer came with others in flight: a lower
			// bound on its slots, corrected by later samples.
			sp.slots = k
		}
		return
	}
	sp.samples++
	switch {
	case k > sp.slots && sec <= slotGrowSlack*sp.service:
		sp.slots = k // it served k at once without slowing down
	case k > 1 && k <= sp.slots && sec > slotShrinkFactor*sp.service:
		sp.slots = k - 1 // it made this one wait: it has fewer slots
	case k <= sp.slots:
		sp.service += speedAlpha * (sec - sp.service)
	}
}

// coldCost is what a model load is expected to cost on the server, in
// seconds: learned, or the prior.
func (sp *speed) coldCost() float64 {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.coldSamples > 0 {
		return sp.coldLoad
	}
	return coldLoadPrior
}

// observeLoad records a model load that took d.
func (sp *speed) observeLoad(d time.Duration) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.coldSamples == 0 {
		sp.coldLoad = d.Seconds()
	} else {
		sp.coldLoad += speedAlpha * (d.Seconds() - sp.coldLoad)
	}
	sp.coldSamples++
}

// expectedDelay is the time a new request would take on the server with
// inFlight requests already there and slots parallel slots (0: learned),
// adding a cold load when cold. ok is false without observations.
func (sp *speed) expectedDelay(inFlight int64, slots int, cold bool) (float64, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.samples == 0 {
		return 0, false
	}
	if slots <= 0 {
		slots = sp.slots
	}
	rounds := (inFlight + int64(slots)) / int64(slots) // ceil((inFlight+1)/slots)
	delay := sp.service * float64(rounds)
	if cold {
		if sp.coldSamples > 0 {
			delay += sp.coldLoad
		} else {
			delay += coldLoadPrior
		}
	}
	return delay, true
}

// bootstrapHold bounds how long least_delay holds requests back while it
// knows the speed of no candidate.
const bootstrapHold = time.Second

// pickLeastDelay takes the backend with the shortest expected completion
// time: the work already on it over its slots, times the service time it
// has been seen to deliver, plus a cold-load penalty where the model is not
// loaded. A slow server that merely looks idle does not win against a fast
// one with free slots.
//
// A server it has not observed yet is measured with one request at a time
// (or up to its max_parallel, slots it is known to have): it gets a request
// whenever it has room for one, and none beyond. When every candidate is
// being measured (a fresh pool, a burst), the
// request waits in the queue for the first answer, which comes from the
// fastest server, instead of piling onto servers of unknown speed; after
// bootstrapHold without an answer it falls back to least_conn.
func pickLeastDelay(h *Handler, avail []*backend, model string) *backend {
	avail = leastFailing(avail)
	var ties, unobserved []*backend
	best := math.Inf(1)
	for _, b := range avail {
		d, ok := b.srv.speed.expectedDelay(b.srv.inFlight.Load(), b.cfg.MaxParallel, h.coldFor(b, model))
		if !ok {
			unobserved = append(unobserved, b)
			continue
		}
		d /= float64(b.weight())
		switch {
		case d < best*(1-1e-9):
			best, ties = d, append(ties[:0], b)
		case d <= best*(1+1e-9):
			ties = append(ties, b)
		}
	}
	// An unobserved server is measured with one request at a time (or up
	// to its max_parallel, slots it is known to have), unless it is cold
	// for the model and a model load alone would take longer than the best
	// observed choice.
	var explore []*backend
	var oldestProbe time.Time
	for _, b := range unobserved {
		if b.srv.inFlight.Load() >= int64(max(b.cfg.MaxParallel, 1)) {
			if p := b.srv.speed.probingSince(); !p.IsZero() && (oldestProbe.IsZero() || p.Before(oldestProbe)) {
				oldestProbe = p
			}
			continue
		}
		if h.coldFor(b, model) && b.srv.speed.coldCost() >= best {
			continue
		}
		explore = append(explore, b)
	}
	switch {
	case len(explore) > 0:
		b := pickLeastConn(h, explore, model)
		b.srv.speed.startProbe(time.Now())
		return b
	case len(ties) == 1:
		return ties[0]
	case len(ties) > 1:
		n := atomic.AddUint64(&h.rrCounter, 1)
		return ties[n%uint64(len(ties))]
	case len(avail) == 1:
		return avail[0] // nothing to choose between: no point waiting
	}
	// Every candidate is unobserved and busy being measured.
	if !oldestProbe.IsZero() && time.Since(oldestProbe) < bootstrapHold && h.queue != nil {
		h.queue.wakeAt(oldestProbe.Add(bootstrapHold))
		return nil
	}
	return pickLeastConn(h, avail, model)
}

// coldFor reports whether model is known not to be loaded on b.
func (h *Handler) coldFor(b *backend, model string) bool {
	return model != "" && !h.isLoaded(b, model)
}
