//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package ollamaflow

// canPeek: this platform's sockets are not watched; a waiting body waits
// in its buffered read instead, holding the buffer.
const canPeek = false

func (c *leanConn) waitReadable() error { return nil }
