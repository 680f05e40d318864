//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package ollamaflow

// canPeek: this platform's sockets are not watched; a waiting body waits
// in its buffered read instead, holding the buffer.
const canPeek = false

func (c *leanConn) waitReadable() error { return nil }

// idleUsable cannot look into the socket here: a pooled connection is
// taken on trust, and one the backend closed fails the request's write or
// first read (see roundTrip for what is sent again).
func (c *leanConn) idleUsable() bool { return true }
