package ollamaflow

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Spare slots on a fresh pool. While least_delay knows the speed of no
// candidate, every server gets one measuring request and the rest of a
// burst would wait in the queue for the first answer, then for a slot: on
// a pool of equal servers with two slots each, half of the burst took two
// answers' time (equal-exact's p99 176 ms against least_conn's 91 ms), and
// with some 300 requests in a run those few decide the p99. Sent at once
// to the slot a server being measured may have beside its measuring
// request, such a request ends with it when the server is as fast as the
// others; when it is slower, the first answer elsewhere shows it: once
// another server has answered the server's measuring request in the time
// it would take there, plus probeSlack, the spare request is cancelled
// before any byte of it reached the client and chosen again, now with a
// speed known. It then ends about where holding it would have ended it, a
// tenth of an answer later, instead of behind a slow server's queue. The
// price on a server with a single slot is nothing either: the spare
// request waits inside it for the measuring one, as it would have waited
// in the proxy's queue.

// errOutrun cancels a spare request whose server another one outran.
var errOutrun = errors.New("moved: another server answered first")

// spareLimit is the requests a server being measured may have at once:
// its measuring request and one spare.
const spareLimit = 2

// claimSpare picks, among the candidates being measured, a server for a
// spare request beside its measuring request, and claims the slot; nil
// when none has one. With max_parallel set, measuring already uses every
// slot the server is known to have.
func (h *Handler) claimSpare(unobserved []*backend, j *job, now time.Time) *backend {
	return h.claimSpareWithin(unobserved, j, spareLimit, nil, math.Inf(1), math.Inf(1), now)
}

// queuedSpareLimit is the requests a server being measured may have at
// once while the servers measured already have queues: its measuring
// request and up to three spares, each moved as soon as a measured server
// would serve it sooner (movesSooner).
const queuedSpareLimit = 4

// claimSpareWithin is claimSpare with a server being measured taking up to
// limit requests, and only while staying there is expected to end within
// beat seconds (stayExpected, against ref, the best server measured, nil
// for none): a request that would wait beat seconds on ref races a server
// still being measured instead, when that server may serve it sooner.
// When the first server of a fresh pool to answer drew every request held
// for that answer, the slower ones, with slots free, were measured one
// request at a time while it served a queue of eight on two slots
// (speed-classes).
//
// The race is taken only when b would be outrun by ref (outrunAt) before
// the request's wait of wait seconds on ref ends: a spare that has to
// move loses no more than its wait on ref would have cost it. A long
// request beside a long measuring request on a slow server of one slot
// waited there seconds before it was outrun (mixed: p99 1.9 s).
func (h *Handler) claimSpareWithin(unobserved []*backend, j *job, limit int, ref *backend, beat, wait float64, now time.Time) *backend {
	if j.moved {
		return nil
	}
	var buf [largePool]*backend
	open := buf[:0]
	for _, b := range unobserved {
		// A measuring request claimed counts before its attempt takes the
		// slot: a burst's requests are chosen before the first of them is
		// in flight, and found no measuring request to race beside, so
		// half of a burst on equal servers waited for the first answer
		// (equal-exact: p99 0.17 s against 0.09 s in some runs).
		if n := b.srv.speed.sentOrClaimed(&b.srv.inFlight, now); b.cfg.MaxParallel > 0 || n < 1 || n >= limit {
			continue
		}
		p := b.srv.speed.probingSince()
		if p.IsZero() || now.Sub(p) >= bootstrapHold || ref != nil && stayExpected(b, j, ref, now) >= beat {
			continue
		}
		if ref != nil {
			refs := [1]*backend{ref}
			if at := outrunAt(b, refs[:]); at.IsZero() || at.Sub(now).Seconds() >= wait {
				continue
			}
		}
		if h.coldFor(b, j.model) || b.srv.speed.mostlyErrors(now) {
			// A load (or, lists not read yet, maybe one), or errors: its
			// answer is no speed to race, and a spare that loads a model
			// evicts another.
			continue
		}
		if _, loading := b.srv.speed.pendingLoad(j.model, now); loading {
			continue // its first request loads the model: no answer soon
		}
		open = append(open, b)
	}
	for len(open) > 0 {
		b := newestProbe(h, open, j)
		if b.srv.speed.claimProbe(limit, &b.srv.inFlight, now) {
			return b
		}
		open = without(open, b)
	}
	return nil
}

// newestProbe is, among servers being measured, the one whose measuring
// request went out last, least conn among those sent at once: a
// measuring request still unanswered after t says the server takes at
// least t for it, so the one sent last is the least shown to be slow.
func newestProbe(h *Handler, open []*backend, j *job) *backend {
	var sbuf [largePool]time.Time // when each one's measuring began
	since := sbuf[:0]
	var latest time.Time
	for _, b := range open {
		p := b.srv.speed.probingSince()
		since = append(since, p)
		if p.After(latest) {
			latest = p
		}
	}
	var buf [largePool]*backend
	newest := buf[:0]
	for i, b := range open {
		if latest.Sub(since[i]) <= probeAtOnce {
			newest = append(newest, b)
		}
	}
	return pickLeastConn(h, newest, j)
}

// probeAtOnce is how close two measuring requests' starts are taken as
// sent at once (one burst), where neither says more than the other.
const probeAtOnce = 5 * time.Millisecond

// outrunAt is when another of among will have shown itself faster than
// b: b's measuring request has run longer than that server's time for it,
// plus probeSlack and the time the proxy saw beyond its last answer. Zero
// while no other server has answered, or b has.
func outrunAt(b *backend, among []*backend) time.Time {
	p, probe := b.srv.speed.measuringJob()
	if p.IsZero() {
		return time.Time{}
	}
	var at time.Time
	for _, f := range among {
		if f == b || !f.usable() {
			continue // a server drained or failing since outruns nothing
		}
		service, ok := f.srv.speed.serviceFor(probe)
		if !ok {
			continue
		}
		t := p.Add(time.Duration(service*(1+probeSlack)*float64(time.Second)) + f.srv.speed.lastSlack())
		if at.IsZero() || t.Before(at) {
			at = t
		}
	}
	return at
}

// spareRace decides, once, between a spare request's answer and its move:
// a move decided as the headers arrive must not cut an answer already
// being passed on, nor an answer begun be taken for a move.
type spareRace struct {
	state   atomic.Int32 // 0 racing, 1 answered, 2 moved
	stopped chan struct{}
}

func newSpareRace() *spareRace { return &spareRace{stopped: make(chan struct{})} }

// answered reports whether the answer may be passed on (false: the request
// was moved), and stops the watch.
func (r *spareRace) answered() bool {
	ok := r.state.CompareAndSwap(0, 1)
	close(r.stopped)
	return ok
}

// watch cancels the attempt with errOutrun once another of among outran b
// (outrunAt) and would serve j sooner than staying is expected to
// (movesSooner), unless the answer came first or b was measured: a server
// that answered as fast as the others keeps its spare request.
//
// A measuring request (measuring) is watched the same way once it waits
// behind a spare: the two go out together and the server may take the
// spare first, which on a server of one slot leaves the measuring request
// queued behind a whole answer (stream-long: 1.9 s where a slow server's
// answer takes 0.9). That is seen when the spare's answer began
// (headers: a stream's first token) and the measuring request's has not
// for as long again as the spare took to begin: beside it in a slot of
// its own it would have begun about as soon.
func (r *spareRace) watch(ctx context.Context, cancel context.CancelCauseFunc, h *Handler, b *backend, j *job, among []*backend, measuring bool) {
	sent := time.Now()
	for {
		answered := firstSamples.wait()
		probing, began := b.srv.speed.probeTimes()
		if probing.IsZero() {
			return
		}
		at := outrunAt(b, among)
		if measuring && !at.IsZero() {
			if began.IsZero() || began.Before(sent) {
				// Nothing on b began since: looked at again shortly.
				if !racing(ctx, r.stopped, answered, time.Now().Add(spareRecheck)) {
					return
				}
				continue
			}
			if behind := began.Add(max(began.Sub(sent), minBehind)); behind.After(at) {
				at = behind
			}
		}
		if now := time.Now(); !at.IsZero() && !now.Before(at) {
			if h.movesSooner(b, j, among, now) {
				if r.state.CompareAndSwap(0, 2) {
					cancel(errOutrun)
				}
				return
			}
			// Outrun, but what outran it has a queue of its own by now
			// (the requests held for the first answer went there):
			// looked at again shortly, as that queue and the time b has
			// taken grow.
			at = now.Add(spareRecheck)
		}
		if !racing(ctx, r.stopped, answered, at) {
			return
		}
	}
}

// minBehind is the least time a measuring request must have gone without
// an answer since a spare beside it began answering to be taken as
// waiting behind it (watch).
const minBehind = 20 * time.Millisecond

// noteAnswerBegan records that an answer of the server began at now, the
// first while it is being measured (probeBegan).
func (sp *speed) noteAnswerBegan(now time.Time) {
	if sp.measured.Load() {
		return
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 && !sp.probing.IsZero() && sp.probeBegan.IsZero() {
		sp.probeBegan = now
	}
}

// probeTimes is probingSince and, with it, probeBegan: both zero once
// the server is measured.
func (sp *speed) probeTimes() (probing, began time.Time) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN > 0 || sp.all.genN > 0 {
		return time.Time{}, time.Time{}
	}
	return sp.probing, sp.probeBegan
}

// spareRecheck is how often a spare request that was outrun but had
// nowhere sooner to go is looked at again.
const spareRecheck = 10 * time.Millisecond

// stayFactor prices staying beside a measuring request that has run for
// e seconds: in a slot of its own the spare ends about e from now (a
// request past its expected end runs about as long again, as replayLocked
// takes it), on a server of one slot it waits for the measuring request
// first and ends 2e or more from now; 1.5e lies between. (2e did as well
// in the runs compared: speed-classes, fresh-burst, equal-exact and
// equal-over, two each.)
const stayFactor = 1.5

// stayExpected is how long a request for j beside b's measuring request is
// expected to take there, from now: stayFactor times the time the
// measuring request has run, and at least j's time on ref (a server
// measured) times how much slower than ref b has shown itself so far (its
// measuring request has run that many times ref's time for it): a long
// request on a server twice as slow takes twice its time there, however
// short the measuring request. +Inf when b is not being measured.
func stayExpected(b *backend, j *job, ref *backend, now time.Time) float64 {
	p, probe := b.srv.speed.measuringJob()
	if p.IsZero() {
		return math.Inf(1)
	}
	elapsed := now.Sub(p).Seconds()
	stay := stayFactor * elapsed
	sProbe, ok := ref.srv.speed.serviceFor(probe)
	sJob, ok2 := ref.srv.speed.serviceFor(j)
	if ok && ok2 && sProbe > 0 {
		stay = max(stay, max(elapsed/sProbe, 1)*sJob)
	}
	return stay
}

// moveMargin is how much sooner another server must be expected to serve
// a spare than staying for the spare to move: a move starts the request
// over, and staying is priced coarsely (stayExpected: 1.5x the time the
// measuring request has run, whether the spare runs in a slot of its own
// or waits). On servers 1x, 2x and 4x slower, a spare running in a slot of
// its own on the 2x server, 0.1 s from its end, moved into the fast
// server's queue, expected 0.216 s against 0.215 s staying (speed-classes:
// p99 0.42 s in some runs, 0.34 s in others).
const moveMargin = 1.25

// movesSooner reports whether another of among (observed, usable) would
// serve j, its wait for a slot counted, clearly within what staying on b is
// expected to take (stayExpected, moveMargin).
//
// A server outrun is slower, not necessarily later: when the first to
// answer drew the requests held for that answer, a spare on a slower
// server of several slots ends before it would there (speed-classes: the
// spares of servers 2× and 4× slower, moved into a queue of eight on the
// fast server's two slots, were the run's slowest requests).
//
// A spare that starts a conversation, where later turns are not known to
// be rare, moves only where it starts at once in a cache slot no other
// conversation holds (settlesNew): its later turns follow it, and moved
// into the first server's queue it shares a slot there for as long as both
// conversations last, each turn waiting behind the other's and evaluating
// the whole history again. On a fresh pool of a fast server of four slots
// and four three times as slow, the spares of the slow servers all moved
// to the fast one, which held seven conversations on its four slots until
// they ended (random-176: 16.5 req/s over the first two seconds against
// least_conn's 27; the same afterwards).
func (h *Handler) movesSooner(b *backend, j *job, among []*backend, now time.Time) bool {
	for _, f := range among {
		if f == b || !f.usable() {
			continue
		}
		d, ok := f.srv.speed.estimate(j, f.cfg.MaxParallel, int(f.srv.inFlight.Load()), h.coldFor(f, j.model), now)
		if ok && j.newConversation && !h.settlesNew(f, d, now) {
			continue
		}
		if ok && d.total()*moveMargin < stayExpected(b, j, f, now) {
			return true
		}
	}
	return false
}

// settlesNew reports whether a new conversation moved to f, expected there
// as d, would have a slot and a cache slot of its own: always where the
// traffic is known single-turn (nothing follows it) or has no affinity.
func (h *Handler) settlesNew(f *backend, d delay, now time.Time) bool {
	if h.affinity == nil || h.affinity.singleTurn() {
		return true
	}
	return d.slotFree() && h.affinity.hasFreeSlot(f, now)
}

// racing waits for the next first sample anywhere or for at (when set);
// false when the attempt no longer needs watching.
func racing(ctx context.Context, stopped, answered <-chan struct{}, at time.Time) bool {
	var timer <-chan time.Time
	if !at.IsZero() {
		t := time.NewTimer(time.Until(at))
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-stopped:
		return false
	case <-ctx.Done():
		return false
	case <-answered:
	case <-timer:
	}
	return true
}

// firstSamples is closed and replaced whenever a server gets its first
// speed sample, for the spare requests that race it.
var firstSamples broadcast

type broadcast struct {
	mu sync.Mutex
	ch chan struct{}
}

// wait returns a channel closed at the next signal.
func (b *broadcast) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

func (b *broadcast) signal() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
		b.ch = nil
	}
}

// measuringJob is when the server's first request went out and what it
// asked (nil: it is no longer in flight), zero once it is measured.
func (sp *speed) measuringJob() (time.Time, *job) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN > 0 || sp.all.genN > 0 || sp.probing.IsZero() {
		return time.Time{}, nil
	}
	var first *task
	for _, t := range sp.tasks {
		if first == nil || t.id < first.id {
			first = t
		}
	}
	if first == nil {
		return sp.probing, nil
	}
	return sp.probing, first.job
}

// serviceFor is the server's time for j's prompt and answer (a typical
// request for a nil j); false before it is measured.
func (sp *speed) serviceFor(j *job) (float64, bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.all.promptN == 0 && sp.all.genN == 0 {
		return 0, false
	}
	if j == nil {
		j = &job{}
	}
	p, o := sp.serviceLocked(j)
	return p + o, true
}

// signalFirstLocked wakes the spare requests racing a server measured for
// the first time, if this answer measured it.
func (sp *speed) signalFirstLocked() {
	if sp.all.promptN > 0 || sp.all.genN > 0 {
		sp.measured.Store(true)
		firstSamples.signal()
	}
}
