package ollamaflow

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// leanTestPool is a pool to addr with a generous dial timeout.
func leanTestPool(addr string) *leanPool {
	return newLeanPool(addr, func() time.Duration { return 5 * time.Second })
}

// rawBackend is a loopback TCP server whose every connection serve handles
// (its requests read with http.ReadRequest): a backend that can say
// anything, malformed included. It counts the connections accepted.
type rawBackend struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
}

func newRawBackend(t *testing.T, serve func(n int64, c net.Conn, br *bufio.Reader)) *rawBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	rb := &rawBackend{ln: ln}
	rb.wg.Add(1)
	go func() {
		defer rb.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := rb.accepted.Add(1)
			rb.wg.Add(1)
			go func() {
				defer rb.wg.Done()
				defer c.Close()
				serve(n, c, bufio.NewReader(c))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); rb.wg.Wait() })
	return rb
}

func (rb *rawBackend) addr() string { return rb.ln.Addr().String() }

// readReq reads one request and its body; nil when the client closed.
func readReq(br *bufio.Reader) (*http.Request, []byte) {
	req, err := http.ReadRequest(br)
	if err != nil {
		return nil, nil
	}
	body, _ := io.ReadAll(req.Body)
	return req, body
}

func leanReq(t *testing.T, ctx context.Context, method, addr, body string) *http.Request {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://"+addr+"/api/chat", r)
	require.NoError(t, err)
	return req
}

// Content-Length and chunked answers are read whole, and the connection
// serves the next request: one connection for many requests, parked in the
// pool between them.
func TestLeanClientKeepsConnectionsAlive(t *testing.T) {
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r.URL.Query().Get("chunked") != "" {
			for i := range 3 {
				fmt.Fprintf(w, "part %d of %s;", i, body)
				w.(http.Flusher).Flush()
			}
			return
		}
		fmt.Fprintf(w, "whole %s", body)
	}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	p := leanTestPool(srv.Listener.Addr().String())
	defer p.closeAll()
	for i := range 6 {
		q := ""
		if i%2 == 1 {
			q = "?chunked=1"
		}
		req, err := http.NewRequest(http.MethodPost, srv.URL+"/x"+q, strings.NewReader(fmt.Sprint("req", i)))
		require.NoError(t, err)
		res, err := p.roundTrip(req)
		require.NoError(t, err)
		got, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		require.NoError(t, res.Body.Close())
		if q == "" {
			assert.Equal(t, fmt.Sprintf("whole req%d", i), string(got))
			assert.EqualValues(t, len(got), res.ContentLength)
		} else {
			assert.Equal(t, fmt.Sprintf("part 0 of req%d;part 1 of req%d;part 2 of req%d;", i, i, i), string(got))
			assert.Equal(t, []string{"chunked"}, res.TransferEncoding)
		}
		assert.Equal(t, 1, p.idleCount(), "the connection went back to the pool")
	}
	assert.EqualValues(t, 1, conns.Load(), "every request on one connection")
}

// A chunked request body (a length the proxy does not know) is sent
// chunked and arrives whole.
func TestLeanClientSendsAChunkedRequestBody(t *testing.T) {
	var gotTE []string
	var gotBody []byte
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		req, body := readReq(br)
		if req == nil {
			return
		}
		gotTE, gotBody = req.TransferEncoding, body
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	req := leanReq(t, context.Background(), http.MethodPost, rb.addr(), "")
	req.Body = io.NopCloser(io.MultiReader(strings.NewReader("abc"), strings.NewReader("def")))
	req.ContentLength = -1
	res, err := p.roundTrip(req)
	require.NoError(t, err)
	got, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "ok", string(got))
	assert.Equal(t, []string{"chunked"}, gotTE)
	assert.Equal(t, "abcdef", string(gotBody))
}

// pooledConn is the pool's one idle connection.
func pooledConn(t *testing.T, p *leanPool) *leanConn {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	require.Len(t, p.idle, 1)
	return p.idle[0]
}

// A pooled connection the backend closed while it idled is caught before
// the request is written to it: the request goes on a new connection, its
// body whole, and the dead one never carried a byte of it.
func TestLeanClientChecksAPooledConnectionBeforeWriting(t *testing.T) {
	var bodies []string
	var mu sync.Mutex
	afterClose := make(chan int, 1) // bytes the first connection got after its close
	rb := newRawBackend(t, func(n int64, c net.Conn, br *bufio.Reader) {
		req, body := readReq(br)
		if req == nil {
			return
		}
		mu.Lock()
		bodies = append(bodies, string(body))
		mu.Unlock()
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		if n == 1 {
			// Closed for writing while idle (the client still believes
			// it open); anything the client writes still arrives.
			c.(*net.TCPConn).CloseWrite()
			rest, _ := io.ReadAll(br)
			afterClose <- len(rest)
		}
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "body0"))
	require.NoError(t, err)
	got, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "body0", string(got))
	c := pooledConn(t, p)
	require.Eventually(t, func() bool { return !c.idleUsable() }, 10*time.Second, time.Millisecond, "the backend's close reaches the socket")

	var resent []error
	res, err = p.roundTripNoting(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "body1"), func(err error) { resent = append(resent, err) })
	require.NoError(t, err)
	got, err = io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "body1", string(got))
	assert.Empty(t, resent, "nothing was sent twice: the dead connection was never written to")
	assert.EqualValues(t, 2, rb.accepted.Load())
	assert.Zero(t, <-afterClose, "the closed connection received no byte of the request")
	mu.Lock()
	assert.Equal(t, []string{"body0", "body1"}, bodies)
	mu.Unlock()
}

// A pooled connection on which the backend sent bytes nobody asked for
// (more than its answer: a wrong Content-Length, a body on a 204) is
// closed when taken from the pool: those bytes are never read as the next
// request's answer, which might be another user's.
func TestLeanClientClosesAPooledConnectionWithUnsolicitedBytes(t *testing.T) {
	firstRead := make(chan struct{})
	var secondOnFirst atomic.Bool
	rb := newRawBackend(t, func(n int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		if n > 1 {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswer B")
			readReq(br)
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		<-firstRead
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nuser A's answer")
		if req, _ := readReq(br); req != nil {
			secondOnFirst.Store(true)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong")
		}
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "a"))
	require.NoError(t, err)
	got, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "ok", string(got))
	c := pooledConn(t, p)
	close(firstRead)
	require.Eventually(t, func() bool { return !c.idleUsable() }, 10*time.Second, time.Millisecond, "the unsolicited bytes reach the socket")

	res, err = p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "b"))
	require.NoError(t, err)
	got, err = io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "answer B", string(got))
	assert.EqualValues(t, 2, rb.accepted.Load())
	p.closeAll()
	rb.ln.Close()
	rb.wg.Wait()
	assert.False(t, secondOnFirst.Load(), "no request went on the connection with unsolicited bytes")
}

// A request written to a reused connection that then drops before any
// byte of an answer may have been worked on (an inference run): a POST is
// not sent again (net/http's rule), its failure is the caller's; a
// replayable request (GET, or a POST with an Idempotency-Key) goes once
// more on a new connection, and the resend is told.
func TestLeanClientResendsOnlyReplayableRequests(t *testing.T) {
	for _, tc := range []struct {
		name, method, key string
		resent            bool
	}{
		{"post", http.MethodPost, "", false},
		{"post with an idempotency key", http.MethodPost, "k1", true},
		{"get", http.MethodGet, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var received atomic.Int64 // second requests the backend read
			rb := newRawBackend(t, func(n int64, c net.Conn, br *bufio.Reader) {
				if n == 1 {
					readReq(br)
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
				if req, _ := readReq(br); req != nil {
					received.Add(1)
					if n > 1 {
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain")
					}
				}
				// n == 1: read and worked on, then closed without a word
			})
			p := leanTestPool(rb.addr())
			defer p.closeAll()
			res, err := p.roundTrip(leanReq(t, context.Background(), tc.method, rb.addr(), ""))
			require.NoError(t, err)
			_, err = io.ReadAll(res.Body)
			require.NoError(t, err)

			body := ""
			if tc.method == http.MethodPost {
				body = "prompt"
			}
			req := leanReq(t, context.Background(), tc.method, rb.addr(), body)
			if tc.key != "" {
				req.Header.Set("Idempotency-Key", tc.key)
			}
			var resent []error
			res, err = p.roundTripNoting(req, func(err error) { resent = append(resent, err) })
			if !tc.resent {
				require.Error(t, err)
				assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
				assert.EqualValues(t, 1, received.Load(), "the backend got the request once")
				assert.EqualValues(t, 1, rb.accepted.Load(), "no second connection")
				assert.Empty(t, resent)
				return
			}
			require.NoError(t, err)
			got, err := io.ReadAll(res.Body)
			require.NoError(t, err)
			assert.Equal(t, "again", string(got))
			assert.EqualValues(t, 2, received.Load())
			assert.EqualValues(t, 2, rb.accepted.Load())
			require.Len(t, resent, 1)
			assert.ErrorIs(t, resent[0], io.ErrUnexpectedEOF)
		})
	}
}

// A backend that answers before it has read the whole request (a proxy's
// 413) and closes: the write fails, and the answer is the response, not a
// failure of the backend. The connection is not pooled (the request was
// not written whole) and nothing is sent again.
func TestLeanClientReturnsAnEarlyAnswer(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br) // the headers only
		io.WriteString(c, "HTTP/1.1 413 Request Entity Too Large\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbig")
		// closed with most of the body unread: a reset
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	req := leanReq(t, context.Background(), http.MethodPost, rb.addr(), strings.Repeat("x", 32<<20))
	res, err := p.roundTrip(req)
	require.NoError(t, err)
	assert.Equal(t, http.StatusRequestEntityTooLarge, res.StatusCode)
	got, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "big", string(got))
	assert.Zero(t, p.idleCount())
	assert.EqualValues(t, 1, rb.accepted.Load())
}

// A backend that stops reading the request and closes without an answer:
// the write's error stands, and a POST is not sent again.
func TestLeanClientWriteFailureWithoutAnAnswer(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br)
		c.(*net.TCPConn).SetLinger(0)
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	_, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), strings.Repeat("x", 32<<20)))
	require.Error(t, err)
	assert.True(t, staleConnError(err), "a broken connection: %v", err)
	assert.Zero(t, p.idleCount())
	assert.EqualValues(t, 1, rb.accepted.Load())
}

// A new connection that fails is the backend's failure: not retried.
func TestLeanClientDoesNotRetryAFreshConnection(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br) // and close without a word
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	_, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "x"))
	require.Error(t, err)
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.EqualValues(t, 1, rb.accepted.Load())
	assert.Zero(t, p.idleCount())
}

// Nor is a reused connection whose answer had begun: the backend got the
// request.
func TestLeanClientDoesNotRetryAfterTheAnswerBegan(t *testing.T) {
	rb := newRawBackend(t, func(n int64, c net.Conn, br *bufio.Reader) {
		if readReq(br); n > 1 {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		readReq(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Le") // and close
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "a"))
	require.NoError(t, err)
	_, err = io.ReadAll(res.Body)
	require.NoError(t, err)
	_, err = p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "b"))
	require.Error(t, err)
	assert.EqualValues(t, 1, rb.accepted.Load(), "no second connection")
}

// 1xx answers (100 Continue, 103 Early Hints) are skipped; the answer
// after them is the response.
func TestLeanClientSkipsInformationalAnswers(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"+
			"HTTP/1.1 201 Created\r\nX-A: b\r\nContent-Length: 4\r\n\r\ndone")
		readReq(br)
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "x"))
	require.NoError(t, err)
	assert.Equal(t, http.StatusCreated, res.StatusCode)
	assert.Equal(t, "b", res.Header.Get("X-A"))
	assert.Empty(t, res.Header.Get("Link"))
	got, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	assert.Equal(t, "done", string(got))
	assert.Equal(t, 1, p.idleCount())
}

// Connection: close, and an answer delimited by the close, end the
// connection; the next request dials a new one.
func TestLeanClientHonoursConnectionClose(t *testing.T) {
	for _, answer := range []string{
		"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\n\r\nok", // no length: until the close
		"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
	} {
		rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
			readReq(br)
			io.WriteString(c, answer)
		})
		p := leanTestPool(rb.addr())
		for range 2 {
			res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodGet, rb.addr(), ""))
			require.NoError(t, err, answer)
			got, err := io.ReadAll(res.Body)
			require.NoError(t, err, answer)
			assert.Equal(t, "ok", string(got))
			assert.True(t, res.Close)
			assert.Zero(t, p.idleCount(), answer)
		}
		assert.EqualValues(t, 2, rb.accepted.Load(), answer)
		p.closeAll()
	}
}

// A backend that never answers: the request's context ends the wait (the
// handler's first_byte_timeout, or the client gone) with the context's
// error, and the connection is closed.
func TestLeanClientCancelledWhileTheBackendSaysNothing(t *testing.T) {
	got := make(chan struct{})
	closed := make(chan struct{})
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		close(got)
		io.Copy(io.Discard, c) // returns when the client closes
		close(closed)
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	ctx, cancel := context.WithCancelCause(context.Background())
	go func() { <-got; cancel(errFirstByteTimeout) }()
	_, err := p.roundTrip(leanReq(t, ctx, http.MethodPost, rb.addr(), "x"))
	assert.ErrorIs(t, err, context.Canceled)
	<-closed // the backend saw its connection closed
	assert.Zero(t, p.idleCount())
}

// A client that leaves mid-answer: the body's read returns, the
// connection is closed, not pooled.
func TestLeanClientCancelledMidAnswer(t *testing.T) {
	closed := make(chan struct{})
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
		io.Copy(io.Discard, c)
		close(closed)
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	ctx, cancel := context.WithCancel(context.Background())
	res, err := p.roundTrip(leanReq(t, ctx, http.MethodPost, rb.addr(), "x"))
	require.NoError(t, err)
	buf := make([]byte, 16)
	n, err := res.Body.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "hi", string(buf[:n]))
	waited := make(chan error)
	go func() { _, err := res.Body.Read(nil); waited <- err }()
	cancel()
	assert.ErrorIs(t, <-waited, context.Canceled)
	<-closed
	_, err = res.Body.Read(buf)
	assert.ErrorIs(t, err, context.Canceled, "sticky")
	assert.NoError(t, res.Body.Close())
	assert.Zero(t, p.idleCount())
}

// The pool keeps at most maxIdle connections, and closes one that idles
// past the idle timeout.
func TestLeanPoolBoundsIdleConnections(t *testing.T) {
	var serving sync.WaitGroup
	release := make(chan struct{})
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		for first := true; ; first = false {
			if req, _ := readReq(br); req == nil {
				return
			}
			if first {
				serving.Done()
				<-release
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	n := leanMaxIdle + 3
	serving.Add(n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodGet, rb.addr(), ""))
			if err == nil {
				_, err = io.ReadAll(res.Body)
			}
			errs <- err
		}()
	}
	serving.Wait() // n connections at once
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	assert.EqualValues(t, n, rb.accepted.Load())
	assert.Equal(t, leanMaxIdle, p.idleCount(), "the rest were closed")

	// An idle connection's timer closes it (fired here rather than waited
	// for: the same function the timer runs).
	p.mu.Lock()
	c := p.idle[0]
	p.mu.Unlock()
	p.expire(c)
	assert.Equal(t, leanMaxIdle-1, p.idleCount())
	_, err := c.nc.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed)
	p.expire(c) // a timer that fires after the connection left the pool does nothing
	assert.Equal(t, leanMaxIdle-1, p.idleCount())
}

// The server's pool after Destruct: idle connections closed, and one that
// comes back later too.
func TestLeanPoolClosedWithItsServer(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		for {
			if req, _ := readReq(br); req == nil {
				return
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	p := leanTestPool(rb.addr())
	res1, err := p.roundTrip(leanReq(t, context.Background(), http.MethodGet, rb.addr(), ""))
	require.NoError(t, err)
	res2, err := p.roundTrip(leanReq(t, context.Background(), http.MethodGet, rb.addr(), ""))
	require.NoError(t, err)
	_, err = io.ReadAll(res1.Body)
	require.NoError(t, err)
	assert.Equal(t, 1, p.idleCount())
	p.closeAll()
	assert.Zero(t, p.idleCount())
	_, err = io.ReadAll(res2.Body)
	require.NoError(t, err)
	assert.Zero(t, p.idleCount(), "a connection back after the close is closed")
}

type refAnswer struct {
	status int
	body   []byte
}

// BenchmarkBackendStream compares the lean client with the Transport on
// what bench/run.sh's streaming chats do: a 16-token NDJSON stream per
// request, read the way the stream loop reads it (a zero-length wait, then
// a 4 KiB read). cpu-ns/op is the process's CPU time per request (the fake
// backend's included, the same for both), which a shared machine's load
// does not inflate as it does wall time.
//
//	go test -run '^$' -bench BenchmarkBackendStream -benchtime 3000x -count 3 .
func BenchmarkBackendStream(b *testing.B) {
	tok := []byte(`{"model":"tiny-llama","created_at":"2026-12-02T03:15:27.500975687Z","message":{"role":"assistant","content":"Hello"},"done":false}` + "\n")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		for range 16 {
			w.Write(tok)
			w.(http.Flusher).Flush()
		}
	}))
	defer srv.Close()
	body := []byte(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}]}`)
	run := func(b *testing.B, rt func(*http.Request) (*http.Response, error)) {
		b.SetParallelism(16) // 32 streams on 2 cores, as run.sh's c=32
		cpu0, ok := processCPU()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			buf := make([]byte, 4<<10)
			for pb.Next() {
				req, _ := http.NewRequest(http.MethodPost, srv.URL+"/api/chat", bytes.NewReader(body))
				res, err := rt(req)
				if err != nil {
					b.Error(err)
					return
				}
				for {
					if _, err = res.Body.Read(nil); err == nil {
						_, err = res.Body.Read(buf)
					}
					if err != nil {
						break
					}
				}
				res.Body.Close()
				if err != io.EOF {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		if cpu1, ok1 := processCPU(); ok && ok1 {
			b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
		}
	}
	b.Run("transport", func(b *testing.B) {
		tr := newTransport(func() time.Duration { return 5 * time.Second })
		defer tr.CloseIdleConnections()
		run(b, tr.RoundTrip)
	})
	b.Run("lean", func(b *testing.B) {
		p := leanTestPool(srv.Listener.Addr().String())
		defer p.closeAll()
		run(b, p.roundTrip)
	})
}

// A backend request's failure reaches the client (a 502's message, a
// fanned-out pull's progress) in words: the network's errors name the
// proxy's and the backend's internal addresses, which a client must not
// read. The error underneath stays for errors.Is.
func TestBackendFailuresInWordsNameNoAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedAddr := ln.Addr().String()
	ln.Close() // nothing listens there now: refused

	reset := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		c.(*net.TCPConn).SetLinger(0)
	})
	silent := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br) // and close
	})
	early := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br)
		c.(*net.TCPConn).SetLinger(0) // reset while the body is written
	})
	for _, tc := range []struct {
		name, addr, body, words string
		is                      error
	}{
		{"refused", closedAddr, "x", "the connection was refused", syscall.ECONNREFUSED},
		{"reset before an answer", reset.addr(), "x", "the connection was reset", syscall.ECONNRESET},
		{"closed before an answer", silent.addr(), "x", "the connection closed before an answer", io.ErrUnexpectedEOF},
		{"reset while writing", early.addr(), strings.Repeat("x", 32<<20), "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := leanTestPool(tc.addr)
			defer p.closeAll()
			_, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, tc.addr, tc.body))
			require.Error(t, err)
			if tc.is != io.ErrUnexpectedEOF {
				assert.Contains(t, err.Error(), "127.0.0.1", "the raw error names the addresses")
			}
			words := inWords(err)
			assert.NotContains(t, words.Error(), "127.0.0.1")
			assert.NotContains(t, failureInWords(err), "127.0.0.1")
			assert.Equal(t, failureInWords(err), words.Error())
			if tc.words != "" {
				assert.Equal(t, tc.words, words.Error())
			} else {
				assert.Contains(t, []string{"the connection was reset", "the connection broke"}, words.Error())
			}
			if tc.is != nil {
				assert.ErrorIs(t, words, tc.is)
			}
		})
	}
}
