package ollamaflow

import (
	"context"
	"fmt"
	"runtime"
	"sort"
	"testing"
	"time"
)

// Selection cost per request, as the pool grows (README, "Scale"):
//
//	go test -run '^$' -bench BenchmarkSelection -benchmem .
//
// cpu-ns/op is the process's CPU time per request: on a shared machine,
// ns/op also counts the time other processes held the cores.
//
// Each iteration is the routing work one chat request does between its
// headers and its first byte to the backend: the candidate filter (kind,
// labels, health, drain), admission, the model filter, the busy filter,
// then the policy's pick and the slot taken on the winner (given back at
// once, so the pool stays idle). Half the servers have the model, a
// quarter have it loaded, weights vary, and every server has been observed
// (least_delay's steady state).
func BenchmarkSelection(b *testing.B) {
	names := make([]string, 0, len(policies)+1)
	for n := range policies {
		names = append(names, n)
	}
	sort.Strings(names)
	names = append(names, "sticky")
	for _, policy := range names {
		for _, n := range []int{10, 100, 1000} {
			b.Run(fmt.Sprintf("%s/backends=%d", policy, n), func(b *testing.B) {
				h := selectionPool(n, policy)
				ctx := context.Background()
				runtime.GC() // the setup's garbage is not the selection's cost
				b.ReportAllocs()
				b.ResetTimer()
				cpu0, cpuOK := processCPU()
				for range b.N {
					picked := selectOnce(ctx, h, "conversation-42", "tiny-llama:latest")
					if picked == nil {
						b.Fatal("no backend picked")
					}
					picked.srv.release()
				}
				if cpu1, ok := processCPU(); cpuOK && ok {
					b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
				}
			})
		}
	}
}

// selectionPool is a frontend with n detached servers (no goroutines) in
// the state BenchmarkSelection describes.
func selectionPool(n int, policy string) *Handler {
	h := &Handler{policy: policies["least_conn"], LBPolicy: "least_conn"}
	if p, ok := policies[policy]; ok {
		h.policy, h.LBPolicy = p, policy
	} else {
		h.Sticky = &StickyConfig{Headers: []string{"X-Session"}}
	}
	for i := range n {
		b := testBackend(fmt.Sprintf("gpu%d", i), func(c *Backend) { c.Weight = 1 + i%3 })
		present := map[string][]byte{"other:latest": nil}
		loaded := map[string][]byte{}
		if i%2 == 0 {
			present["tiny-llama:latest"] = nil
		}
		if i%4 == 0 {
			loaded["tiny-llama:latest"] = nil
		}
		b.srv.models.Store(&modelSnapshot{known: true, present: present, loaded: loaded})
		b.pos.Store(int64(i))
		b.srv.state.Store(int32(stateHealthy))
		b.srv.inFlight.Store(1)
		serve(b, &job{}, time.Now(), final(time.Duration(100+i%7)*time.Millisecond, 0, 0, 10, 1))
		b.srv.inFlight.Store(0)
		h.backends = append(h.backends, b)
	}
	return h
}

// selectOnce is the handler's routing path for one request (ServeHTTP's
// candidates, admitQueue and routeModel; proxy's first attempt), without
// the queue: every server has room.
func selectOnce(ctx context.Context, h *Handler, session, model string) *backend {
	cands, why := h.candidates(kindCompletion, h.labels)
	if why != nil {
		return nil
	}
	if h.admitQueue(nil, kindCompletion, cands) != nil {
		return nil
	}
	cands, status, _ := h.routeModel(ctx, cands, model)
	if status != 0 {
		return nil
	}
	avail := notBusy(cands, time.Now())
	if h.Sticky != nil {
		b, _ := h.acquireSticky(avail, session, &job{model: model})
		return b
	}
	return h.acquire(avail, &job{model: model})
}
