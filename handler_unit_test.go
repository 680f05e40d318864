package ollamaflow

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestClassify(t *testing.T) {
	cases := []struct {
		method, path string
		kind         routeKind
		known, ok    bool
	}{
		{"GET", "/", kindRoot, true, true},
		{"HEAD", "/", kindRoot, true, true},
		{"POST", "/", kindRoot, true, false},
		{"POST", "/api/chat", kindCompletion, true, true},
		{"GET", "/api/chat", kindCompletion, true, false},
		{"POST", "/api/generate", kindCompletion, true, true},
		{"POST", "/v1/chat/completions", kindCompletion, true, true},
		{"POST", "/v1/completions", kindCompletion, true, true},
		{"POST", "/api/embed", kindEmbedding, true, true},
		{"POST", "/api/embeddings", kindEmbedding, true, true},
		{"POST", "/v1/embeddings", kindEmbedding, true, true},
		{"GET", "/api/tags", kindModelRead, true, true},
		{"GET", "/api/ps", kindModelRead, true, true},
		{"POST", "/api/show", kindModelRead, true, true},
		{"GET", "/v1/models", kindModelRead, true, true},
		{"GET", "/v1/models/llama3:8b", kindModelRead, true, true},
		{"GET", "/api/version", kindVersion, true, true},
		{"HEAD", "/api/version", kindVersion, true, true},
		{"HEAD", "/api/tags", kindModelRead, true, true},
		{"POST", "/api/tags", kindModelRead, true, false},
		{"POST", "/api/pull", kindManagement, true, true},
		{"DELETE", "/api/delete", kindManagement, true, true},
		{"POST", "/api/delete", kindManagement, true, false},
		{"POST", "/api/copy", kindManagement, true, true},
		{"POST", "/api/create", kindManagement, true, true},
		{"POST", "/api/push", kindManagement, true, true},
		{"HEAD", "/api/blobs/sha256:abc", kindManagement, true, true},
		{"POST", "/api/blobs/sha256:abc", kindManagement, true, true},
		{"GET", "/api/blobs/sha256:abc", kindManagement, true, false},
	}
	for _, c := range cases {
		rt, known, ok := classify(c.method, c.path)
		assert.Equal(t, c.known, known, "%s %s known", c.method, c.path)
		assert.Equal(t, c.ok, ok, "%s %s allowed", c.method, c.path)
		assert.Equal(t, c.kind, rt.kind, "%s %s kind", c.method, c.path)
	}
	for _, p := range []string{"/api", "/api/chat/", "/api/unknown", "/v1/models/", "/v1/models/a/b", "/api/blobs/", "/metrics"} {
		_, known, _ := classify("GET", p)
		assert.False(t, known, p)
	}
}

func TestRequestModel(t *testing.T) {
	m, _, err := requestModel(modelInBody, apiOllama, "/api/chat", []byte(` {"model":"Llama3","messages":[]}`), false)
	require.NoError(t, err)
	assert.Equal(t, "llama3:latest", m)
	for _, bad := range []string{``, `[]`, `"x"`, `{"model":`, `{"messages":[]}`, `{"model":""}`, `{"model":42}`, `{"model":"a"} trailing`, `{"name":"a"}`} {
		_, _, err := requestModel(modelInBody, apiOllama, "/api/chat", []byte(bad), false)
		assert.Error(t, err, bad)
	}
	m, _, err = requestModel(modelInBodyName, apiOllama, "/api/show", []byte(`{"name":"tiny"}`), false)
	require.NoError(t, err)
	assert.Equal(t, "tiny:latest", m, "Ollama's older name field")
	m, _, err = requestModel(modelInPath, apiOpenAI, "/v1/models/tiny:q4", nil, false)
	require.NoError(t, err)
	assert.Equal(t, "tiny:q4", m)
	m, _, err = requestModel(modelNone, apiOllama, "/api/tags", []byte("not json"), false)
	require.NoError(t, err)
	assert.Empty(t, m)
}

func TestErrorBodiesFollowTheAPI(t *testing.T) {
	h := &Handler{}
	rec := httptest.NewRecorder()
	require.NoError(t, h.fail(rec, apiOllama, 403, "model \"x\" is not allowed"))
	assert.Equal(t, 403, rec.Code)
	assert.JSONEq(t, `{"error":"model \"x\" is not allowed"}`, rec.Body.String())
	assert.Equal(t, "application/json; charset=utf-8", rec.Header().Get("Content-Type"))

	rec = httptest.NewRecorder()
	require.NoError(t, h.fail(rec, apiOpenAI, 429, "queue full"))
	var oa struct {
		Error struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    any    `json:"code"`
		} `json:"error"`
	}
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &oa))
	assert.Equal(t, "queue full", oa.Error.Message)
	assert.Equal(t, "rate_limit_error", oa.Error.Type)
}

func TestOutboundRequest(t *testing.T) {
	b := testBackend("gpu1", func(c *Backend) {
		c.BearerToken = "backend-secret"
		c.Headers = http.Header{"X-Api-Key": {"abc"}}
		c.Query = "token=xyz"
	})
	h := &Handler{labelHeader: defaultLabelHeader}
	r := httptest.NewRequest("POST", "http://llm.example.com/api/chat?x=1", strings.NewReader(`{}`))
	r.RemoteAddr = "192.0.2.7:5555"
	r.Header.Set("Authorization", "Bearer client-token")
	r.Header.Set("Connection", "keep-alive, X-Hop")
	r.Header.Set("X-Hop", "drop me")
	r.Header.Set("Keep-Alive", "timeout=5")
	r.Header.Set("X-Forwarded-For", "10.9.9.9") // untrusted peer: replaced
	r.Header.Set("X-OllamaFlow-Label", "gpu")
	r.Header.Set("Accept", "application/x-ndjson")

	out := h.outboundRequest(context.Background(), r, b, []byte(`{"model":"m"}`))
	assert.Equal(t, "http://gpu1:11434/api/chat?x=1&token=xyz", out.URL.String())
	assert.Equal(t, "gpu1:11434", out.Host)
	assert.Equal(t, "Bearer backend-secret", out.Header.Get("Authorization"))
	assert.Equal(t, "abc", out.Header.Get("X-Api-Key"))
	assert.Empty(t, out.Header.Get("Connection"))
	assert.Empty(t, out.Header.Get("X-Hop"))
	assert.Empty(t, out.Header.Get("Keep-Alive"))
	assert.Empty(t, out.Header.Get("X-OllamaFlow-Label"))
	assert.Equal(t, "application/x-ndjson", out.Header.Get("Accept"))
	assert.Equal(t, "192.0.2.7", out.Header.Get("X-Forwarded-For"))
	assert.Equal(t, "http", out.Header.Get("X-Forwarded-Proto"))
	assert.Equal(t, "llm.example.com", out.Header.Get("X-Forwarded-Host"))
	assert.EqualValues(t, 13, out.ContentLength)
	body, _ := io.ReadAll(out.Body)
	assert.Equal(t, `{"model":"m"}`, string(body))
	assert.Equal(t, "Bearer client-token", r.Header.Get("Authorization"), "the client's request is not modified")

	// Without a token of its own the backend still never sees the client's.
	plain := testBackend("plain", nil)
	out = h.outboundRequest(context.Background(), r, plain, nil)
	assert.Empty(t, out.Header.Get("Authorization"))
	assert.Equal(t, "http://plain:11434/api/chat?x=1", out.URL.String())
}

func TestParseBackendURL(t *testing.T) {
	cases := map[string]string{
		"10.0.0.6":                  "http://10.0.0.6:11434",
		"10.0.0.6:8080":             "http://10.0.0.6:8080",
		"http://GPU1.local:11434/":  "http://gpu1.local:11434",
		"https://ollama.example":    "https://ollama.example:443",
		"http://ollama.example":     "http://ollama.example:80",
		"http://[::1]:11434/ollama": "http://[::1]:11434/ollama",
	}
	for in, want := range cases {
		u, err := parseBackendURL(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, u.String(), in)
	}
	for _, bad := range []string{"", "ftp://x", "http://user:pw@x", "http://x/?token=1", "http://:11434", "x:99999"} {
		_, err := parseBackendURL(bad)
		assert.Error(t, err, bad)
	}
}

func TestDeepBodiesAreRefusedWithoutCrashing(t *testing.T) {
	// 20 million '[' would overflow gjson's recursive validator (a fatal,
	// unrecoverable error) if it ever saw them.
	deep := append([]byte(`{"model":"m","x":`), bytes.Repeat([]byte("["), 20<<20)...)
	_, _, err := requestModel(modelInBody, apiOllama, "/api/chat", deep, false)
	require.Error(t, err)
	ok := append([]byte(`{"model":"m","x":"`), bytes.Repeat([]byte("["), 20000)...)
	ok = append(ok, `"}`...)
	m, _, err := requestModel(modelInBody, apiOllama, "/api/chat", ok, false)
	require.NoError(t, err, "brackets inside strings do not count")
	assert.Equal(t, "m:latest", m)
	assert.True(t, nestingWithin([]byte(`{"a":[[["\"]]]"]]]}`), 4), "the object and three arrays")
	assert.False(t, nestingWithin([]byte(`{"a":[[[[1]]]]}`), 4))
}
