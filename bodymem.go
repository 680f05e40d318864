package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"runtime"
	"sync"
	"time"

	"go.uber.org/zap"
)

// bodyMemory bounds the request bodies held in memory by the whole process.
// Every frontend draws from this one pool: its size is the largest
// max_body_memory among the live frontends (so the default is 256 MiB per
// process however many sites there are), and each frontend also keeps
// within its own max_body_memory, so a small limit on one site holds there.
var bodyMemory = &bodyBudget{limits: make(map[*Handler]int64), freed: make(chan struct{})}

// bodyMemoryWait is how long a request waits for bodies of others to be
// released when the budget is exhausted, before it gets 503.
const bodyMemoryWait = time.Second

// errBodyMemory is a request refused because the budget stayed exhausted.
var errBodyMemory = errors.New("request body memory exhausted")

// bodyBudget is the accounting: bytes reserved now, the limit, and the
// frontends' own shares. A reservation waits on freed, which is closed (and
// replaced) whenever bytes are released.
type bodyBudget struct {
	mu     sync.Mutex
	used   int64
	peak   int64 // high-water mark of used, for the admin API and tests
	limits map[*Handler]int64
	limit  int64 // the largest of limits
	freed  chan struct{}

	// Bodies are large pointer-free allocations: Go's pacer would let the
	// heap grow to twice the live bodies before collecting released ones, so
	// resident memory would reach twice the budget. After released bytes
	// worth an eighth of the budget, one collection runs in the background.
	garbage    int64
	collecting bool
}

func (bb *bodyBudget) register(h *Handler, limit int64) {
	bb.mu.Lock()
	bb.limits[h] = limit
	bb.recomputeLocked()
	bb.mu.Unlock()
}

func (bb *bodyBudget) unregister(h *Handler) {
	bb.mu.Lock()
	delete(bb.limits, h)
	bb.recomputeLocked()
	bb.mu.Unlock()
}

func (bb *bodyBudget) recomputeLocked() {
	bb.limit = 0
	for _, l := range bb.limits {
		bb.limit = max(bb.limit, l)
	}
}

// heldBy is what h's requests hold of the body budget now.
func heldBy(h *Handler) int64 {
	bodyMemory.mu.Lock()
	defer bodyMemory.mu.Unlock()
	return h.bodyUsed
}

// state returns the bytes reserved, the high-water mark and the limit.
func (bb *bodyBudget) state() (used, peak, limit int64) {
	bb.mu.Lock()
	defer bb.mu.Unlock()
	return bb.used, bb.peak, bb.limit
}

// tryReserveLocked takes n bytes for h if both the process and h's own
// limit allow it.
func (bb *bodyBudget) tryReserveLocked(h *Handler, n int64) bool {
	limit := bb.limit
	if limit == 0 {
		limit = h.maxBodyMemory // not registered: a handler in a unit test
	}
	if bb.used+n > limit || h.bodyUsed+n > h.maxBodyMemory {
		return false
	}
	bb.used += n
	h.bodyUsed += n
	bb.peak = max(bb.peak, bb.used)
	return true
}

func (bb *bodyBudget) release(h *Handler, n int64) {
	if n <= 0 {
		return
	}
	bb.mu.Lock()
	bb.used -= n
	h.bodyUsed -= n
	close(bb.freed)
	bb.freed = make(chan struct{})
	bb.garbage += n
	collect := !bb.collecting && bb.limit > 0 && bb.garbage >= bb.limit/8
	if collect {
		bb.collecting, bb.garbage = true, 0
	}
	bb.mu.Unlock()
	if collect {
		go func() {
			defer func() {
				if rec := recover(); rec != nil {
					h.logger.Error("panic collecting released request bodies", zap.Any("panic", rec))
				}
				bb.mu.Lock()
				bb.collecting = false
				bb.mu.Unlock()
			}()
			runtime.GC()
		}()
	}
}

// bodyLease is what one request holds of the budget. It is released whole
// when the request ends (after its last retry: the body is replayed).
type bodyLease struct {
	h        *Handler
	n        int64
	deadline time.Time // of the wait for room, shared by the request's reservations
}

func (h *Handler) newBodyLease() *bodyLease { return &bodyLease{h: h} }

// reserve takes n more bytes, waiting (up to bodyMemoryWait from the
// request's first wait) for others to release theirs.
func (l *bodyLease) reserve(ctx context.Context, n int64) error {
	bb := bodyMemory
	for {
		bb.mu.Lock()
		if bb.tryReserveLocked(l.h, n) {
			bb.mu.Unlock()
			l.n += n
			return nil
		}
		freed := bb.freed
		bb.mu.Unlock()
		if l.deadline.IsZero() {
			l.deadline = time.Now().Add(bodyMemoryWait)
		}
		left := time.Until(l.deadline)
		if left <= 0 {
			return errBodyMemory
		}
		timer := time.NewTimer(left)
		select {
		case <-freed:
			timer.Stop()
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return ctx.Err()
		}
	}
}

// release gives n bytes back (a copy of the body that was dropped).
func (l *bodyLease) release(n int64) {
	n = min(n, l.n)
	l.n -= n
	bodyMemory.release(l.h, n)
}

// close releases everything the request holds; safe to call twice.
func (l *bodyLease) close() { l.release(l.n) }

type bodyLeaseKey struct{}

func leaseFrom(ctx context.Context) *bodyLease {
	l, _ := ctx.Value(bodyLeaseKey{}).(*bodyLease)
	return l
}

// failBodyMemory answers a request the budget had no room for: 503 with
// Retry-After, in the API's format.
func (h *Handler) failBodyMemory(w http.ResponseWriter, api apiFormat) error {
	w.Header().Set("Retry-After", "2")
	return h.fail(w, api, http.StatusServiceUnavailable, "too many request bodies are held in memory right now (max_body_memory); retry shortly")
}

// readBody reads the whole request body within max_request_body, reserving
// its size against the body memory budget first: by Content-Length when
// the client gives one, else step by step as it arrives. The buffer is
// exactly the body's size when it is known, so a 16 MiB body takes 16 MiB.
func (h *Handler) readBody(r *http.Request, lease *bodyLease) ([]byte, int, error) {
	limit := h.MaxRequestBody
	if r.ContentLength > limit {
		return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("request body of %d bytes exceeds the limit of %d bytes (max_request_body)", r.ContentLength, limit)
	}
	if r.ContentLength >= 0 {
		if err := lease.reserve(r.Context(), r.ContentLength); err != nil {
			return nil, http.StatusServiceUnavailable, err
		}
		buf := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			return nil, http.StatusBadRequest, fmt.Errorf("reading the request body: %v", err)
		}
		return buf, 0, nil
	}
	// Chunked: grow by doubling, reserving each new buffer before it is
	// made and releasing the old one once copied.
	// Room for one byte beyond the limit tells "at the limit" from "over
	// it"; at the integer maximum limit+1 would wrap.
	over := min(limit, math.MaxInt64-1) + 1
	first := min(16<<10, over)
	if err := lease.reserve(r.Context(), first); err != nil {
		return nil, http.StatusServiceUnavailable, err
	}
	buf := make([]byte, 0, first)
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > limit {
				return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("request body exceeds the limit of %d bytes (max_request_body)", limit)
			}
			size := min(2*int64(cap(buf)), over)
			if err := lease.reserve(r.Context(), size); err != nil {
				return nil, http.StatusServiceUnavailable, err
			}
			grown := make([]byte, len(buf), size)
			copy(grown, buf)
			lease.release(int64(cap(buf)))
			buf = grown
		}
		n, err := r.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > limit {
			return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("request body exceeds the limit of %d bytes (max_request_body)", limit)
		}
		if err == io.EOF {
			return buf, 0, nil
		}
		if err != nil {
			return nil, http.StatusBadRequest, fmt.Errorf("reading the request body: %v", err)
		}
	}
}

// pinned applies p to body, accounting for the copy: room for the result
// is reserved before it is made, and the caller drops (and releases) one of
// the two copies, so a request never holds more than one extra.
func (l *bodyLease) pinned(ctx context.Context, p *pins, body []byte) ([]byte, error) {
	if p.empty() {
		return body, nil
	}
	bound := int64(len(body) + p.extra)
	if err := l.reserve(ctx, bound); err != nil {
		return nil, err
	}
	out, err := p.apply(body)
	if err != nil {
		l.release(bound)
		return nil, err
	}
	l.release(bound - int64(cap(out)))
	return out, nil
}

// frontendPinned applies the frontend's pins p; the client's original body
// is dropped as soon as the pinned one exists.
func (h *Handler) frontendPinned(r *http.Request, lease *bodyLease, p *pins, body []byte) ([]byte, error) {
	out, err := lease.pinned(r.Context(), p, body)
	if err != nil || sameBuffer(out, body) {
		return out, err
	}
	lease.release(int64(cap(body)))
	return out, nil
}

// replaced accounts for a body that decoding rewrote into a new buffer
// (requestModel's canonical form): the new one is reserved, the old one
// released.
func (l *bodyLease) replaced(ctx context.Context, old, body []byte) error {
	if sameBuffer(old, body) {
		return nil
	}
	if err := l.reserve(ctx, int64(cap(body))); err != nil {
		return err
	}
	l.release(int64(cap(old)))
	return nil
}

func sameBuffer(a, b []byte) bool {
	return len(a) == 0 || len(b) == 0 || &a[:1][0] == &b[:1][0]
}

// backendPinned applies a backend's pins p for one attempt. The
// frontend-pinned body is kept for retries, so this copy is the one
// extra; done releases it when the attempt ends.
func (h *Handler) backendPinned(r *http.Request, p *pins, body []byte) (out []byte, done func(), err error) {
	lease := leaseFrom(r.Context())
	if lease == nil || p.empty() {
		out, err = p.apply(body)
		return out, func() {}, err
	}
	out, err = lease.pinned(r.Context(), p, body)
	if err != nil {
		return nil, func() {}, err
	}
	return out, func() { lease.release(int64(cap(out))) }, nil
}
