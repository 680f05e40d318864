package ollamaflow

import "time"

// Holding a request for a server still being measured. awaitProbe
// (cost.go) holds a request while such a server may be as fast as the
// best measured one for it; servers can also differ by the kind of work,
// one fast at evaluating prompts and slow at generating, another the
// reverse, and then the best measured server for a request may be the
// worst: on a fresh pool of two such servers, a summary of a long
// document went to the generating server the moment it had answered a
// short question (2 s expected there, queued behind another summary:
// 1.6 s taken) while the prompt server answered its first summary
// 20 ms later in 0.15 s (prefill-decode: p99 1.0 s against the oracle's
// 0.45 s).

// measuringHoldShare is the share of a request's expected time on the
// best measured server it may wait, from when it was first held, for
// the first answer of a server still being measured: the most a hold
// costs a request that then goes to the best after all.
const measuringHoldShare = 0.25

// atypicalFactor is how much longer than the server's typical request
// a request must take on the best measured server to be held for one
// still being measured: a request like the others is served about as
// well there as anywhere (equal-over, held on a fresh pool of equal
// servers: p99 0.18 → 0.26 s).
const atypicalFactor = 3

// awaitMeasuring reports until when j had better wait in the queue than
// take ref, the best measured server, where it takes service seconds
// and best in all: while ref is slow for j (atypicalFactor) and one of
// j's candidates (unobserved, or a candidate of its latest pick not
// offered this time: busy being measured) has been measured for less
// than bootstrapHold and is not known to load the model first or to
// answer errors, until measuringHoldShare of best after j was first held.
func (h *Handler) awaitMeasuring(unobserved []*backend, j *job, ref *backend, service, best float64, now time.Time) (time.Time, bool) {
	if j.moved || best <= 0 {
		return time.Time{}, false
	}
	since := j.heldSince
	if since.IsZero() {
		since = now
	}
	until := since.Add(time.Duration(best * measuringHoldShare * float64(time.Second)))
	if !now.Before(until) {
		return time.Time{}, false
	}
	// Whether any candidate is being measured first: on a measured pool
	// that is an atomic flag per candidate, no lock.
	measuring := false
	for _, list := range [2][]*backend{unobserved, j.cands} {
		for _, b := range list {
			if _, ok := h.sampleSoon(b, j, now); ok {
				measuring = true
				break
			}
		}
	}
	if !measuring {
		return time.Time{}, false
	}
	if typical, ok := ref.srv.speed.serviceFor(nil); !ok || service < atypicalFactor*typical {
		return time.Time{}, false
	}
	if j.heldSince.IsZero() {
		j.heldSince = now
	}
	return until, true
}
