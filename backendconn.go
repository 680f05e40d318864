package ollamaflow

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"
)

// The lean HTTP/1.1 client to plain-http backends.
//
// An open stream spends nearly all its life waiting for its next token,
// and with thousands open what each waiting stream holds is the proxy's
// memory. net/http's Transport keeps, for every backend connection, a read
// and a write goroutine (4 KiB of stack each, plus their descriptors), a
// persistConn with its channels, and a read and a write buffer for as long
// as the connection lives. Here the request's own goroutine writes the
// request and reads the answer from the connection; between requests a
// connection is a socket in the pool and a timer. Its read buffer is taken
// from a pool only while bytes wait in it: a body waiting for the next
// token waits for the socket to have bytes without reading them (see
// leanBody.Read), so an idle stream holds no buffer at all.
//
// What the Transport did for the proxied requests and still holds here:
// the same dialer (the server's dial timeout, TCP keep-alive 30 s), no
// environment proxy, no transparent decompression, keep-alive connections
// kept per server (at most leanMaxIdle idle, closed after leanIdleTimeout),
// a pooled connection checked before it is reused (one non-blocking peek:
// one the backend closed, or sent bytes on, is closed, never written to nor
// read as the next answer), a request sent once more on a fresh connection
// only by net/http's rules (see roundTrip), 1xx answers skipped, Connection: close honoured, the answer's headers bound
// to Go's default size, and the request's context closing the connection
// (a client gone, a timeout) so it is never pooled again. HTTPS backends
// keep the Transport (TLS, HTTP/2), and so do the probes and the model
// lists, which are few.
const (
	leanMaxIdle        = 256 // idle connections kept per server, as the Transport's MaxIdleConnsPerHost
	leanIdleTimeout    = 90 * time.Second
	leanMaxHeaderBytes = 10 << 20 // net/http's default MaxResponseHeaderBytes, which the Transport used
	leanReadBuffer     = 4 << 10  // the Transport's ReadBufferSize; also bounds a chunk-size line
	leanMaxTrailers    = 64       // trailer lines read (each within leanReadBuffer) before giving up
	// leanEarlyAnswerWait is how long a request whose write failed waits
	// for an answer the backend sent before it stopped reading (see do).
	leanEarlyAnswerWait = time.Second
)

var (
	leanReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, leanReadBuffer) }}
	// A request is written through a pooled writer and flushed at once;
	// http.Request.Write would allocate a 4 KiB one per request otherwise.
	leanWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}

	errLeanHeaderTooLarge = fmt.Errorf("backend response headers exceeded %d bytes", leanMaxHeaderBytes)
	errLeanChunkLine      = errors.New("malformed chunked encoding: bad chunk size or trailer line")
	errLeanChunkCRLF      = errors.New("malformed chunked encoding: chunk data not followed by CRLF")
	errLeanTrailers       = errors.New("malformed chunked encoding: trailer too large")
	errLeanBodyClosed     = errors.New("read on closed response body")
	errLeanSwitching      = errors.New("backend switched protocols unasked (101)")
)

// leanPool is one server's keep-alive connections.
type leanPool struct {
	addr string
	dial func(ctx context.Context, addr string) (net.Conn, error)

	mu     sync.Mutex
	idle   []*leanConn // most recently used last
	closed bool
}

func newLeanPool(addr string, dialTimeout func() time.Duration) *leanPool {
	return &leanPool{addr: addr, dial: func(ctx context.Context, addr string) (net.Conn, error) {
		d := net.Dialer{Timeout: dialTimeout(), KeepAlive: 30 * time.Second}
		return d.DialContext(ctx, "tcp", addr)
	}}
}

// leanConn is one connection to the backend; one request uses it at a time.
type leanConn struct {
	pool *leanPool
	nc   net.Conn
	br   *bufio.Reader // pooled; held only while bytes wait in it
	src  leanSource    // what br reads from

	raw      syscall.RawConn // nc's, to wait for bytes without reading them; nil: cannot
	peek     [1]byte         // where that wait peeks
	peekFn   func(fd uintptr) bool
	peekErr  error // what a peek took from the socket (a reset): the next read's error
	checkFn  func(fd uintptr) bool
	idleOK   bool  // the last idleUsable peek found the socket empty and open
	limit    int64 // bytes the headers may still take; <0: no limit
	got      int64 // bytes of the current answer read from nc
	wrote    int64 // bytes of the current request written to nc
	writeErr error // the socket's error writing the current request
	reused   bool  // it served a request before this one
	idleT    *time.Timer
}

// leanSource feeds br from the socket, counting the bytes and bounding
// the headers.
type leanSource struct{ c *leanConn }

func (s leanSource) Read(p []byte) (int, error) {
	c := s.c
	if err := c.peekErr; err != nil {
		c.peekErr = nil
		return 0, err
	}
	if c.limit >= 0 {
		if c.limit == 0 {
			return 0, errLeanHeaderTooLarge
		}
		if int64(len(p)) > c.limit {
			p = p[:c.limit]
		}
	}
	n, err := c.nc.Read(p)
	c.got += int64(n)
	if c.limit >= 0 {
		c.limit -= int64(n)
	}
	return n, err
}

// leanSink writes to the socket, counting the bytes (a request of which
// nothing was written may go again on another connection) and keeping the
// socket's error: Request.Write reports a failed write of the body as an
// unexported error that hides it.
type leanSink struct{ c *leanConn }

func (s leanSink) Write(p []byte) (int, error) {
	n, err := s.c.nc.Write(p)
	s.c.wrote += int64(n)
	if err != nil && s.c.writeErr == nil {
		s.c.writeErr = err
	}
	return n, err
}

// takeBuffer gives the connection a read buffer if it has none.
func (c *leanConn) takeBuffer() *bufio.Reader {
	if c.br == nil {
		c.br = leanReaders.Get().(*bufio.Reader)
		c.br.Reset(c.src)
	}
	return c.br
}

// dropBuffer returns the read buffer to its pool once nothing waits in it.
func (c *leanConn) dropBuffer() {
	if c.br == nil || c.br.Buffered() > 0 {
		return
	}
	c.br.Reset(nil)
	leanReaders.Put(c.br)
	c.br = nil
}

// close closes the socket for good and gives back the buffer, whatever it
// holds.
func (c *leanConn) close() {
	c.nc.Close()
	if c.br != nil {
		c.br.Reset(nil)
		leanReaders.Put(c.br)
		c.br = nil
	}
}

// roundTrip sends req (plain http, HTTP/1.1) and returns the answer's
// headers; its body reads from the connection, which goes back to the pool
// when the body has been read to its end.
func (p *leanPool) roundTrip(req *http.Request) (*http.Response, error) {
	return p.roundTripNoting(req, nil)
}

// roundTripNoting is roundTrip telling resent, when set, of a request sent
// once more on a fresh connection, and why.
func (p *leanPool) roundTripNoting(req *http.Request, resent func(error)) (*http.Response, error) {
	ctx := req.Context()
	for fresh := false; ; fresh = true {
		c, err := p.get(ctx, fresh)
		if err != nil {
			return nil, err
		}
		res, err := c.do(req)
		if err == nil {
			return res, nil
		}
		if !mayResend(req, c, fresh, err) {
			return nil, err
		}
		if req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return nil, err
			}
			body, gerr := req.GetBody()
			if gerr != nil {
				return nil, err
			}
			again := *req
			again.Body = body
			req = &again
		}
		if resent != nil {
			resent(err)
		}
	}
}

// mayResend reports whether a request that failed on c, before any byte
// of an answer, may go once more on a fresh connection: net/http's
// Transport's rules (shouldRetryRequest). Never after a fresh connection
// failed (the backend refuses the request itself), nor once the request
// was cancelled. A request of which nothing was written never reached the
// backend; one written whole or in part may have been read and worked on
// (an inference run), and goes again only if it is replayable: GET, HEAD,
// OPTIONS, TRACE, or marked with an Idempotency-Key. A connection the
// backend closed while it idled in the pool is caught before the write
// (idleUsable), so a POST meets this only when the close crosses it.
func mayResend(req *http.Request, c *leanConn, fresh bool, err error) bool {
	if fresh || !c.reused || c.got > 0 || req.Context().Err() != nil || !staleConnError(err) {
		return false
	}
	return c.wrote == 0 || replayable(req)
}

// replayable is net/http's Request.isReplayable: a request that means the
// same when it arrives twice, with a body that can be had again.
func replayable(req *http.Request) bool {
	if req.Body != nil && req.Body != http.NoBody && req.GetBody == nil {
		return false
	}
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, key := req.Header["Idempotency-Key"]
	_, xkey := req.Header["X-Idempotency-Key"]
	return key || xkey
}

// staleConnError tells the failures of a connection the backend closed.
func staleConnError(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED)
}

// get returns an idle connection, or a new one when fresh or none idles.
func (p *leanPool) get(ctx context.Context, fresh bool) (*leanConn, error) {
	for !fresh {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			break
		}
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		c.idleT.Stop()
		if !c.idleUsable() {
			// The backend closed it, reset it, or sent bytes nobody
			// asked for (more than its last answer): never a request
			// written to it, never those bytes read as an answer.
			c.close()
			continue
		}
		c.reused = true
		return c, nil
	}
	nc, err := p.dial(ctx, p.addr)
	if err != nil {
		return nil, err
	}
	c := &leanConn{pool: p, nc: nc, limit: -1}
	c.src = leanSource{c}
	if sc, ok := nc.(syscall.Conn); ok && canPeek {
		c.raw, _ = sc.SyscallConn()
	}
	return c, nil
}

// put pools a connection whose answer was read to its end.
func (p *leanPool) put(c *leanConn) {
	p.mu.Lock()
	if p.closed || len(p.idle) >= leanMaxIdle {
		p.mu.Unlock()
		c.close()
		return
	}
	p.idle = append(p.idle, c)
	if c.idleT == nil {
		c.idleT = time.AfterFunc(leanIdleTimeout, func() { p.expire(c) })
	} else {
		c.idleT.Reset(leanIdleTimeout)
	}
	p.mu.Unlock()
}

// expire closes c if it still idles in the pool.
func (p *leanPool) expire(c *leanConn) {
	p.mu.Lock()
	for i, ic := range p.idle {
		if ic == c {
			p.idle = append(p.idle[:i], p.idle[i+1:]...)
			p.mu.Unlock()
			c.close()
			return
		}
	}
	p.mu.Unlock()
}

// closeAll closes the idle connections, and those that come back later:
// the server is gone.
func (p *leanPool) closeAll() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = nil, true
	p.mu.Unlock()
	for _, c := range idle {
		c.idleT.Stop()
		c.close()
	}
}

// idleCount is the number of pooled connections.
func (p *leanPool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// do writes req on c and reads the answer's headers. On an error c is
// closed.
func (c *leanConn) do(req *http.Request) (res *http.Response, err error) {
	ctx := req.Context()
	// The context closes the socket: a read or write blocked on it returns
	// at once, and the connection is never pooled again.
	stop := context.AfterFunc(ctx, func() { c.nc.Close() })
	defer func() {
		if err != nil {
			stop()
			c.close()
			if cerr := ctx.Err(); cerr != nil {
				err = cerr
			}
		}
	}()
	c.got, c.wrote, c.writeErr = 0, 0, nil
	bw := leanWriters.Get().(*bufio.Writer)
	bw.Reset(leanSink{c})
	err = req.Write(bw)
	if err == nil {
		err = bw.Flush()
	}
	bw.Reset(nil)
	leanWriters.Put(bw)
	early := false
	if c.writeErr != nil {
		err = c.writeErr
	}
	if err != nil {
		if c.wrote == 0 || ctx.Err() != nil {
			return nil, err
		}
		// The backend stopped reading the request: it may have answered
		// before it had all of it (a proxy's 413, a 400) and closed. That
		// answer, already on its way or in the socket, is the response,
		// not a failure of the backend; a backend that just died has
		// none, and the write's error stands.
		c.nc.SetReadDeadline(time.Now().Add(leanEarlyAnswerWait))
		var rerr error
		if res, rerr = c.readHeaders(req); rerr != nil {
			return nil, err
		}
		c.nc.SetReadDeadline(time.Time{})
		err, early = nil, true
	} else if res, err = c.readHeaders(req); err != nil {
		return nil, err
	}

	// After an early answer the connection is spent: the request was not
	// written whole.
	b := &leanBody{c: c, stop: stop, ctx: ctx, keep: !res.Close && !req.Close && !early}
	switch {
	case res.Body == http.NoBody || res.ContentLength == 0:
		b.mode = leanLength // HEAD, 204, 304, or an empty body
	case len(res.TransferEncoding) > 0 && res.TransferEncoding[0] == "chunked":
		b.mode = leanChunked
	case res.ContentLength > 0:
		b.mode, b.left = leanLength, res.ContentLength
	default:
		// No length: the answer ends when the backend closes.
		b.mode, b.keep = leanUntilClose, false
		res.Close = true
	}
	res.Body = b
	if b.mode == leanLength && b.left == 0 {
		b.finish()
	} else {
		c.dropBuffer()
	}
	return res, nil
}

// readHeaders reads the answer's status line and headers, skipping 1xx
// answers (100 Continue, 103 Early Hints: informational, no body; the
// answer follows).
func (c *leanConn) readHeaders(req *http.Request) (*http.Response, error) {
	c.limit = leanMaxHeaderBytes
	defer func() { c.limit = -1 }()
	for {
		res, err := http.ReadResponse(c.takeBuffer(), req)
		if err != nil {
			return nil, err
		}
		if res.StatusCode >= 200 {
			return res, nil
		}
		if res.StatusCode == http.StatusSwitchingProtocols {
			return nil, errLeanSwitching
		}
	}
}
