//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package ollamaflow

import "syscall"

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
	// An error the peek saw (a reset) is the next read's to report.
	return c.raw.Read(c.peekFn)
}

// peekReadable reports whether the socket has something for a read: bytes,
// the backend's close, or an error.
func (c *leanConn) peekReadable(fd uintptr) bool {
	_, _, err := syscall.Recvfrom(int(fd), c.peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return err != syscall.EAGAIN && err != syscall.EWOULDBLOCK && err != syscall.EINTR
}
