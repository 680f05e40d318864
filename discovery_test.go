package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/miekg/dns"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// dnsZone is an authoritative DNS server on 127.0.0.1 (UDP and TCP on one
// port) whose records a test changes as it runs.
type dnsZone struct {
	addr    string
	mu      sync.Mutex
	a       map[string][]string // rooted lowercase name -> IPv4 addresses
	srv     map[string][]*dns.SRV
	fail    bool         // answer SERVFAIL to everything
	queries atomic.Int64 // questions answered
	tcp     atomic.Int64 // of them over TCP
}

func newDNSZone(t *testing.T) *dnsZone {
	t.Helper()
	z := &dnsZone{a: map[string][]string{}, srv: map[string][]*dns.SRV{}}
	var pc net.PacketConn
	var ln net.Listener
	for range 20 { // UDP and TCP on the same port
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		pc = nil
	}
	require.NotNil(t, pc, "no port free for both UDP and TCP")
	z.addr = pc.LocalAddr().String()
	udp := &dns.Server{PacketConn: pc, Handler: z}
	tcp := &dns.Server{Listener: ln, Handler: z}
	go func() { _ = udp.ActivateAndServe() }()
	go func() { _ = tcp.ActivateAndServe() }()
	t.Cleanup(func() {
		_ = udp.Shutdown()
		_ = tcp.Shutdown()
	})
	return z
}

func (z *dnsZone) setA(name string, ips ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if ips == nil {
		delete(z.a, dns.Fqdn(name))
		return
	}
	z.a[dns.Fqdn(name)] = ips
}

func (z *dnsZone) setSRV(name string, targets ...*dns.SRV) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.srv[dns.Fqdn(name)] = targets
}

func (z *dnsZone) setFail(on bool) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.fail = on
}

func (z *dnsZone) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	z.queries.Add(1)
	if w.LocalAddr().Network() == "tcp" {
		z.tcp.Add(1)
	}
	z.mu.Lock()
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	ips, hasA := z.a[name]
	srvs, hasSRV := z.srv[name]
	fail := z.fail
	z.mu.Unlock()
	hdr := dns.RR_Header{Name: q.Name, Class: dns.ClassINET, Rrtype: q.Qtype}
	switch {
	case fail:
		m.Rcode = dns.RcodeServerFailure
	case !hasA && !hasSRV:
		m.Rcode = dns.RcodeNameError
	case q.Qtype == dns.TypeA:
		for _, ip := range ips {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: net.ParseIP(ip)})
		}
	case q.Qtype == dns.TypeSRV:
		for _, s := range srvs {
			rec := *s
			rec.Hdr = hdr
			m.Answer = append(m.Answer, &rec)
		}
	}
	if w.LocalAddr().Network() == "udp" {
		size := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		m.Truncate(size)
	}
	_ = w.WriteMsg(m)
}

// fakesOnOnePort starts n fake Ollama servers on 127.0.0.1, 127.0.0.2, ...
// all on one port, as the pods behind a headless Service are.
func fakesOnOnePort(t *testing.T, n int, cfg fakeollama.Config) ([]*fakeollama.Server, int) {
	t.Helper()
	for range 20 {
		first := fakeollama.NewUnstarted(cfg)
		require.NoError(t, first.StartAt("127.0.0.1:0"))
		_, portStr, _ := net.SplitHostPort(first.HostPort())
		var port int
		fmt.Sscan(portStr, &port)
		fakes := []*fakeollama.Server{first}
		for i := 2; i <= n; i++ {
			f := fakeollama.NewUnstarted(cfg)
			if err := f.StartAt(fmt.Sprintf("127.0.0.%d:%d", i, port)); err != nil {
				break
			}
			fakes = append(fakes, f)
		}
		if len(fakes) == n {
			t.Cleanup(func() {
				for _, f := range fakes {
					f.Close()
				}
			})
			return fakes, port
		}
		for _, f := range fakes {
			f.Close()
		}
	}
	t.Fatal("no port free on every loopback address")
	return nil, 0
}

// discoveryHandler provisions a frontend from JSON and serves it on a
// loopback server.
func discoveryHandler(t *testing.T, config string) (*Handler, string) {
	t.Helper()
	h := new(Handler)
	require.NoError(t, json.Unmarshal([]byte(config), h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	require.NoError(t, h.Provision(ctx))
	t.Cleanup(func() { _ = h.Cleanup() })
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = h.ServeHTTP(w, r, nil)
	}))
	t.Cleanup(srv.Close)
	return h, srv.URL
}

func poolNames(h *Handler) []string {
	var out []string
	for _, b := range h.pool() {
		out = append(out, b.cfg.Name)
	}
	sort.Strings(out)
	return out
}

func waitPool(t *testing.T, h *Handler, want ...string) {
	t.Helper()
	sort.Strings(want)
	require.Eventually(t, func() bool { return slices.Equal(poolNames(h), want) },
		30*time.Second, 5*time.Millisecond, "pool never became %v", want)
}

// viewOf finds the frontend's view named name, leaving ones included.
func viewOf(h *Handler, name string) *backend {
	for _, b := range h.views() {
		if b.cfg.Name == name {
			return b
		}
	}
	return nil
}

// waitLookups waits until the source has been looked up n more times.
func waitLookups(t *testing.T, h *Handler, n int64) {
	t.Helper()
	start := h.discovery.status()[0].Lookups
	require.Eventually(t, func() bool { return h.discovery.status()[0].Lookups >= start+n },
		30*time.Second, 5*time.Millisecond)
}

func chat(t *testing.T, url string, hdr ...string) (status int, backend, body string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url+"/api/chat", strings.NewReader(chatBody))
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return res.StatusCode, res.Header.Get("X-OllamaFlow-Backend"), string(b)
}

var tinyLlama = fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3}

func TestBackendsFromJoinAfterProbe(t *testing.T) {
	z := newDNSZone(t)
	fakes, port := fakesOnOnePort(t, 3, tinyLlama)
	z.setA("ollama.test", "127.0.0.1")
	// The third server fails its probes until the test lets it pass.
	fakes[2].FailWith(http.StatusInternalServerError, "starting", "/")

	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-join","lb_policy":"round_robin",
		"sticky":{"headers":["x-conversation-id"]},
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"20ms","resolvers":[%q],
		"backend":{"labels":["gpu"],"max_parallel":3,"health_interval":"20ms","health_passes":1}}]}`, port, z.addr))

	a, b, c := fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.2:%d", port), fmt.Sprintf("127.0.0.3:%d", port)
	// The first lookup runs in Provision: the config starts with its server.
	assert.Equal(t, []string{a}, poolNames(h))
	first := viewOf(h, a)
	assert.Equal(t, 3, first.cfg.MaxParallel, "the block's options apply to every server found")
	assert.True(t, first.carries([]string{"gpu"}))
	waitHealthy(t, "http://"+a, stateHealthy)

	keys := map[string]string{}
	for i := range 40 {
		status, by, body := chat(t, url, "x-conversation-id", fmt.Sprint("conv-", i))
		require.Equal(t, http.StatusOK, status, body)
		keys[fmt.Sprint("conv-", i)] = by
	}

	z.setA("ollama.test", "127.0.0.1", "127.0.0.2", "127.0.0.3")
	waitPool(t, h, a, b, c)
	waitHealthy(t, "http://"+b, stateHealthy)
	waitHealthy(t, "http://"+c, stateUnhealthy)
	assert.False(t, viewOf(h, c).healthy(), "a discovered server failing its probes is out of rotation")

	served := map[string]int{}
	moved := 0
	for i := range 40 {
		key := fmt.Sprint("conv-", i)
		status, by, body := chat(t, url, "x-conversation-id", key)
		require.Equal(t, http.StatusOK, status, body)
		served[by]++
		if by != keys[key] {
			moved++
			assert.Equal(t, b, by, "a key moves only to the server that joined")
		}
	}
	assert.Zero(t, served[c], "the server failing its probes got requests")
	assert.Positive(t, moved, "no key moved to the new server")
	assert.Zero(t, fakes[2].Count("/api/chat"))

	fakes[2].ClearFaults()
	waitHealthy(t, "http://"+c, stateHealthy)
	for range 12 {
		status, by, body := chat(t, url)
		require.Equal(t, http.StatusOK, status, body)
		served[by]++
	}
	assert.Positive(t, served[c], "the server never entered rotation once healthy: %v", served)

	// The admin API names the source of each server.
	st := backendStatus(viewOf(h, c).srv, viewsOf(viewOf(h, c).srv))
	require.Len(t, st.Frontends, 1)
	assert.Equal(t, fmt.Sprintf("a ollama.test. %d", port), st.Frontends[0].Source)
}

func TestBackendsFromLeaveDrains(t *testing.T) {
	z := newDNSZone(t)
	fakes, port := fakesOnOnePort(t, 2, tinyLlama)
	a, b := fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.2:%d", port)
	z.setA("ollama.test", "127.0.0.2")
	fakes[1].Hold("/api/chat")

	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-leave",
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"20ms","resolvers":[%q],
		"backend":{"health_interval":"1h"}}]}`, port, z.addr))
	require.Equal(t, []string{b}, poolNames(h))
	waitHealthy(t, "http://"+b, stateHealthy)

	type result struct {
		status      int
		by, content string
	}
	done := make(chan result, 1)
	go func() {
		status, by, body := chat(t, url)
		done <- result{status, by, body}
	}()
	require.Eventually(t, func() bool { return fakes[1].InFlight() == 1 }, 30*time.Second, time.Millisecond, "the request never reached the server")

	z.setA("ollama.test", "127.0.0.1")
	waitPool(t, h, a)
	waitHealthy(t, "http://"+a, stateHealthy)
	leaving := viewOf(h, b)
	require.NotNil(t, leaving, "the server left before its request finished")
	assert.True(t, leaving.leaving.Load())
	assert.EqualValues(t, 1, leaving.held.Load())
	assert.NotNil(t, pooled(t, "http://"+b), "the server's state was released while it served a request")
	st := backendStatus(leaving.srv, viewsOf(leaving.srv))
	require.Len(t, st.Frontends, 1)
	assert.True(t, st.Frontends[0].Leaving, "the admin API shows the server leaving")

	for range 5 {
		status, by, body := chat(t, url)
		require.Equal(t, http.StatusOK, status, body)
		assert.Equal(t, a, by, "a server that left got a new request")
	}

	fakes[1].Release()
	r := <-done
	assert.Equal(t, http.StatusOK, r.status)
	assert.Equal(t, b, r.by)
	assert.Contains(t, r.content, `"done":true`, "the request in flight finished whole")
	require.Eventually(t, func() bool { return viewOf(h, b) == nil && pooled(t, "http://"+b) == nil },
		30*time.Second, 5*time.Millisecond, "the server never left once idle")
}

func TestBackendsFromKeepsServersWhenDNSFails(t *testing.T) {
	z := newDNSZone(t)
	_, port := fakesOnOnePort(t, 2, tinyLlama)
	a, b := fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.2:%d", port)
	z.setA("ollama.test", "127.0.0.1", "127.0.0.2")
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-fail",
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"10ms","resolvers":[%q]}]}`, port, z.addr))
	waitPool(t, h, a, b)

	z.setFail(true)
	waitLookups(t, h, 3)
	assert.Equal(t, []string{a, b}, poolNames(h), "a failing lookup emptied the pool")
	st := h.discovery.status()[0]
	assert.Positive(t, st.Failures)
	assert.Equal(t, "lookup ollama.test. on "+z.addr+": server misbehaving", st.LastError)
	status, _, body := chat(t, url)
	assert.Equal(t, http.StatusOK, status, body)

	// A config loaded while DNS fails starts with the last good answer.
	h2, _ := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-fail",
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"10ms","resolvers":[%q]}]}`, port, z.addr))
	assert.Equal(t, []string{a, b}, poolNames(h2))

	z.setFail(false)
	z.setA("ollama.test", "127.0.0.2")
	waitPool(t, h, b)
	assert.Empty(t, h.discovery.status()[0].LastError)

	// A name that no longer exists is an answer: its servers leave.
	z.setA("ollama.test")
	waitPool(t, h)
	status, _, body = chat(t, url)
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Contains(t, body, "no backend found yet by backends_from (a ollama.test.")
}

func TestBackendsFromSRV(t *testing.T) {
	z := newDNSZone(t)
	f1, f2 := fakeollama.New(tinyLlama), fakeollama.New(tinyLlama)
	t.Cleanup(f1.Close)
	t.Cleanup(f2.Close)
	_, p1, _ := net.SplitHostPort(f1.HostPort())
	_, p2, _ := net.SplitHostPort(f2.HostPort())
	var port1, port2 uint16
	fmt.Sscan(p1, &port1)
	fmt.Sscan(p2, &port2)
	z.setA("ollama-0.ollama.test", "127.0.0.1")
	z.setA("ollama-1.ollama.test", "127.0.0.1")
	z.setSRV("_ollama._tcp.ollama.test",
		&dns.SRV{Priority: 10, Port: port1, Target: "ollama-0.ollama.test."},
		&dns.SRV{Priority: 10, Port: port2, Target: "ollama-1.ollama.test."})

	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-srv","lb_policy":"round_robin",
		"backends":[{"name":"static","url":%q}],
		"backends_from":[{"type":"srv","name":"_ollama._tcp.ollama.test.","refresh":"20ms","resolvers":["udp/%s"],
		"backend":{"pin_completions":{"options":{"seed":7}},"headers":{"X-Pool":["dns"]}}}]}`, f1.URL, z.addr))
	// f1 is also a static backend: one view of it, the static one.
	n1, n2 := "ollama-1.ollama.test:"+p2, "static"
	assert.Equal(t, []string{n1, n2}, poolNames(h))
	assert.Equal(t, "http://127.0.0.1:"+p2, viewOf(h, n1).srv.key)

	// A discovered server takes requests once a probe has passed: round
	// robin splits evenly from then on.
	require.Eventually(t, func() bool { return healthState(viewOf(h, n1).srv.state.Load()) == stateHealthy },
		30*time.Second, 5*time.Millisecond, "the discovered server passes its probe")
	served := map[string]int{}
	for range 8 {
		status, by, body := chat(t, url)
		require.Equal(t, http.StatusOK, status, body)
		served[by]++
	}
	assert.Equal(t, map[string]int{n1: 4, n2: 4}, served)
	lastChat := func(f *fakeollama.Server) fakeollama.Request {
		var last fakeollama.Request
		for _, r := range f.Requests() {
			if r.Path == "/api/chat" {
				last = r
			}
		}
		return last
	}
	assert.Contains(t, string(lastChat(f2).Body), `"seed":7`, "the block's pins apply to servers found")
	assert.Equal(t, "dns", lastChat(f2).Header.Get("X-Pool"), "the block's headers apply to servers found")
	assert.NotContains(t, string(lastChat(f1).Body), `"seed"`, "the static backend got the source's pins")
	assert.Empty(t, lastChat(f1).Header.Get("X-Pool"))

	z.setSRV("_ollama._tcp.ollama.test", &dns.SRV{Port: port1, Target: "ollama-0.ollama.test."})
	waitPool(t, h, "static")
}

func TestBackendsFromManyRecordsOverTCP(t *testing.T) {
	z := newDNSZone(t)
	var ips []string
	for i := range 200 {
		ips = append(ips, fmt.Sprintf("127.0.%d.%d", 1+i/250, 1+i%250))
	}
	z.setA("big.test", ips...)
	h, _ := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-big",
		"backends_from":[{"type":"a","host":"big.test.","refresh":"1h","resolvers":[%q],
		"backend":{"health_interval":"1h","model_refresh":"1h"}}]}`, z.addr))
	assert.Len(t, h.pool(), 200, "a truncated answer was not asked again over TCP")
	assert.Positive(t, z.tcp.Load())
	assert.Contains(t, poolNames(h), "127.0.1.1:11434", "port 11434 by default")
}

// TestBackendsFromChurnUnderLoad changes the records again and again while
// clients stream chats through the frontend: no request may fail.
func TestBackendsFromChurnUnderLoad(t *testing.T) {
	z := newDNSZone(t)
	cfg := tinyLlama
	cfg.TokenGap = 2 * time.Millisecond
	_, port := fakesOnOnePort(t, 4, cfg)
	ip := func(i int) string { return fmt.Sprintf("127.0.0.%d", i%4+1) }
	z.setA("ollama.test", ip(0), ip(1))
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-churn","queue_timeout":"30s",
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"5ms","resolvers":[%q],
		"backend":{"max_parallel":2,"health_interval":"20ms"}}]}`, port, z.addr))
	for _, b := range h.pool() {
		waitHealthy(t, b.srv.key, stateHealthy)
	}

	load := startChatLoad(url, 8)

	// Each step keeps one server of the last set (as a rolling update
	// does) and moves on once the new one is in rotation.
	changes := 0
	for step := 1; step <= 12; step++ {
		z.setA("ollama.test", ip(step), ip(step+1))
		want := []string{fmt.Sprintf("%s:%d", ip(step), port), fmt.Sprintf("%s:%d", ip(step+1), port)}
		waitPool(t, h, want...)
		for _, b := range h.pool() {
			waitHealthy(t, b.srv.key, stateHealthy)
		}
		load.answers(t, 8, 20*time.Second)
		changes++
	}
	served := load.finish(t)
	assert.Equal(t, 12, changes)
	for j := range 4 {
		n := 0
		for by, c := range served {
			if strings.HasPrefix(by, ip(j)+":") {
				n += c
			}
		}
		assert.Positive(t, n, "server %s never served", ip(j))
	}
	t.Logf("%d requests through %d membership changes, %d failed", load.ok.Load(), changes, load.failed.Load())
}

// chatLoad is clients streaming chats through a frontend one after the
// other until finished, for tests that change the pool under load: every
// failure is kept, every answer counted by the backend that served it.
type chatLoad struct {
	stop       context.CancelFunc
	wg         sync.WaitGroup
	ok, failed atomic.Int64
	failures   sync.Map // "client-request" -> what went wrong
	mu         sync.Mutex
	served     map[string]int // X-OllamaFlow-Backend -> answers
}

func startChatLoad(url string, clients int) *chatLoad {
	ctx, stop := context.WithCancel(context.Background())
	l := &chatLoad{stop: stop, served: make(map[string]int)}
	client := &http.Client{Timeout: 30 * time.Second}
	for w := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				res, err := client.Post(url+"/api/chat", "application/json", strings.NewReader(chatBody))
				if err != nil {
					l.failed.Add(1)
					l.failures.Store(fmt.Sprint(w, "-", i), err.Error())
					continue
				}
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil || res.StatusCode != http.StatusOK || !strings.Contains(string(body), `"done":true`) {
					l.failed.Add(1)
					l.failures.Store(fmt.Sprint(w, "-", i), fmt.Sprintf("%d %v %s", res.StatusCode, err, body))
					continue
				}
				l.ok.Add(1)
				l.mu.Lock()
				l.served[res.Header.Get("X-OllamaFlow-Backend")]++
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// answers waits for n more answers.
func (l *chatLoad) answers(t *testing.T, n int64, within time.Duration) {
	t.Helper()
	before := l.ok.Load()
	require.Eventually(t, func() bool { return l.ok.Load() >= before+n }, within, time.Millisecond)
}

// servedBy is how many answers each backend gave so far.
func (l *chatLoad) servedBy() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.served)
}

// finish stops the clients, fails the test for every request that
// failed, and returns the answers per backend.
func (l *chatLoad) finish(t *testing.T) map[string]int {
	t.Helper()
	l.stop()
	l.wg.Wait()
	l.failures.Range(func(k, v any) bool {
		t.Errorf("request %v failed: %v", k, v)
		return true
	})
	assert.Zero(t, l.failed.Load())
	return l.servedBy()
}

func TestBackendsFromQueueFollowsMembers(t *testing.T) {
	z := newDNSZone(t)
	fakes, port := fakesOnOnePort(t, 2, tinyLlama)
	a, b := fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("127.0.0.2:%d", port)
	z.setA("ollama.test", "127.0.0.1")
	fakes[0].Hold("/api/chat")
	h, url := discoveryHandler(t, fmt.Sprintf(`{"name":"disco-queue",
		"backends_from":[{"type":"a","host":"ollama.test.","port":%d,"refresh":"10ms","resolvers":[%q],
		"backend":{"max_parallel":1,"health_interval":"20ms"}}]}`, port, z.addr))
	waitHealthy(t, "http://"+a, stateHealthy)

	results := make(chan string, 2)
	for range 2 {
		go func() {
			status, by, _ := chat(t, url)
			results <- fmt.Sprint(status, " ", by)
		}()
	}
	// One request holds a's only slot, the other waits in the queue.
	require.Eventually(t, func() bool { return fakes[0].InFlight() == 1 && h.queue.length() == 1 }, 10*time.Second, time.Millisecond)

	// A server that joins serves the waiter as soon as it is healthy.
	z.setA("ollama.test", "127.0.0.1", "127.0.0.2")
	assert.Equal(t, fmt.Sprint(http.StatusOK, " ", b), <-results)
	assert.Zero(t, h.queue.length())
	fakes[0].Release()
	assert.Equal(t, fmt.Sprint(http.StatusOK, " ", a), <-results)
}

func TestBackendSourceProvisionErrors(t *testing.T) {
	tests := []struct {
		src  BackendSource
		want string
	}{
		{BackendSource{Type: "aaaa", Host: "x"}, `type: want a or srv, got "aaaa"`},
		{BackendSource{Type: "a"}, "host: required for type a"},
		{BackendSource{Type: "a", Host: "x", Port: 70000}, "port: want 1-65535"},
		{BackendSource{Type: "a", Host: "x", Name: "y"}, "name: only for type srv"},
		{BackendSource{Type: "srv"}, "name: required for type srv"},
		{BackendSource{Type: "srv", Name: "x", Port: 80}, "host and port: only for type a"},
		{BackendSource{Type: "a", Host: "x", Refresh: -1}, "refresh: must not be negative"},
		{BackendSource{Type: "a", Host: "x", Resolvers: []string{"unix//tmp/dns"}}, "want a udp or tcp address"},
		{BackendSource{Type: "a", Host: "x", Resolvers: []string{"10.0.0.1:53-54"}}, "want one port"},
		{BackendSource{Type: "a", Host: "x", Backend: &Backend{Name: "n"}}, "backend: name and url come from DNS"},
		{BackendSource{Type: "a", Host: "x", Backend: &Backend{MaxParallel: -1}}, "max_parallel: must not be negative"},
	}
	for _, tt := range tests {
		_, err := tt.src.provision()
		if assert.Error(t, err, "%+v", tt.src) {
			assert.Contains(t, err.Error(), tt.want)
		}
	}
	var h Handler
	require.NoError(t, json.Unmarshal([]byte(`{"backends_from":[{"type":"srv","name":"x","port":1}]}`), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	err := h.Provision(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "backends_from srv x: host and port: only for type a")

	var none Handler
	require.ErrorContains(t, none.Provision(ctx), "a frontend needs at least one backend or one backends_from source")
}

func TestBackendsFromCaddyfile(t *testing.T) {
	h := new(Handler)
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n" + `		backends_from a ollama-headless.ai.svc.cluster.local 11434 {
			refresh 5s
			resolvers 10.96.0.10 tcp/10.96.0.11:5353
			labels gpu europe
			max_parallel 4
			bearer_token secret
			health_interval 2s
		}
		backends_from srv _ollama._tcp.ollama.ai.svc.cluster.local
		backends_from a cpu.internal` + "\n}"))
	require.NoError(t, err)
	require.Len(t, h.BackendsFrom, 3)
	a := h.BackendsFrom[0]
	assert.Equal(t, "a", a.Type)
	assert.Equal(t, "ollama-headless.ai.svc.cluster.local", a.Host)
	assert.Equal(t, 11434, a.Port)
	assert.Equal(t, caddy.Duration(5*time.Second), a.Refresh)
	assert.Equal(t, []string{"10.96.0.10", "tcp/10.96.0.11:5353"}, a.Resolvers)
	require.NotNil(t, a.Backend)
	assert.Equal(t, []string{"gpu", "europe"}, a.Backend.Labels)
	assert.Equal(t, 4, a.Backend.MaxParallel)
	assert.Equal(t, "secret", a.Backend.BearerToken)
	assert.Equal(t, caddy.Duration(2*time.Second), a.Backend.HealthInterval)
	assert.Equal(t, BackendSource{Type: "srv", Name: "_ollama._tcp.ollama.ai.svc.cluster.local"}, *h.BackendsFrom[1])
	assert.Equal(t, BackendSource{Type: "a", Host: "cpu.internal"}, *h.BackendsFrom[2], "no block: no backend template")
	assert.Empty(t, h.Backends)

	errs := []struct {
		body string
		want string
		line int
	}{
		{"\t\tbackends_from", "want a <host> [<port>] or srv <name>", 3},
		{"\t\tbackends_from mx example.com", "unknown type 'mx' (want a or srv)", 3},
		{"\t\tbackends_from a", "backends_from a: want <host> [<port>], got 0 arguments", 3},
		{"\t\tbackends_from a h 1 2", "got 3 arguments", 3},
		{"\t\tbackends_from a h http", "invalid port 'http'", 3},
		{"\t\tbackends_from a h 0", "invalid port '0'", 3},
		{"\t\tbackends_from srv", "backends_from srv: want <name>, got 0 arguments", 3},
		{"\t\tbackends_from srv a b", "got 2 arguments", 3},
		{"\t\tbackends_from a h {\n\t\t\trefresh soon\n\t\t}", "refresh: invalid duration 'soon'", 4},
		{"\t\tbackends_from a h {\n\t\t\trefresh 1s\n\t\t\trefresh 2s\n\t\t}", "duplicate backends_from option 'refresh'", 5},
		{"\t\tbackends_from a h {\n\t\t\tresolvers\n\t\t}", "resolvers: want at least one argument", 4},
		{"\t\tbackends_from a h {\n\t\t\tresolvers unix//x\n\t\t}", "want a udp or tcp address", 4},
		{"\t\tbackends_from a h {\n\t\t\tweight 0\n\t\t}", "weight: must be at least 1", 4},
		{"\t\tbackends_from a h {\n\t\t\tcolour blue\n\t\t}", "unrecognized backend option 'colour'", 4},
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, tt := range errs {
		_, _, err := adapter.Adapt([]byte(frontend(tt.body)), nil)
		if assert.Error(t, err, tt.body) {
			assert.Contains(t, err.Error(), tt.want)
			assert.True(t, strings.HasSuffix(err.Error(), fmt.Sprintf(", at Caddyfile:%d", tt.line)), "%q: error %q not at line %d", tt.body, err, tt.line)
		}
	}
}
