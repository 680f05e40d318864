package ollamaflow

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// readSizes is a body that hands out its chunks one per Read (as a
// backend's tokens arrive) and records the buffer each Read was given.
type readSizes struct {
	chunks [][]byte
	sizes  []int
}

func (r *readSizes) Read(p []byte) (int, error) {
	r.sizes = append(r.sizes, len(p))
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	if r.chunks[0] = r.chunks[0][n:]; len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func streamThrough(t *testing.T, body *readSizes, contentType string) []byte {
	t.Helper()
	h := &Handler{ClientWriteTimeout: caddy.Duration(time.Minute), StreamIdleTimeout: caddy.Duration(time.Minute)}
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/api/chat", nil)
	res := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {contentType}}, Body: io.NopCloser(body)}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	end := h.stream(rec, req, res, testBackend("a", nil), ctx, cancel, func() {}, &tailKeeper{})
	require.Equal(t, endComplete, end)
	return rec.Body.Bytes()
}

// A token stream is copied through the small buffer from first read to
// last, however long it runs: that buffer is what an open stream holds
// while it waits for its next token.
func TestStreamWaitsOnASmallBuffer(t *testing.T) {
	var want bytes.Buffer
	body := &readSizes{}
	for i := range 500 {
		line := []byte(fmt.Sprintf(`{"model":"tiny-llama","message":{"role":"assistant","content":"token %d "},"done":false}`+"\n", i))
		body.chunks = append(body.chunks, line)
		want.Write(line)
	}
	got := streamThrough(t, body, "application/x-ndjson")
	assert.Equal(t, want.Bytes(), got, "copied byte for byte")
	require.NotEmpty(t, body.sizes)
	for i, n := range body.sizes {
		require.Equal(t, smallCopyBuffer, n, "read %d of a token stream", i)
	}
}

// A read that fills the small buffer moves the rest of the answer to the
// large one: a bulk answer is copied in large writes.
func TestBulkAnswerMovesToTheLargeBuffer(t *testing.T) {
	doc := []byte(`{"embeddings":[[` + strings.Repeat("0.123456789,", 30000) + `0]]}`)
	body := &readSizes{chunks: [][]byte{append([]byte(nil), doc...)}}
	got := streamThrough(t, body, "application/json")
	assert.Equal(t, doc, got, "copied byte for byte")
	require.Greater(t, len(body.sizes), 2)
	assert.Equal(t, smallCopyBuffer, body.sizes[0], "every answer starts small")
	for i, n := range body.sizes[1:] {
		assert.Equal(t, largeCopyBuffer, n, "read %d after the small buffer filled", i+1)
	}
	assert.Less(t, len(body.sizes), len(doc)/smallCopyBuffer, "fewer reads than with the small buffer alone")
}
