package ollamaflow

import (
	"bufio"
	"bytes"
	"context"
	"io"
)

// A backend's answer body as the lean client reads it (backendconn.go):
// by length, chunked or until the connection closes, each read taking
// what has arrived without a buffer held between reads; the connection
// goes back to its pool when the body ends cleanly, and is closed when not.

const (
	leanLength = iota
	leanChunked
	leanUntilClose
)

// Chunked decoding states.
const (
	chunkHeader = iota
	chunkData
	chunkCRLF
	chunkTrailer
)

// leanBody is an answer's body, read from its connection.
type leanBody struct {
	c    *leanConn // nil once the body ended (pooled or closed)
	stop func() bool
	ctx  context.Context
	keep bool // the connection may serve another request after this body
	mode int
	left int64 // leanLength: bytes left; leanChunked: bytes left in the chunk
	st   int   // leanChunked: where in the encoding
	err  error // sticky: what every later Read returns
}

// Read reads the body. A zero-length read waits, holding no buffer, until
// the next bytes of the answer have arrived in the socket (the stream's
// copy loop waits that way, see Copy buffers in stream.go), leaving them
// there: the read that follows takes all that arrived in one go. Where
// the socket cannot be watched (see waitReadable) it returns at once, and
// the read that follows waits.
func (b *leanBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	c := b.c
	if len(p) == 0 {
		if c.br != nil && c.br.Buffered() > 0 {
			return 0, nil
		}
		if err := c.waitReadable(); err != nil {
			return 0, b.fail(err)
		}
		return 0, nil // what arrived (or the close) is for the next read
	}
	br := c.takeBuffer()
	var n int
	var err error
	switch b.mode {
	case leanLength:
		n, err = b.readLength(br, p)
	case leanChunked:
		n, err = b.readChunked(br, p)
	default:
		n, err = br.Read(p)
	}
	switch {
	case err == io.EOF:
		b.finish()
	case err != nil:
		err = b.fail(err)
	default:
		c.dropBuffer()
	}
	return n, err
}

func (b *leanBody) readLength(br *bufio.Reader, p []byte) (int, error) {
	if b.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := br.Read(p)
	b.left -= int64(n)
	if b.left == 0 {
		return n, io.EOF
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// readChunked decodes the chunked encoding (RFC 9112 §7.1). It goes on
// past a chunk's end only while the next step needs no more bytes from the
// socket, so one read takes every token that arrived and never waits for
// one that has not, with data in hand.
func (b *leanBody) readChunked(br *bufio.Reader, p []byte) (n int, err error) {
	for n < len(p) {
		switch b.st {
		case chunkHeader:
			if n > 0 && !lineBuffered(br) {
				return n, nil
			}
			size, err := readChunkSize(br)
			if err != nil {
				return n, err
			}
			if size == 0 {
				b.st = chunkTrailer
				continue
			}
			b.left, b.st = size, chunkData
		case chunkData:
			if n > 0 && br.Buffered() == 0 {
				return n, nil
			}
			q := p[n:]
			if int64(len(q)) > b.left {
				q = q[:b.left]
			}
			m, err := br.Read(q)
			n += m
			b.left -= int64(m)
			if b.left == 0 {
				b.st = chunkCRLF
			}
			if err != nil {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return n, err
			}
		case chunkCRLF:
			if n > 0 && br.Buffered() < 2 {
				return n, nil
			}
			if err := readCRLF(br); err != nil {
				return n, err
			}
			b.st = chunkHeader
		case chunkTrailer:
			if n > 0 {
				return n, nil // the data first; the end on the next read
			}
			if err := skipTrailers(br); err != nil {
				return n, err
			}
			return n, io.EOF
		}
	}
	return n, nil
}

// lineBuffered reports whether a whole line waits in br.
func lineBuffered(br *bufio.Reader) bool {
	buf, _ := br.Peek(br.Buffered())
	return bytes.IndexByte(buf, '\n') >= 0
}

func readCRLF(br *bufio.Reader) error {
	for _, want := range []byte{'\r', '\n'} {
		got, err := br.ReadByte()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if got != want {
			return errLeanChunkCRLF
		}
	}
	return nil
}

// readLine reads one line of the chunked framing, without its line end.
// A line longer than the read buffer is malformed, and so is one not ended
// by CRLF or with a CR elsewhere: RFC 9112 allows a bare LF in headers but
// not in the chunked framing, and a parser that took one where another
// (a proxy in front, the backend) does not would read a different body
// (request smuggling; Go rejects both since CVE-2025-22871).
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	switch {
	case err == bufio.ErrBufferFull:
		return nil, errLeanChunkLine
	case err == io.EOF:
		return nil, io.ErrUnexpectedEOF
	case err != nil:
		return nil, err
	}
	if n := len(line); n < 2 || bytes.IndexByte(line, '\r') != n-2 {
		return nil, errLeanChunkLine
	}
	return line[:len(line)-2], nil
}

// readChunkSize reads a chunk-size line: hex digits, optional whitespace
// and chunk extensions (ignored, as every client does).
func readChunkSize(br *bufio.Reader) (int64, error) {
	line, err := readLine(br)
	if err != nil {
		return 0, err
	}
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		line = line[:i]
	}
	line = bytes.TrimRight(line, " \t")
	return parseChunkSize(line)
}

func parseChunkSize(s []byte) (int64, error) {
	if len(s) == 0 || len(s) > 15 { // 15 hex digits stay below 1<<60
		return 0, errLeanChunkLine
	}
	var n int64
	for _, c := range s {
		v, ok := hexDigit(c)
		if !ok {
			return 0, errLeanChunkLine
		}
		n = n<<4 | int64(v)
	}
	return n, nil
}

// skipTrailers reads the trailer section up to its empty line. Nothing
// here reads trailers (Ollama sends none); they are bounded and dropped.
func skipTrailers(br *bufio.Reader) error {
	for range leanMaxTrailers {
		line, err := readLine(br)
		if err != nil {
			if err == errLeanChunkLine {
				err = errLeanTrailers
			}
			return err
		}
		if len(line) == 0 {
			return nil
		}
	}
	return errLeanTrailers
}

// finish ends a body read to its end: the connection goes back to the pool
// if it can serve another request, else it is closed.
func (b *leanBody) finish() {
	b.err = io.EOF
	c := b.c
	b.c = nil
	if !b.stop() || !b.keep || c.br != nil && c.br.Buffered() > 0 {
		// The context closed it, the backend said close, or it sent
		// more than its answer.
		c.close()
		return
	}
	c.dropBuffer()
	c.reused = true
	c.pool.put(c)
}

// fail ends a body whose read failed: the connection is closed. A read the
// context cut returns the context's error.
func (b *leanBody) fail(err error) error {
	b.stop()
	b.c.close()
	b.c = nil
	if cerr := b.ctx.Err(); cerr != nil {
		err = cerr
	}
	b.err = err
	return err
}

// Close ends the body; one not read to its end closes the connection.
func (b *leanBody) Close() error {
	if b.c != nil {
		b.stop()
		b.c.close()
		b.c = nil
		b.err = errLeanBodyClosed
	}
	return nil
}
