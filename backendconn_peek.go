//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package ollamaflow

import (
	"os"
	"syscall"
)

// canPeek: the socket can be watched for bytes without reading them.
const canPeek = true

// waitReadable blocks until bytes (or the backend's close, or an error)
// wait in the socket, without taking them and without a buffer: a peek
// at one byte, which the runtime's poller repeats each time the socket
// becomes readable. The connection's deadline and its Close (the
// request's context) end the wait with an error.
func (c *leanConn) waitReadable() error {
	if c.raw == nil {
		return nil
	}
	if c.peekFn == nil {
		c.peekFn = c.peekReadable // made once: a closure per wait would be an allocation per token
	}
	return c.raw.Read(c.peekFn)
}

// peekReadable reports whether the socket has something for a read: bytes,
// the backend's close, or an error. An error (a reset) is taken from the
// socket by the peek itself, and a read after it would see a clean end: it
// is kept for the next read to report (see leanSource.Read).
func (c *leanConn) peekReadable(fd uintptr) bool {
	for {
		_, _, err := syscall.Recvfrom(int(fd), c.peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
			return false
		case err != nil:
			c.peekErr = os.NewSyscallError("recvfrom", err)
		}
		return true
	}
}

// idleUsable reports whether a pooled connection may carry a request: the
// socket holds nothing, neither bytes (the backend sent more than its last
// answer, which must not pass for the next one), nor its close, nor an
// error. One non-blocking peek, which never waits.
func (c *leanConn) idleUsable() bool {
	if c.raw == nil {
		return true
	}
	if c.checkFn == nil {
		c.checkFn = c.peekIdle
	}
	c.idleOK = false
	return c.raw.Read(c.checkFn) == nil && c.idleOK
}

func (c *leanConn) peekIdle(fd uintptr) bool {
	for {
		_, _, err := syscall.Recvfrom(int(fd), c.peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err == syscall.EINTR {
			continue
		}
		c.idleOK = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
		return true // done either way: this check never waits
	}
}
