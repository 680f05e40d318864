package ollamaflow

import (
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// srvFakes starts n fake Ollama servers on 127.0.0.1, each named
// sN.ollama.test in the zone, and returns them with their ports.
func srvFakes(t *testing.T, z *dnsZone, n int, cfg fakeollama.Config) ([]*fakeollama.Server, []uint16) {
	t.Helper()
	fakes := make([]*fakeollama.Server, n)
	ports := make([]uint16, n)
	for i := range n {
		fakes[i] = fakeollama.New(cfg)
		t.Cleanup(fakes[i].Close)
		_, p, err := net.SplitHostPort(fakes[i].HostPort())
		require.NoError(t, err)
		_, err = fmt.Sscan(p, &ports[i])
		require.NoError(t, err)
		z.setA(fmt.Sprintf("s%d.ollama.test", i), "127.0.0.1")
	}
	return fakes, ports
}

func srvRecord(prio, weight, port uint16, i int) *dns.SRV {
	return &dns.SRV{Priority: prio, Weight: weight, Port: port, Target: fmt.Sprintf("s%d.ollama.test.", i)}
}

func srvName(ports []uint16, i int) string { return fmt.Sprintf("s%d.ollama.test:%d", i, ports[i]) }

// chatsServedBy sends n chats one after the other and counts the servers that
// answered them.
func chatsServedBy(t *testing.T, url string, n int) map[string]int {
	t.Helper()
	out := map[string]int{}
	for range n {
		status, by, body := chat(t, url)
		require.Equal(t, http.StatusOK, status, body)
		out[by]++
	}
	return out
}

// TestBackendsFromSRVWeights: a record's weight is the server's weight, and
// a record whose weight changes changes the server's share.
func TestBackendsFromSRVWeights(t *testing.T) {
	z := newDNSZone(t)
	_, ports := srvFakes(t, z, 2, tinyLlama)
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(10, 3, ports[0], 0), srvRecord(10, 1, ports[1], 1))
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"srv-weights","lb_policy":"round_robin",
		"backends_from":[{"type":"srv","name":"_ollama._tcp.ollama.test.","refresh":"10ms","resolvers":[%q],
		"backend":{"health_interval":"20ms","weight":5}}]}`, z.addr))
	a, b := srvName(ports, 0), srvName(ports, 1)
	waitPool(t, h, a, b)
	waitHealthy(t, viewOf(h, a).srv.key, stateHealthy)
	waitHealthy(t, viewOf(h, b).srv.key, stateHealthy)
	assert.Equal(t, 3, viewOf(h, a).cfg.Weight)
	assert.Equal(t, map[string]int{a: 6, b: 2}, chatsServedBy(t, url, 8), "round robin follows the records' weights 3:1")

	// Weight 0 leaves the block's weight (5); the changed record replaces
	// the view, and the old one leaves once idle.
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(10, 3, ports[0], 0), srvRecord(10, 0, ports[1], 1))
	require.Eventually(t, func() bool {
		v := viewOf(h, b)
		return v != nil && v.cfg.Weight == 5 && len(h.views()) == 2
	}, 10*time.Second, 5*time.Millisecond, "the weight change never applied")
	assert.Equal(t, map[string]int{a: 9, b: 15}, chatsServedBy(t, url, 24), "round robin follows the weights 3:5")
}

// TestBackendsFromSRVPriorityWithStatic: a source's lowest priority serves
// with the static backends; its next priority waits, and takes the first
// place when the lower records disappear.
func TestBackendsFromSRVPriorityWithStatic(t *testing.T) {
	z := newDNSZone(t)
	fakes, ports := srvFakes(t, z, 3, tinyLlama)
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(5, 0, ports[1], 1), srvRecord(9, 0, ports[2], 2))
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"srv-static","lb_policy":"round_robin",
		"backends":[{"name":"static","url":%q}],
		"backends_from":[{"type":"srv","name":"_ollama._tcp.ollama.test.","refresh":"10ms","resolvers":[%q],
		"backend":{"health_interval":"20ms"}}]}`, fakes[0].URL, z.addr))
	s1, s2 := srvName(ports, 1), srvName(ports, 2)
	waitPool(t, h, "static", s1, s2)
	waitHealthy(t, viewOf(h, s1).srv.key, stateHealthy)
	waitHealthy(t, viewOf(h, s2).srv.key, stateHealthy)
	assert.Equal(t, map[string]int{"static": 3, s1: 3}, chatsServedBy(t, url, 6))

	z.setSRV("_ollama._tcp.ollama.test", srvRecord(9, 0, ports[2], 2))
	waitPool(t, h, "static", s2)
	assert.Equal(t, int64(0), viewOf(h, s2).tier.Load(), "the only priority left is the first")
	assert.Equal(t, map[string]int{"static": 3, s2: 3}, chatsServedBy(t, url, 6))
}

// TestBackendsFromSRVFailoverUnderLoad streams chats through a frontend
// whose SRV records name two servers at priority 10 and one at 20: the
// one at 20 serves only while neither at 10 can (drained, then failing its
// probes, then their records gone), a lower priority that appears takes
// over, and no request fails across the changes.
func TestBackendsFromSRVFailoverUnderLoad(t *testing.T) {
	z := newDNSZone(t)
	cfg := tinyLlama
	cfg.TokenGap = time.Millisecond
	fakes, ports := srvFakes(t, z, 3, cfg)
	z.setSRV("_ollama._tcp.ollama.test",
		srvRecord(20, 0, ports[2], 2), srvRecord(10, 0, ports[0], 0), srvRecord(10, 0, ports[1], 1))
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"srv-failover","lb_policy":"round_robin","queue_timeout":"30s",
		"backends_from":[{"type":"srv","name":"_ollama._tcp.ollama.test.","refresh":"10ms","resolvers":[%q],
		"backend":{"health_interval":"20ms","health_fails":1,"max_parallel":4}}]}`, z.addr))
	names := []string{srvName(ports, 0), srvName(ports, 1), srvName(ports, 2)}
	waitPool(t, h, names...)
	views := make([]*backend, 3)
	for i, n := range names {
		views[i] = viewOf(h, n)
		waitHealthy(t, views[i].srv.key, stateHealthy)
	}

	load := startChatLoad(url, 6)
	counts := func() [3]int64 {
		by := load.servedBy()
		return [3]int64{int64(by[names[0]]), int64(by[names[1]]), int64(by[names[2]])}
	}
	// settle lets requests placed before a change finish, then returns the
	// counts after n more answers.
	settle := func(n int64) [3]int64 {
		t.Helper()
		load.answers(t, n, 30*time.Second)
		load.answers(t, n, 30*time.Second)
		return counts()
	}
	// since reports which servers answered between two snapshots.
	since := func(from, to [3]int64) [3]bool { return [3]bool{to[0] > from[0], to[1] > from[1], to[2] > from[2]} }

	start := settle(30)
	mid := settle(30)
	assert.Equal(t, [3]bool{true, true, false}, since(start, mid), "both servers at priority 10 serve, the one at 20 waits")
	assert.Zero(t, mid[2], "the server at priority 20 served while priority 10 could")

	// Both at 10 drained: the one at 20 takes over.
	views[0].srv.setDraining(true)
	views[1].srv.setDraining(true)
	from := settle(30)
	to := settle(30)
	assert.Equal(t, [3]bool{false, false, true}, since(from, to), "only priority 20 serves while 10 is drained")

	// One at 10 back: priority 20 stops.
	views[0].srv.setDraining(false)
	from = settle(30)
	to = settle(30)
	assert.Equal(t, [3]bool{true, false, false}, since(from, to), "priority 10 serves again once one of its servers can")

	// The one at 10 fails its probes (the chats it serves still finish):
	// priority 20 takes over until it passes again.
	fakes[0].FailWith(http.StatusInternalServerError, "restarting", "/")
	waitHealthy(t, views[0].srv.key, stateUnhealthy)
	from = settle(30)
	to = settle(30)
	assert.Equal(t, [3]bool{false, false, true}, since(from, to), "only priority 20 serves while 10 is unhealthy")
	fakes[0].ClearFaults()
	waitHealthy(t, views[0].srv.key, stateHealthy)
	from = settle(30)
	to = settle(30)
	assert.Equal(t, [3]bool{true, false, false}, since(from, to), "priority 10 serves again once healthy")

	// The records at 10 disappear (their servers drain and leave): 20 is
	// the first priority left, and serves; records at 5 then come first.
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(20, 0, ports[2], 2))
	waitPool(t, h, names[2])
	from = settle(30)
	to = settle(30)
	assert.Equal(t, [3]bool{false, false, true}, since(from, to), "the only priority left serves")
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(20, 0, ports[2], 2), srvRecord(5, 0, ports[1], 1))
	waitPool(t, h, names[1], names[2])
	// Drained above: if its live state outlived its records, undrain it.
	viewOf(h, names[1]).srv.setDraining(false)
	waitHealthy(t, viewOf(h, names[1]).srv.key, stateHealthy)
	from = settle(30)
	to = settle(30)
	assert.Equal(t, [3]bool{false, true, false}, since(from, to), "a lower priority that appears takes over")

	served := load.finish(t)
	t.Logf("%d requests through 6 fail-overs, %d failed; served %v", load.ok.Load(), load.failed.Load(), served)
}

// TestBackendsFromSRVQueuedFailover: a request queued behind a full server
// at priority 10 waits for it rather than going to priority 20, and is
// served by priority 20 as soon as priority 10 can serve no more.
func TestBackendsFromSRVQueuedFailover(t *testing.T) {
	z := newDNSZone(t)
	fakes, ports := srvFakes(t, z, 2, tinyLlama)
	z.setSRV("_ollama._tcp.ollama.test", srvRecord(10, 0, ports[0], 0), srvRecord(20, 0, ports[1], 1))
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"srv-queue","queue_timeout":"30s",
		"backends_from":[{"type":"srv","name":"_ollama._tcp.ollama.test.","refresh":"10ms","resolvers":[%q],
		"backend":{"health_interval":"20ms","max_parallel":1}}]}`, z.addr))
	primary, backup := srvName(ports, 0), srvName(ports, 1)
	waitPool(t, h, primary, backup)
	waitHealthy(t, viewOf(h, primary).srv.key, stateHealthy)
	waitHealthy(t, viewOf(h, backup).srv.key, stateHealthy)

	// The admin API says which server waits as a standby.
	ref := func(name string) frontendRefJSON {
		v := viewOf(h, name)
		st := backendStatus(v.srv, []view{{h, v}})
		require.Len(t, st.Frontends, 1)
		return st.Frontends[0]
	}
	require.NotNil(t, ref(primary).SRVPriority)
	require.NotNil(t, ref(backup).SRVPriority)
	assert.Equal(t, 10, *ref(primary).SRVPriority)
	assert.Equal(t, 20, *ref(backup).SRVPriority)
	assert.False(t, ref(primary).Standby)
	assert.True(t, ref(backup).Standby, "priority 20 waits while priority 10 can serve")

	fakes[0].Hold("/api/chat")
	results := make(chan string, 2)
	for range 2 {
		go func() {
			status, by, _ := chat(t, url)
			results <- fmt.Sprint(status, " ", by)
		}()
	}
	require.Eventually(t, func() bool { return fakes[0].InFlight() == 1 && h.queue.length() == 1 },
		10*time.Second, time.Millisecond, "one request holds priority 10's slot, the other waits for it")
	assert.Zero(t, fakes[1].Count("/api/chat"), "priority 20 took a request while priority 10 was only full")

	viewOf(h, primary).srv.setDraining(true)
	assert.Equal(t, fmt.Sprint(http.StatusOK, " ", backup), <-results, "the waiter goes to priority 20 once 10 is drained")
	assert.False(t, ref(backup).Standby, "priority 20 serves")
	fakes[0].Release()
	assert.Equal(t, fmt.Sprint(http.StatusOK, " ", primary), <-results, "the request in flight finishes where it was")
}
