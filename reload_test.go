package ollamaflow

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// TestReloadUnderLoad reloads the config 20 times while clients stream and
// post without pause. Over HTTP/2 (here h2c; HTTPS sites get h2 by
// default) no request may fail and no stream may be cut: the old server's
// GOAWAY tells clients which requests to send again. Over HTTP/1.1
// keep-alive, a request written on an idle connection just as the old
// server closes it is lost to clients that do not retry POSTs (Go's among
// them): that is measured and reported, and streams must still never be
// cut.
func TestReloadUnderLoad(t *testing.T) {
	for _, proto := range []string{"h2c", "h1"} {
		t.Run(proto, func(t *testing.T) { reloadUnderLoad(t, proto) })
	}
}

// h2cClient speaks HTTP/2 without TLS (prior knowledge), to a server
// configured withH2C.
var h2cClient = func() *http.Client {
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}()

func withH2C(cfg string) string {
	return strings.Replace(cfg, "skip_install_trust", "skip_install_trust\n\tservers {\n\t\tprotocols h1 h2c\n\t}", 1)
}

func reloadUnderLoad(t *testing.T, proto string) {
	// The clients note, per connection, whether the server ever sent a
	// byte on it (see the reset case below).
	var dialer net.Dialer
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &heardConn{Conn: c}, nil
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	withProtocols := func(cfg string) string { return cfg }
	if proto == "h2c" {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
		withProtocols = withH2C
	}
	var list []*fakeollama.Server
	for range 3 {
		f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 20, TokenGap: 3 * time.Millisecond})
		defer f.Close()
		list = append(list, f)
	}
	backendLines := func(n int) string {
		var out []string
		for i := 0; i < n; i++ {
			out = append(out, fmt.Sprintf("backend %c %s", 'a'+i, list[i].URL))
		}
		return strings.Join(out, "\n")
	}
	loadCaddyRaw(t, withProtocols(caddyConfig(backendLines(3))))
	waitKnown(t, list)

	var sent, answered, failed, cut, streams, resets atomic.Int64
	var mu sync.Mutex
	var failures []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream := w%2 == 0
			for {
				select {
				case <-stop:
					return
				default:
				}
				sent.Add(1)
				body := fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":%t}`, stream)
				var conn atomic.Pointer[heardConn]
				trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) {
					if c, ok := i.Conn.(*heardConn); ok {
						conn.Store(c)
					}
				}}
				unheard := func() bool { c := conn.Load(); return c == nil || !c.heard.Load() }
				post := func() (*http.Response, error) {
					req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodPost, siteURL+"/api/chat", strings.NewReader(body))
					if err != nil {
						return nil, err
					}
					req.Header.Set("Content-Type", "application/json")
					return client.Do(req)
				}
				res, err := post()
				if err != nil && errors.Is(err, syscall.ECONNRESET) && unheard() {
					// On Linux, Caddy gives each config its own
					// SO_REUSEPORT socket and closes the old one once
					// its server shuts down; a connection the kernel
					// had queued on the old socket, not yet accepted,
					// is reset. The old server's GOAWAY makes h2c
					// clients dial afresh at every reload, so some
					// dial races that close. Only a connection on
					// which the server never sent a byte (not even
					// HTTP/2's SETTINGS) qualifies: no server took it,
					// so no request reached a handler; a reset after
					// the server spoke is a failure. Send the request
					// once more, as a client would after such a reset,
					// and judge that answer.
					resets.Add(1)
					res, err = post()
				}
				if err != nil {
					failed.Add(1)
					mu.Lock()
					failures = append(failures, err.Error())
					mu.Unlock()
					continue
				}
				data, rerr := io.ReadAll(res.Body)
				res.Body.Close()
				switch {
				case res.StatusCode != http.StatusOK:
					failed.Add(1)
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%d %s", res.StatusCode, data))
					mu.Unlock()
				case rerr != nil || !bytes.Contains(lastLine(data), []byte(`"done":true`)):
					cut.Add(1)
					mu.Lock()
					failures = append(failures, fmt.Sprintf("cut stream: %v", rerr))
					mu.Unlock()
				}
				if stream {
					streams.Add(1)
				}
				answered.Add(1)
			}
		}()
	}
	// Between two reloads, every client gets answers: the reloads happen
	// under load however slowly a busy machine serves (a fixed pause let
	// a loaded CI machine reload over almost no traffic).
	underLoad := func() {
		t.Helper()
		from := answered.Load() + failed.Load()
		require.Eventually(t, func() bool { return answered.Load()+failed.Load() >= from+8 }, 60*time.Second, time.Millisecond,
			"the clients got no answers")
	}

	configs := []string{
		backendLines(3),
		"lb_policy least_conn\n" + backendLines(3),
		backendLines(2),
		"name other\n" + backendLines(3),
	}
	for i := 0; i < 20; i++ {
		underLoad()
		loadCaddyRaw(t, withProtocols(caddyConfig(configs[i%len(configs)])))
	}
	underLoad()
	close(stop)
	wg.Wait()

	t.Logf("%s: 20 reloads under load: %d requests (%d streamed), %d failed, %d streams cut, %d connections reset before a request was accepted (sent again)", proto, sent.Load(), streams.Load(), failed.Load(), cut.Load(), resets.Load())
	assert.Zero(t, cut.Load(), "failures: %v", failures)
	if proto == "h2c" {
		assert.Zero(t, failed.Load(), "failures: %v", failures)
	}
	assert.Greater(t, sent.Load(), int64(100))
}

// heardConn notes whether the peer ever sent a byte on a connection.
type heardConn struct {
	net.Conn
	heard atomic.Bool
}

func (c *heardConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.heard.Store(true)
	}
	return n, err
}

func lastLine(data []byte) []byte {
	data = bytes.TrimRight(data, "\n")
	if i := bytes.LastIndexByte(data, '\n'); i >= 0 {
		return data[i+1:]
	}
	return data
}

// TestReloadRemovesBackendGracefully: a backend removed by a reload gets no
// new requests, but the streams it is serving run to their end.
func TestReloadRemovesBackendGracefully(t *testing.T) {
	keep := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 2})
	defer keep.Close()
	gone := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 40, TokenGap: 10 * time.Millisecond})
	defer gone.Close()
	loadCaddy(t, fmt.Sprintf("lb_policy first\nbackend gone %s\nbackend keep %s", gone.URL, keep.URL))
	waitKnown(t, []*fakeollama.Server{gone, keep})

	res, err := client.Post(siteURL+"/api/chat", "application/json", strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	require.Equal(t, "gone", res.Header.Get("X-OllamaFlow-Backend"))
	sc := bufio.NewScanner(res.Body)
	require.True(t, sc.Scan(), "first chunk")

	loadCaddyRaw(t, caddyConfig(fmt.Sprintf("lb_policy first\nbackend keep %s", keep.URL)))
	before := gone.Count("/api/chat")
	for i := 0; i < 5; i++ {
		r, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, r.StatusCode, body)
		assert.Equal(t, "keep", r.Header.Get("X-OllamaFlow-Backend"))
	}
	assert.Equal(t, before, gone.Count("/api/chat"), "no new request reached the removed backend")

	var last string
	n := 1
	for sc.Scan() {
		last = sc.Text()
		n++
	}
	res.Body.Close()
	assert.NoError(t, sc.Err())
	assert.Equal(t, 41, n, "every chunk of the stream in flight arrived")
	assert.Contains(t, last, `"done":true`)
	require.Eventually(t, func() bool { return pooled(t, gone.URL) == nil }, 10*time.Second, 10*time.Millisecond,
		"the removed server leaves the pool once nothing uses it")
}

// TestReloadLeaksNoGoroutines reloads 50 times and counts goroutines.
func TestReloadLeaksNoGoroutines(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer b.Close()
	loadCaddy(t, fmt.Sprintf("backend a %s", a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	settle := func() int {
		time.Sleep(300 * time.Millisecond)
		client.CloseIdleConnections()
		h2cClient.CloseIdleConnections()
		http.DefaultClient.CloseIdleConnections() // the admin API's
		runtime.GC()
		return runtime.NumGoroutine()
	}
	base := settle()
	for i := 0; i < 50; i++ {
		// Every other config adds b, so its server and goroutines come and go.
		body := fmt.Sprintf("name n%d\nbackend a %s", i, a.URL)
		if i%2 == 0 {
			body += fmt.Sprintf("\nbackend b %s", b.URL)
		}
		loadCaddyRaw(t, withH2C(caddyConfig(body)))
		res, err := h2cClient.Post(siteURL+"/api/chat", "application/json", strings.NewReader(chatFor("tiny-llama")))
		require.NoError(t, err)
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		require.Equal(t, http.StatusOK, res.StatusCode)
	}
	loadCaddyRaw(t, caddyConfig(fmt.Sprintf("backend a %s", a.URL)))
	h2cClient.CloseIdleConnections()
	var after int
	deadline := time.Now().Add(15 * time.Second)
	for after = settle(); after > base+10 && time.Now().Before(deadline); after = settle() {
	}
	if after > base+10 {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Fatalf("goroutines: %d before, %d after 50 reloads\n%s", base, after, buf[:n])
	}
	t.Logf("goroutines: %d before, %d after 50 reloads", base, after)
	assert.Nil(t, pooled(t, b.URL), "b's server was destroyed with its goroutines")
}
