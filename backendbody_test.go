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
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A body waiting for the backend's next bytes is cut by a reset: the reset
// is the read's error, not a clean end (the peek that watched the socket
// took the error from it, and must not pass a cut answer off as whole).
func TestLeanBodyReportsAResetSeenWhileWaiting(t *testing.T) {
	gotPart := make(chan struct{})
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart") // until the close
		<-gotPart
		c.(*net.TCPConn).SetLinger(0) // the close resets
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodGet, rb.addr(), ""))
	require.NoError(t, err)
	buf := make([]byte, 64)
	_, err = res.Body.Read(nil)
	require.NoError(t, err)
	n, err := res.Body.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "part", string(buf[:n]))
	close(gotPart)
	_, err = res.Body.Read(nil) // waits for the reset, and keeps it
	if err == nil {
		_, err = res.Body.Read(buf)
	}
	assert.ErrorIs(t, err, syscall.ECONNRESET)
	_, again := res.Body.Read(buf)
	assert.Equal(t, err, again, "the error sticks")
}

// An answer to HEAD, a 204 and a 304 have no body whatever their headers
// say; the connection is pooled at once.
func TestLeanClientAnswersWithoutABody(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		for {
			req, _ := readReq(br)
			if req == nil {
				return
			}
			switch req.Method {
			case http.MethodHead:
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
			case http.MethodGet:
				io.WriteString(c, "HTTP/1.1 204 No Content\r\n\r\n")
			default:
				io.WriteString(c, "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n")
			}
		}
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	for _, m := range []string{http.MethodHead, http.MethodGet, http.MethodPost} {
		res, err := p.roundTrip(leanReq(t, context.Background(), m, rb.addr(), ""))
		require.NoError(t, err, m)
		assert.Equal(t, 1, p.idleCount(), "pooled before the body is read: %s", m)
		got, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		assert.Empty(t, got)
	}
	assert.EqualValues(t, 1, rb.accepted.Load())
}

// Hostile backends: oversized headers, malformed chunk sizes, an early
// close mid-chunk. Each is an error, never a panic or a hang, and the
// connection is never pooled.
func TestLeanClientRefusesHostileAnswers(t *testing.T) {
	huge := "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", leanMaxHeaderBytes) + "\r\nContent-Length: 2\r\n\r\nok"
	cases := []struct {
		name, answer string
		headerErr    bool // fails before the headers are returned
		want         error
	}{
		{"oversized headers", huge, true, errLeanHeaderTooLarge},
		{"not http", "SSH-2.0-OpenSSH\r\n\r\n", true, nil},
		{"bad status", "HTTP/1.1 2000 OK\r\n\r\n", true, nil},
		{"conflicting lengths", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", true, nil},
		{"non-hex chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"empty chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"chunk size overflows", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"negative chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"chunk size line too long", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;" + strings.Repeat("x", 8000) + "\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"bare LF after a chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"stray CR in a chunk extension", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a\rb\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"CR CR LF after a chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\r\nhi\r\n0\r\n\r\n", false, errLeanChunkLine},
		{"bare LF after the last chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\n\r\n", false, errLeanChunkLine},
		{"bare LF ending a trailer", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\n\r\n", false, errLeanTrailers},
		{"bare LF ending the trailers", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\n", false, errLeanTrailers},
		{"no CRLF after chunk data", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n", false, errLeanChunkCRLF},
		{"endless trailers", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n" + strings.Repeat("X-T: 1\r\n", 100) + "\r\n", false, errLeanTrailers},
		{"close mid-chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhi", false, io.ErrUnexpectedEOF},
		{"close mid-chunk-size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1", false, io.ErrUnexpectedEOF},
		{"close before the last chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n", false, io.ErrUnexpectedEOF},
		{"close mid-length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhi", false, io.ErrUnexpectedEOF},
		{"close mid-headers", "HTTP/1.1 200 OK\r\nContent-Le", true, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
				readReq(br)
				io.WriteString(c, tc.answer)
				c.(*net.TCPConn).CloseWrite()
				io.Copy(io.Discard, c) // until the client closes
			})
			p := leanTestPool(rb.addr())
			defer p.closeAll()
			res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "x"))
			if !tc.headerErr {
				require.NoError(t, err)
				_, err = io.ReadAll(res.Body)
			}
			require.Error(t, err)
			if tc.want != nil {
				assert.ErrorIs(t, err, tc.want)
			}
			assert.Zero(t, p.idleCount(), "never pooled")
			assert.EqualValues(t, 1, rb.accepted.Load(), "not retried")
		})
	}
}

// A body closed before its end closes the connection: what is left of the
// answer would be read as the next one's.
func TestLeanClientBodyClosedEarlyIsNotPooled(t *testing.T) {
	rb := newRawBackend(t, func(_ int64, c net.Conn, br *bufio.Reader) {
		readReq(br)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
		io.Copy(io.Discard, c)
	})
	p := leanTestPool(rb.addr())
	defer p.closeAll()
	res, err := p.roundTrip(leanReq(t, context.Background(), http.MethodPost, rb.addr(), "x"))
	require.NoError(t, err)
	require.NoError(t, res.Body.Close())
	_, err = res.Body.Read(make([]byte, 4))
	assert.ErrorIs(t, err, errLeanBodyClosed)
	assert.Zero(t, p.idleCount())
}

// The lean client's chunked bodies let a stream wait without a buffer: a
// zero-length read returns only once the next token has arrived, and while
// it waits the connection holds no read buffer. The same stream loop as
// in production reads it (TestChunkedBodyWaitsWithoutABuffer is the
// Transport's counterpart).
func TestLeanBodyWaitsWithoutABuffer(t *testing.T) {
	for _, chunked := range []bool{true, false} {
		t.Run(fmt.Sprint("chunked=", chunked), func(t *testing.T) {
			var sent atomic.Int64
			release := make(chan struct{})
			tokens := make([]string, 4)
			for i := range tokens {
				tokens[i] = fmt.Sprintf(`{"message":{"content":"t%d"},"done":false}`+"\n", i)
			}
			backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/x-ndjson")
				if !chunked {
					w.Header().Set("Content-Length", fmt.Sprint(len(strings.Join(tokens, ""))))
				}
				for i, tok := range tokens {
					if i > 0 {
						<-release
					}
					sent.Add(1)
					io.WriteString(w, tok)
					w.(http.Flusher).Flush()
				}
			}))
			defer backend.Close()
			p := leanTestPool(backend.Listener.Addr().String())
			defer p.closeAll()
			out, err := http.NewRequest(http.MethodPost, backend.URL+"/api/chat", nil)
			require.NoError(t, err)
			res, err := p.roundTrip(out)
			require.NoError(t, err)
			lb := res.Body.(*leanBody)
			conn := lb.c
			probe := &waitProbe{ReadCloser: &bufferCheck{leanBody: lb, conn: conn}, sent: &sent, entered: make(chan struct{})}
			res.Body = probe

			rec := streamReleasingTokens(t, res, probe, release, 3)
			assert.Equal(t, strings.Join(tokens, ""), rec.Body.String(), "every token copied")
			// One wait per token, and with a chunked body perhaps one more for
			// its last chunk, sent after the last token.
			require.GreaterOrEqual(t, len(probe.waited), 4, "one wait per token")
			require.LessOrEqual(t, len(probe.waited), 5)
			for i, ahead := range probe.waited {
				if i < 4 {
					assert.Equal(t, int64(1), ahead, "wait %d returned with the next token sent", i)
				} else {
					assert.True(t, chunked)
					assert.Zero(t, ahead, "the last wait is for the end")
				}
			}
			bc := probe.ReadCloser.(*bufferCheck)
			assert.GreaterOrEqual(t, bc.waits, 3, "the waits for tokens 1-3 checked (token 0 may come with the headers)")
			assert.Zero(t, bc.heldWhileWaiting, "no wait held a read buffer")
			assert.Nil(t, conn.br, "the pooled connection holds no buffer")
			assert.Equal(t, 1, p.idleCount(), "the connection went back to the pool")
		})
	}
}

// bufferCheck counts the zero-length reads that began with a read buffer
// held by the connection.
type bufferCheck struct {
	*leanBody
	conn             *leanConn
	waits            int
	heldWhileWaiting int
}

func (b *bufferCheck) Read(p []byte) (int, error) {
	// A zero-length read with bytes already buffered returns at once: not
	// a wait.
	if len(p) == 0 && b.leanBody.c != nil && (b.conn.br == nil || b.conn.br.Buffered() == 0) {
		b.waits++
		if b.conn.br != nil {
			b.heldWhileWaiting++
		}
	}
	return b.leanBody.Read(p)
}

// fuzzConn is a connection whose answer is data; what is written to it is
// dropped.
type fuzzConn struct {
	net.Conn // nil: only what the client calls is implemented
	r        *bytes.Reader
	closed   bool
}

func (c *fuzzConn) Read(p []byte) (int, error) {
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.r.Read(p)
}

func (c *fuzzConn) Write(p []byte) (int, error) { return len(p), nil }

func (c *fuzzConn) Close() error { c.closed = true; return nil }

// FuzzLeanResponse feeds the lean client arbitrary answers: it must never
// panic or read past its input, and an answer net/http reads whole must
// read the same here (the status, and the body, read with the stream
// loop's mix of zero-length and small reads).
func FuzzLeanResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhi\r\n\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\nuntil close",
		"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabcdef",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA \t;x\n0123456789\n0\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, _ := http.NewRequest(http.MethodPost, "http://backend/api/chat", nil)
		p := &leanPool{}
		c := &leanConn{pool: p, nc: &fuzzConn{r: bytes.NewReader(data)}, limit: -1}
		c.src = leanSource{c}
		res, err := c.do(req)
		var body []byte
		if err == nil {
			buf := make([]byte, 7)
			for i := 0; ; i++ {
				var n int
				if i%2 == 0 {
					n, err = res.Body.Read(nil)
				} else {
					n, err = res.Body.Read(buf)
					body = append(body, buf[:n]...)
				}
				if err != nil {
					break
				}
				if i > 2*len(data)+10 {
					t.Fatalf("reads make no progress (last read %d bytes)", n)
				}
			}
			if err == io.EOF {
				err = nil
			}
			res.Body.Close()
		}
		if len(body) > len(data) {
			t.Fatalf("read %d body bytes from %d bytes of input", len(body), len(data))
		}
		// net/http's reading of the same bytes.
		ref, rerr := readWithNetHTTP(data, req)
		if err == nil && rerr == nil && !bytes.Equal(body, ref.body) {
			t.Fatalf("body %q, net/http read %q", body, ref.body)
		}
		if err == nil && rerr == nil && res.StatusCode != ref.status {
			t.Fatalf("status %d, net/http read %d", res.StatusCode, ref.status)
		}
	})
}

func readWithNetHTTP(data []byte, req *http.Request) (refAnswer, error) {
	br := bufio.NewReader(bytes.NewReader(data))
	for {
		res, err := http.ReadResponse(br, req)
		if err != nil {
			return refAnswer{}, err
		}
		if res.StatusCode >= 200 {
			body, err := io.ReadAll(res.Body)
			return refAnswer{res.StatusCode, body}, err
		}
		if res.StatusCode == http.StatusSwitchingProtocols {
			return refAnswer{}, errors.New("101")
		}
	}
}
