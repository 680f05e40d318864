package ollamaflow

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

// The paths BenchmarkSelection does not take, at 1,000 backends under
// least_delay (README, "Scale"):
//
//	go test -run '^$' -bench BenchmarkSelectionPaths -benchmem -benchtime=3000x .
//
// Each iteration is one attempt's selection as proxy makes it
// (attemptCandidates, then the pick) and the slot given back: a retry after
// one server failed, a request while a tenth of the servers back off after
// a 503, a pool in two SRV priorities (a tenth in the first), and
// conversation affinity placing a new conversation and a follow-up turn.
func BenchmarkSelectionPaths(b *testing.B) {
	const n = 1000
	paths := []struct {
		name  string
		setup func(h *Handler) // before the timer
		next  func(h *Handler, cands []*backend, j *job) *backend
	}{
		{"retry", nil, func(h *Handler, cands []*backend, j *job) *backend {
			avail, _ := h.attemptCandidates(cands, cands[7:8], j)
			return h.acquire(avail, j)
		}},
		{"backoff", func(h *Handler) {
			until := time.Now().Add(time.Hour).UnixNano()
			for i, b := range h.backends {
				if i%10 == 0 {
					b.srv.busyUntil.Store(until)
				}
			}
			noteBackOff(until)
		}, nil},
		{"tiers", func(h *Handler) {
			for i, b := range h.backends {
				b.tier.Store(int64(min(i%10, 1)))
			}
			h.members.Store(&memberSet{backends: h.backends, tiered: true})
		}, nil},
		{"affinity-new", func(h *Handler) { h.affinity = newAffinityTable(1000, time.Hour) }, func(h *Handler, cands []*backend, j *job) *backend {
			avail, _ := h.attemptCandidates(cands, nil, j)
			b, _, _ := h.acquireConversation(avail, benchConv, j)
			return b
		}},
		{"affinity-next", func(h *Handler) {
			h.affinity = newAffinityTable(1000, time.Hour)
			h.affinity.record(benchTurn, h.backends[40].srv.key, 0, time.Now())
		}, func(h *Handler, cands []*backend, j *job) *backend {
			avail, _ := h.attemptCandidates(cands, nil, j)
			b, _, _ := h.acquireConversation(avail, benchNext, j)
			return b
		}},
	}
	for _, p := range paths {
		b.Run(fmt.Sprintf("%s/backends=%d", p.name, n), func(b *testing.B) {
			h := selectionPool(n, "least_delay")
			if p.setup != nil {
				p.setup(h)
			}
			defer backOffUntil.Store(0)
			next := p.next
			if next == nil {
				next = func(h *Handler, cands []*backend, j *job) *backend {
					avail, _ := h.attemptCandidates(cands, nil, j)
					return h.acquire(avail, j)
				}
			}
			cands, _ := h.candidates(kindCompletion, nil)
			cands = h.withModel(cands, "tiny-llama:latest")
			runtime.GC() // the setup's garbage is not the selection's cost
			b.ReportAllocs()
			b.ResetTimer()
			cpu0, cpuOK := processCPU()
			for range b.N {
				picked := next(h, cands, &job{model: "tiny-llama:latest"})
				if picked == nil {
					b.Fatal("no backend picked")
				}
				picked.release()
			}
			if cpu1, ok := processCPU(); cpuOK && ok {
				b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
			}
		})
	}
}

// A new conversation (never recorded), an earlier turn and its follow-up.
var (
	benchConv = conversationOf("/api/chat", "tiny-llama:latest", []byte(`{"messages":[{"role":"user","content":"a new question"}]}`))
	benchTurn = conversationOf("/api/chat", "tiny-llama:latest", []byte(`{"messages":[{"role":"user","content":"why is the sky blue?"}]}`))
	benchNext = conversationOf("/api/chat", "tiny-llama:latest", []byte(`{"messages":[{"role":"user","content":"why is the sky blue?"},{"role":"assistant","content":"scattering"},{"role":"user","content":"and at sunset?"}]}`))
)
