package ollamaflow

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blobSource produces an upload of size bytes on demand and counts what it
// has produced, so a test can see how far ahead of the backends the proxy
// has read.
type blobSource struct {
	size, produced int64
}

func (b *blobSource) Read(p []byte) (int, error) {
	left := b.size - atomic.LoadInt64(&b.produced)
	if left <= 0 {
		return 0, io.EOF
	}
	n := int64(len(p))
	if n > left {
		n = left
	}
	for i := range p[:n] {
		p[i] = byte(i)
	}
	atomic.AddInt64(&b.produced, n)
	return int(n), nil
}

// slowBlobStore is a RoundTripper standing in for backends that read a blob
// upload slowly. On every read it records how far the client's upload is
// ahead of what this backend has received: what the proxy holds in between.
type slowBlobStore struct {
	src      *blobSource
	mu       sync.Mutex
	maxAhead int64
	received map[string]int64
	fail     string // host that fails after its first read
}

func (s *slowBlobStore) RoundTrip(r *http.Request) (*http.Response, error) {
	buf := make([]byte, 8<<10)
	var got int64
	for {
		n, err := r.Body.Read(buf)
		got += int64(n)
		ahead := atomic.LoadInt64(&s.src.produced) - got
		s.mu.Lock()
		s.maxAhead = max(s.maxAhead, ahead)
		s.mu.Unlock()
		if r.URL.Host == s.fail && got > 0 {
			r.Body.Close()
			// What a reset looks like from a socket: with addresses.
			return nil, &net.OpError{Op: "write", Net: "tcp", Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 0, 7), Port: 11434},
				Err: os.NewSyscallError("write", syscall.ECONNRESET)}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.received[r.URL.Host] = got
	s.mu.Unlock()
	return &http.Response{StatusCode: http.StatusCreated, Body: http.NoBody, Header: http.Header{}, Request: r}, nil
}

func TestBlobUploadStreamsToEveryBackend(t *testing.T) {
	const size = 10 << 20
	src := &blobSource{size: size}
	store := &slowBlobStore{src: src, received: map[string]int64{}}
	h := &Handler{transport: store}
	cands := []*backend{testBackend("a", nil), testBackend("b", nil), testBackend("c", nil)}

	req := httptest.NewRequest(http.MethodPost, "/api/blobs/sha256:abc", src)
	req.ContentLength = size
	rec := httptest.NewRecorder()
	require.NoError(t, h.serveBlob(rec, req, apiOllama, cands))

	assert.Equal(t, http.StatusCreated, rec.Code, rec.Body.String())
	assert.Equal(t, map[string]int64{"a:11434": size, "b:11434": size, "c:11434": size}, store.received)
	// The proxy reads the upload in 32 KiB pieces and hands each to every
	// backend before reading the next: it never holds the blob.
	assert.LessOrEqual(t, store.maxAhead, int64(64<<10), "the proxy read %d bytes ahead of a backend", store.maxAhead)
}

func TestBlobUploadSurvivesOneBackendFailing(t *testing.T) {
	const size = 1 << 20
	src := &blobSource{size: size}
	store := &slowBlobStore{src: src, received: map[string]int64{}, fail: "b:11434"}
	h := &Handler{transport: store}
	cands := []*backend{testBackend("a", nil), testBackend("b", nil), testBackend("c", nil)}

	req := httptest.NewRequest(http.MethodPost, "/api/blobs/sha256:abc", src)
	req.ContentLength = size
	rec := httptest.NewRecorder()
	require.NoError(t, h.serveBlob(rec, req, apiOllama, cands))

	assert.Equal(t, http.StatusBadGateway, rec.Code)
	assert.Contains(t, rec.Body.String(), "b (the connection was reset)")
	assert.NotContains(t, rec.Body.String(), "10.0.0.7", "no internal address reaches the client")
	assert.EqualValues(t, size, store.received["a:11434"], "the others still got the whole blob")
	assert.EqualValues(t, size, store.received["c:11434"])
}

func TestBlobHeadNeedsEveryBackend(t *testing.T) {
	have := map[string]bool{"a:11434": true, "b:11434": false}
	h := &Handler{transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		status := http.StatusNotFound
		if have[r.URL.Host] {
			status = http.StatusOK
		}
		return &http.Response{StatusCode: status, Body: http.NoBody, Header: http.Header{}, Request: r}, nil
	})}
	cands := []*backend{testBackend("a", nil), testBackend("b", nil)}
	rec := httptest.NewRecorder()
	require.NoError(t, h.serveBlob(rec, httptest.NewRequest(http.MethodHead, "/api/blobs/sha256:abc", nil), apiOllama, cands))
	assert.Equal(t, http.StatusNotFound, rec.Code, "b lacks it, so the client must upload")
	have["b:11434"] = true
	rec = httptest.NewRecorder()
	require.NoError(t, h.serveBlob(rec, httptest.NewRequest(http.MethodHead, "/api/blobs/sha256:abc", nil), apiOllama, cands))
	assert.Equal(t, http.StatusOK, rec.Code)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestOwnerOf(t *testing.T) {
	assert.Equal(t, "library", ownerOf("llama3:latest"))
	assert.Equal(t, "jmorgan", ownerOf("jmorgan/tiny:q4"))
	assert.Equal(t, "library", ownerOf("registry.internal:5000/library/tiny:latest"))
	assert.Equal(t, "library", ownerOf("registry.internal:5000"))
}
