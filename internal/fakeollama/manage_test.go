package fakeollama_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func digestOf(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

func TestCopy(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama"}})

	resp, body := post(t, f.URL+"/api/copy", `{"source":"tiny-llama","destination":"team/llama:v2"}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Empty(t, body)
	assert.Equal(t, "0", resp.Header.Get("Content-Length"))
	assert.ElementsMatch(t, []string{"tiny-llama:latest", "team/llama:v2"}, f.Models())

	_, tags := do(t, http.MethodGet, f.URL+"/api/tags", "")
	var list struct {
		Models []struct{ Name, Digest string }
	}
	require.NoError(t, jsonUnmarshal(tags, &list))
	require.Len(t, list.Models, 2)
	assert.Equal(t, "team/llama:v2", list.Models[0].Name, "the newest first")
	assert.Equal(t, list.Models[0].Digest, list.Models[1].Digest, "a copy shares its source's manifest")

	for _, c := range []struct {
		body   string
		status int
		msg    string
	}{
		{`{"source":"nope","destination":"x"}`, 404, `{"error":"model \"nope\" not found"}`},
		{`{"source":"","destination":"x"}`, 400, `{"error":"source \"\" is invalid"}`},
		{`{"source":"tiny-llama","destination":"Bad Name!"}`, 400, `{"error":"destination \"Bad Name!\" is invalid"}`},
		{`{"source":"tiny-llama","destination":"a/b/c/d"}`, 400, `{"error":"destination \"a/b/c/d\" is invalid"}`},
		{``, 400, `{"error":"missing request body"}`},
	} {
		resp, body := post(t, f.URL+"/api/copy", c.body)
		assert.Equal(t, c.status, resp.StatusCode, c.body)
		assert.Equal(t, c.msg, body)
		assert.Equal(t, "application/json; charset=utf-8", resp.Header.Get("Content-Type"))
	}
}

func TestBlobs(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{})
	content := "GGUF and then some weights"
	d := digestOf(content)

	resp, _ := do(t, http.MethodHead, f.URL+"/api/blobs/"+d, "")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	resp, body := post(t, f.URL+"/api/blobs/"+d, content)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Empty(t, body)
	resp, _ = do(t, http.MethodHead, f.URL+"/api/blobs/"+d, "")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	resp, _ = do(t, http.MethodHead, f.URL+"/api/blobs/"+strings.Replace(d, ":", "-", 1), "")
	assert.Equal(t, http.StatusOK, resp.StatusCode, "Ollama's file name form finds it too")
	resp, _ = post(t, f.URL+"/api/blobs/"+d, content)
	assert.Equal(t, http.StatusOK, resp.StatusCode, "a blob it has: 200, not 201")
	assert.Contains(t, f.Blobs(), d)

	zero := "sha256:" + strings.Repeat("0", 64)
	resp, body = post(t, f.URL+"/api/blobs/"+zero, content)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, `{"error":"digest mismatch, expected \"`+zero+`\", got \"`+d+`\""}`, body)
	assert.NotContains(t, f.Blobs(), zero)
	resp, body = post(t, f.URL+"/api/blobs/xyz", content)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, `{"error":"invalid digest format"}`, body)
	resp, _ = do(t, http.MethodGet, f.URL+"/api/blobs/"+d, "")
	assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	assert.Equal(t, "HEAD, POST", resp.Header.Get("Allow"))
	resp, _ = post(t, f.URL+"/api/blobs/", content)
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	// A large upload streams through the digest.
	big := strings.Repeat("x", 8<<20)
	resp, _ = post(t, f.URL+"/api/blobs/"+digestOf(big), big)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	last, _ := f.LastRequest()
	assert.Nil(t, last.Body, "blob bodies are not kept")
}

func TestCreate(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama"}})

	// From a model: its layers, a new one for the system prompt, then success.
	resp, body := post(t, f.URL+"/api/create", `{"model":"brief","from":"tiny-llama","system":"be brief"}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	var statuses []string
	for _, l := range lines(t, body) {
		statuses = append(statuses, l["status"].(string))
	}
	require.Len(t, statuses, 6, body)
	for i, want := range []string{"using existing layer sha256:", "using existing layer sha256:", "creating new layer sha256:", "using existing layer sha256:", "writing manifest", "success"} {
		assert.True(t, strings.HasPrefix(statuses[i], want), "%d: %s", i, statuses[i])
	}
	assert.Contains(t, f.Models(), "brief:latest")
	resp, body = post(t, f.URL+"/api/create", `{"model":"brief2","from":"tiny-llama","system":"be brief"}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.NotContains(t, body, "creating new layer", "the same system prompt is an existing blob")

	// Not streamed: the last progress.
	resp, body = post(t, f.URL+"/api/create", `{"model":"quiet","from":"brief","stream":false}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, `{"status":"success"}`, body)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))

	// From a model it lacks: Ollama pulls it first.
	_, body = post(t, f.URL+"/api/create", `{"model":"mine","from":"llama3.2:1b"}`)
	ls := lines(t, body)
	assert.Equal(t, "pulling manifest", ls[0]["status"])
	assert.Equal(t, "success", ls[len(ls)-1]["status"])
	assert.Contains(t, f.Models(), "llama3.2:1b")
	assert.Contains(t, f.Models(), "mine:latest")
	f.FailPulls("pull model manifest: file does not exist")
	_, body = post(t, f.URL+"/api/create", `{"model":"mine2","from":"nope"}`)
	assert.Equal(t, `{"status":"pulling manifest"}`+"\n"+`{"error":"pull model manifest: file does not exist"}`+"\n", body)
	f.ClearFaults()

	// From files: uploaded GGUF blobs.
	gguf := "GGUF\x03\x00\x00\x00 weights"
	d := digestOf(gguf)
	resp, _ = post(t, f.URL+"/api/blobs/"+d, gguf)
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	resp, body = post(t, f.URL+"/api/create", `{"model":"from-file","files":{"model.gguf":"`+d+`"}}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, `{"status":"parsing GGUF"}`+"\n"+`{"status":"using existing layer `+d+`"}`+"\n"+`{"status":"writing manifest"}`+"\n"+`{"status":"success"}`+"\n", body)
	assert.Contains(t, f.Models(), "from-file:latest")
	_, tags := do(t, http.MethodGet, f.URL+"/api/tags", "")
	assert.Contains(t, tags, `"name":"from-file:latest"`, "the new model is listed")
	resp, _ = post(t, f.URL+"/api/create", `{"model":"from-file2","files":{"model":"`+d+`"}}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode, "a GGUF is recognised by its magic without the extension")

	text := "not a model"
	resp, _ = post(t, f.URL+"/api/blobs/"+digestOf(text), text)
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	missing := "sha256:" + strings.Repeat("5", 64)
	for _, c := range []struct {
		body, status, ct, want string
	}{
		{`{"model":"x"}`, "400", "application/json", `{"error":"neither 'from' or 'files' was specified"}`},
		{`{"model":"x","stream":false}`, "400", "application/json", `{"error":"neither 'from' or 'files' was specified"}`},
		{`{"from":"tiny-llama"}`, "400", "application/json; charset=utf-8", `{"error":"invalid model name"}`},
		{`{"model":"x","files":{"../m.gguf":"` + d + `"}}`, "400", "application/json; charset=utf-8", `{"error":"file path must be relative"}`},
		{`{"model":"x","files":{}}`, "400", "application/json", `{"error":"unknown type"}`},
		{`{"model":"x","files":{"m":"` + missing + `"}}`, "400", "application/json", `{"error":"unknown type"}`},
		{`{"model":"x","files":{"m.gguf":"` + missing + `"}}`, "200", "application/x-ndjson",
			`{"status":"parsing GGUF"}` + "\n" + `{"error":"open /root/.ollama/models/blobs/sha256-` + strings.Repeat("5", 64) + `: no such file or directory"}` + "\n"},
		{`{"model":"x","files":{"m.gguf":"` + missing + `"},"stream":false}`, "500", "application/json",
			`{"error":"open /root/.ollama/models/blobs/sha256-` + strings.Repeat("5", 64) + `: no such file or directory"}`},
		{`{"model":"x","files":{"m.gguf":"` + digestOf(text) + `"}}`, "200", "application/x-ndjson",
			`{"status":"parsing GGUF"}` + "\n" + `{"error":"supplied file was not in GGUF format"}` + "\n"},
		{`{"model":"x","files":{"m.gguf":"` + digestOf(text) + `"},"stream":false}`, "400", "application/json", `{"error":"supplied file was not in GGUF format"}`},
	} {
		resp, body := post(t, f.URL+"/api/create", c.body)
		assert.Equal(t, c.status, resp.Status[:3], c.body)
		assert.Equal(t, c.ct, resp.Header.Get("Content-Type"), c.body)
		assert.Equal(t, c.want, body, c.body)
	}
	assert.NotContains(t, f.Models(), "x:latest")
}

func TestPush(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"registry.internal:5000/team/tiny-llama:1b"}})

	resp, body := post(t, f.URL+"/api/push", `{"model":"registry.internal:5000/team/tiny-llama:1b","insecure":true}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "application/x-ndjson", resp.Header.Get("Content-Type"))
	ls := lines(t, body)
	require.Len(t, ls, 7, body) // manifest, three layers, the config, manifest, success
	assert.Equal(t, "retrieving manifest", ls[0]["status"])
	for _, l := range ls[1:5] {
		assert.Regexp(t, `^pushing [0-9a-f]{12}$`, l["status"])
		assert.Equal(t, l["status"].(string)[8:], l["digest"].(string)[7:19])
		assert.Equal(t, l["total"], l["completed"])
	}
	assert.Equal(t, "pushing manifest", ls[5]["status"])
	assert.Equal(t, "success", ls[6]["status"])

	resp, body = post(t, f.URL+"/api/push", `{"model":"registry.internal:5000/team/tiny-llama:1b","stream":false}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, `{"status":"success"}`, body)

	_, body = post(t, f.URL+"/api/push", `{"model":"nope"}`)
	assert.Equal(t, `{"status":"retrieving manifest"}`+"\n"+`{"status":"couldn't retrieve manifest"}`+"\n"+
		`{"error":"open /root/.ollama/models/manifests/registry.ollama.ai/library/nope/latest: no such file or directory"}`+"\n", body)
	resp, body = post(t, f.URL+"/api/push", `{}`)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, `{"error":"model is required"}`, body)

	f.FailPushes("registry unreachable")
	_, body = post(t, f.URL+"/api/push", `{"model":"registry.internal:5000/team/tiny-llama:1b"}`)
	assert.Equal(t, `{"status":"retrieving manifest"}`+"\n"+`{"error":"registry unreachable"}`+"\n", body)
	resp, body = post(t, f.URL+"/api/push", `{"model":"registry.internal:5000/team/tiny-llama:1b","stream":false}`)
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	assert.Equal(t, `{"error":"registry unreachable"}`, body)
}

func TestManagementUnderConcurrency(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama"}})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			name := "c" + string(rune('a'+i))
			post(t, f.URL+"/api/copy", `{"source":"tiny-llama","destination":"`+name+`"}`)
			post(t, f.URL+"/api/create", `{"model":"`+name+`-2","from":"`+name+`","system":"s"}`)
			post(t, f.URL+"/api/push", `{"model":"`+name+`-2"}`)
			do(t, http.MethodGet, f.URL+"/api/tags", "")
		})
	}
	wg.Wait()
	assert.Len(t, f.Models(), 17)
}

func TestPullReportsEveryLayer(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama"}})

	// A model it lacks: the weights download (three lines), the template, the parameters and the
	// config blob arrive in one line each.
	_, body := post(t, f.URL+"/api/pull", `{"model":"fresh"}`)
	var statuses []string
	for _, l := range lines(t, body) {
		statuses = append(statuses, l["status"].(string))
	}
	require.Len(t, statuses, 10, body)
	assert.Equal(t, "pulling manifest", statuses[0])
	for _, s := range statuses[1:7] {
		assert.Regexp(t, `^pulling [0-9a-f]{12}$`, s)
	}
	assert.Equal(t, []string{"verifying sha256 digest", "writing manifest", "success"}, statuses[7:])

	// Pulled again, every blob is there: one line per layer, as in Ollama.
	_, body = post(t, f.URL+"/api/pull", `{"model":"fresh"}`)
	ls := lines(t, body)
	require.Len(t, ls, 8, body)
	for _, l := range ls[1:5] {
		assert.Equal(t, l["total"], l["completed"])
		assert.Equal(t, l["status"].(string)[8:], l["digest"].(string)[7:19])
	}

	// The registry keeps what the fake pushed: a copy of tiny-llama pushed and deleted comes back
	// with tiny-llama's blobs, which the fake still has.
	post(t, f.URL+"/api/copy", `{"source":"tiny-llama","destination":"reg.internal:5000/team/copy"}`)
	resp, _ := post(t, f.URL+"/api/push", `{"model":"reg.internal:5000/team/copy","stream":false}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp, _ = do(t, http.MethodDelete, f.URL+"/api/delete", `{"model":"reg.internal:5000/team/copy"}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	_, body = post(t, f.URL+"/api/pull", `{"model":"reg.internal:5000/team/copy"}`)
	assert.Len(t, lines(t, body), 8, body)
	_, tags := do(t, http.MethodGet, f.URL+"/api/tags", "")
	var list struct {
		Models []struct{ Name, Digest string }
	}
	require.NoError(t, json.Unmarshal([]byte(tags), &list))
	digests := map[string]string{}
	for _, m := range list.Models {
		digests[m.Name] = m.Digest
	}
	assert.Equal(t, digests["tiny-llama:latest"], digests["reg.internal:5000/team/copy:latest"], "the pushed manifest")
}

func TestModelsDir(t *testing.T) {
	t.Parallel()
	f := newFake(t, fakeollama.Config{Models: []string{"tiny-llama"}, ModelsDir: "/srv/ollama"})
	_, body := post(t, f.URL+"/api/push", `{"model":"nope"}`)
	assert.Contains(t, body, `"open /srv/ollama/manifests/registry.ollama.ai/library/nope/latest: no such file or directory"`)
	_, body = post(t, f.URL+"/api/show", `{"model":"tiny-llama"}`)
	assert.Contains(t, body, `FROM /srv/ollama/blobs/sha256-`)
}
