package e2e

// TestFakeMatchesReal sends the same requests to a real Ollama server and to
// internal/fakeollama (which the root module's tests use in its place) and
// compares what a client or a proxy could observe: status, headers, body shape,
// error messages, and how a response is cut into chunks on the wire. Every
// difference is listed; the test fails if there is any.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ollama/ollama/api"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// probe is one request, sent to both servers.
type probe struct {
	name   string
	method string
	path   string
	body   string
	// fake prepares the fake for this probe (a fault, say); nil for none.
	fake func(f *fakeollama.Server)
	// exactBody compares bodies byte for byte (besides shapes).
	exactBody bool
	// management probes change models; they are not sent through the proxy,
	// which fans them out to every server by design.
	management bool
	// ownErrors: the proxy answers this itself, with the status and in the
	// error format SPEC §3 prescribes (JSON, also for unknown paths and wrong
	// methods; messages that name the frontend), so only that it is an error
	// and the Allow header are compared with Ollama's.
	ownErrors bool
	// aggregated: the proxy builds this body from every server's (SPEC §5):
	// its shape must match, its encoding details (charset, final newline) may
	// not.
	aggregated bool
}

// wireResponse is a response as read off the connection.
type wireResponse struct {
	status  int
	header  http.Header
	chunked bool
	chunks  [][]byte // the body as the server's writes framed it (one element if not chunked)
}

func (r wireResponse) body() []byte { return bytes.Join(r.chunks, nil) }

// rawDo sends one HTTP/1.1 request on a fresh connection and reads the raw
// response, keeping chunk boundaries: with net/http on the server side each
// flush becomes one chunk, so they show how a response was streamed.
func rawDo(hostPort, method, path, body string) (wireResponse, error) {
	var out wireResponse
	conn, err := net.DialTimeout("tcp", hostPort, 5*time.Second)
	if err != nil {
		return out, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ollamaflow-e2e\r\nConnection: close\r\n", method, path, hostPort)
	if body != "" {
		fmt.Fprintf(&req, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	req.WriteString("\r\n" + body)
	if _, err := conn.Write(req.Bytes()); err != nil {
		return out, err
	}
	br := bufio.NewReader(conn)
	tp := textproto.NewReader(br)
	line, err := tp.ReadLine()
	if err != nil {
		return out, err
	}
	parts := strings.SplitN(line, " ", 3)
	if len(parts) < 2 {
		return out, fmt.Errorf("bad status line %q", line)
	}
	if out.status, err = strconv.Atoi(parts[1]); err != nil {
		return out, err
	}
	mh, err := tp.ReadMIMEHeader()
	if err != nil {
		return out, err
	}
	out.header = http.Header(mh)
	if method == http.MethodHead {
		return out, nil
	}
	if strings.EqualFold(out.header.Get("Transfer-Encoding"), "chunked") {
		out.chunked = true
		for {
			sizeLine, err := tp.ReadLine()
			if err != nil {
				return out, err
			}
			n, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(sizeLine, ";", 2)[0]), 16, 64)
			if err != nil {
				return out, fmt.Errorf("bad chunk size %q", sizeLine)
			}
			if n == 0 {
				return out, nil
			}
			chunk := make([]byte, n)
			if _, err := io.ReadFull(br, chunk); err != nil {
				return out, err
			}
			out.chunks = append(out.chunks, chunk)
			if _, err := tp.ReadLine(); err != nil { // the CRLF after the chunk
				return out, err
			}
		}
	}
	b, err := io.ReadAll(br)
	if len(b) > 0 {
		out.chunks = [][]byte{b}
	}
	return out, err
}

// shape is the structure of a JSON value without its values: object keys
// (sorted) with the shapes of their values, arrays as the shape of their first
// element, and a letter for each scalar type.
func shape(v any) string {
	switch x := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		b.WriteString("{")
		for i, k := range keys {
			if i > 0 {
				b.WriteString(",")
			}
			b.WriteString(k + ":" + shape(x[k]))
		}
		return b.String() + "}"
	case []any:
		if len(x) == 0 {
			return "[]"
		}
		return "[" + shape(x[0]) + "]"
	case string:
		return "s"
	case float64:
		return "n"
	case bool:
		return "b"
	case nil:
		return "null"
	}
	return "?"
}

func jsonShape(b []byte) string {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return fmt.Sprintf("not JSON: %q", truncate(b, 80))
	}
	return shape(v)
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}

// describe is everything about a response that the comparison looks at, as
// named lines, so two descriptions can be diffed line by line.
func describe(p probe, r wireResponse) map[string]string {
	d := map[string]string{
		"status":            strconv.Itoa(r.status),
		"is an error":       strconv.FormatBool(r.status >= 400),
		"content-type":      r.header.Get("Content-Type"),
		"framing":           framing(r),
		"header names":      headerNames(r.header),
		"trailing newline":  strconv.FormatBool(bytes.HasSuffix(r.body(), []byte("\n"))),
		"body is empty":     strconv.FormatBool(len(r.body()) == 0),
		"allow header":      r.header.Get("Allow"),
		"content-length ok": strconv.FormatBool(r.chunked || r.header.Get("Content-Length") != ""),
	}
	body := r.body()
	ct := r.header.Get("Content-Type")
	switch {
	case strings.HasPrefix(ct, "application/x-ndjson"):
		lines := bytes.Split(bytes.TrimSuffix(body, []byte("\n")), []byte("\n"))
		d["lines"] = strconv.Itoa(len(lines))
		d["first line"] = jsonShape(lines[0])
		d["last line"] = jsonShape(lines[len(lines)-1])
		var statuses []string
		for _, l := range lines {
			var st struct {
				Status string `json:"status"`
				Error  string `json:"error"`
			}
			if json.Unmarshal(l, &st) == nil && (st.Status != "" || st.Error != "") {
				statuses = append(statuses, statusKind(st.Status)+errKind(st.Error))
			}
		}
		if len(statuses) > 0 {
			d["progress statuses"] = strings.Join(slices.Compact(statuses), " → ")
		}
		d["lines per chunk"] = perChunk(r, "\n")
	case strings.HasPrefix(ct, "text/event-stream"):
		events := strings.Split(strings.TrimSuffix(string(body), "\n\n"), "\n\n")
		d["events"] = strconv.Itoa(len(events))
		var shapes []string
		for _, e := range events {
			data := strings.TrimPrefix(e, "data: ")
			if data == "[DONE]" {
				shapes = append(shapes, "[DONE]")
				continue
			}
			shapes = append(shapes, jsonShape([]byte(data)))
		}
		d["first event"] = shapes[0]
		d["event before [DONE]"] = shapes[max(len(shapes)-2, 0)]
		d["last event"] = shapes[len(shapes)-1]
		d["events per chunk"] = perChunk(r, "\n\n")
	case strings.Contains(ct, "json") && len(body) > 0:
		d["body shape"] = jsonShape(body)
		var e struct {
			Error any `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != nil {
			b, _ := json.Marshal(e.Error)
			d["error"] = environmental(string(b))
		}
	default:
		d["body"] = truncate(body, 200)
	}
	if p.exactBody {
		d["body"] = truncate(body, 400)
	}
	return d
}

// statusKind reduces a progress status to its kind: "pulling 1a2b3c…" and
// "pulling 4d5e6f…" are both "pulling <digest>".
func statusKind(s string) string {
	f := strings.Fields(s)
	for i, w := range f {
		if strings.HasPrefix(w, "sha256:") || (len(w) >= 12 && strings.Trim(w, "0123456789abcdef") == "") {
			f[i] = "<digest>"
		}
	}
	return strings.Join(f, " ")
}

func errKind(e string) string {
	if e == "" {
		return ""
	}
	return "error(" + environmental(e) + ")"
}

// resolver is the DNS server a failed lookup names ("lookup registry.ollama.ai
// on 10.0.0.53:53: no such host"): the machine's, not the server's.
var resolver = regexp.MustCompile(`(lookup \S+) on \S+:\d+:`)

// environmental removes from an error message what depends on the machine
// rather than on the server that answered.
func environmental(msg string) string {
	return resolver.ReplaceAllString(msg, "$1:")
}

func framing(r wireResponse) string {
	if r.chunked {
		return fmt.Sprintf("chunked, %d chunks", len(r.chunks))
	}
	return "content-length"
}

// perChunk says how many complete lines (or events) each chunk held, e.g.
// "1,1,1,3": the last write carried three.
func perChunk(r wireResponse, sep string) string {
	var n []string
	for _, c := range r.chunks {
		n = append(n, strconv.Itoa(strings.Count(string(c), sep)))
	}
	return strings.Join(n, ",")
}

func headerNames(h http.Header) string {
	var names []string
	for k := range h {
		// Date varies; Server and X-Ollamaflow-* are the proxy's own.
		if k != "Date" && k != "Server" && !strings.HasPrefix(k, "X-Ollamaflow-") {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}

func TestFakeMatchesReal(t *testing.T) {
	scenario(t)
	real := env.servers[0]
	// The fake keeps its models where the real server does: error messages name the directory.
	fake := fakeollama.New(fakeollama.Config{Models: []string{chatModel, embedModel}, Tokens: 5, ModelsDir: filepath.Join(real.dir, "models")})
	defer fake.Close()
	probes := wireProbes(t)
	diffs, report := compareWire(t, probes, real.hostPort(), fake.HostPort(), "fake", func(p probe) {
		fake.ClearFaults()
		fake.SetModels(chatModel, embedModel)
		if p.fake != nil {
			p.fake(fake)
		}
	}, nil)
	reportPath := filepath.Join(env.workDir, "wire-report.txt")
	if err := os.WriteFile(reportPath, []byte(report), 0o644); err == nil {
		t.Logf("what real Ollama answered to every probe (and the fake where it differs): %s", reportPath)
	}
	if len(diffs) > 0 {
		t.Errorf("internal/fakeollama differs from real Ollama 0.17.4 in %d of %d probes:\n%s", len(diffs), len(probes), strings.Join(diffs, "\n"))
	}
}

// TestProxyIsTransparent sends the same requests to a real server directly and
// through the proxy: apart from what SPEC makes the proxy's own (its error
// format, its headers), a client must not be able to tell the difference.
func TestProxyIsTransparent(t *testing.T) {
	scenario(t)
	var probes []probe
	for _, p := range wireProbes(t) {
		if !p.management {
			probes = append(probes, p)
		}
	}
	proxy := strings.TrimPrefix(env.mainURL, "http://")
	diffs, report := compareWire(t, probes, env.servers[0].hostPort(), proxy, "proxy", nil, proxyMayDiffer)
	reportPath := filepath.Join(env.workDir, "proxy-wire-report.txt")
	if err := os.WriteFile(reportPath, []byte(report), 0o644); err == nil {
		t.Logf("real Ollama and the proxy, probe by probe: %s", reportPath)
	}
	if len(diffs) > 0 {
		t.Errorf("the proxy differs from a real Ollama 0.17.4 in %d of %d probes:\n%s", len(diffs), len(probes), strings.Join(diffs, "\n"))
	}
}

// proxyMayDiffer says which differences between Ollama's answer (real) and
// the proxy's are by design.
func proxyMayDiffer(p probe, key, real, proxy string) bool {
	switch {
	case p.ownErrors:
		return key != "is an error" && key != "allow header"
	case key == "framing" || key == "lines per chunk" || key == "events per chunk":
		// A proxy forwards what it has read: tokens that leave Ollama
		// microseconds apart may arrive in one read and leave in one write.
		// (Flushing per chunk is proven with a gated backend in the root's
		// integration tests.)
		return true
	case p.aggregated && (key == "trailing newline" || key == "framing" || key == "header names"):
		return true
	case p.aggregated && key == "content-type":
		return strings.SplitN(real, ";", 2)[0] == strings.SplitN(proxy, ";", 2)[0]
	case p.aggregated && key == "body shape":
		// /api/ps names the server each loaded model is on.
		return strings.ReplaceAll(proxy, "backend:s,", "") == real
	}
	return false
}

// wireProbes arranges what the probes need on server a (a model in the
// registry to pull, one to delete) and returns them.
func wireProbes(t *testing.T) []probe {
	t.Helper()
	real := env.servers[0]
	ctx := context.Background()
	// Arrange on the real server: a model in the registry to pull (pushed from
	// a, then removed there), and names that must not exist.
	pushed := env.registry + "/library/wire-llama:latest"
	missingInRegistry := env.registry + "/library/wire-none:latest"
	c := real.client()
	t.Cleanup(func() {
		for _, m := range []string{pushed, "wire-copy", "wire-created", "wire-deleted"} {
			_ = real.deleteModel(m)
		}
	})
	if err := c.Copy(ctx, &api.CopyRequest{Source: chatModel, Destination: pushed}); err != nil {
		t.Fatal(err)
	}
	if err := c.Push(ctx, &api.PushRequest{Model: pushed, Insecure: true}, func(api.ProgressResponse) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if err := real.deleteModel(pushed); err != nil {
		t.Fatal(err)
	}
	if err := c.Copy(ctx, &api.CopyRequest{Source: chatModel, Destination: "wire-deleted"}); err != nil {
		t.Fatal(err)
	}
	fakeHasDeleted := func(f *fakeollama.Server) { f.SetModels(chatModel, embedModel, "wire-deleted") }
	fakePullFails := func(f *fakeollama.Server) {
		f.FailPulls("pull model manifest: file does not exist")
	}
	// The fake's registry has every model, with the layers of what the fake
	// pushed under that name: arrange it like the real one's.
	fakePushed := func(f *fakeollama.Server) {
		for _, step := range []struct{ path, body string }{
			{"/api/copy", fmt.Sprintf(`{"source":%q,"destination":%q}`, chatModel, pushed)},
			{"/api/push", fmt.Sprintf(`{"model":%q,"insecure":true,"stream":false}`, pushed)},
		} {
			if r, err := rawDo(f.HostPort(), http.MethodPost, step.path, step.body); err != nil || r.status != http.StatusOK {
				t.Fatalf("arranging the fake: %s: %v %d %s", step.path, err, r.status, r.body())
			}
		}
		f.SetModels(chatModel, embedModel)
	}
	// The real servers cannot reach the model hub (noHub): a base the real
	// server lacks cannot be pulled from registry.ollama.ai.
	fakeHubUnreachable := func(f *fakeollama.Server) {
		f.FailPulls(noHubError("nope"))
	}
	zeroDigest := "sha256:" + strings.Repeat("0", 64)

	chat3 := `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":3}`
	gen3 := `{"model":"tiny-llama","prompt":"hi","options":{"num_predict":3}`
	oai3 := `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3`
	probes := []probe{
		{name: "GET /", method: "GET", path: "/", exactBody: true},
		{name: "HEAD /", method: "HEAD", path: "/"},
		{name: "GET /api/version", method: "GET", path: "/api/version", exactBody: true},
		{name: "HEAD /api/version", method: "HEAD", path: "/api/version"},
		{aggregated: true, name: "GET /api/tags", method: "GET", path: "/api/tags"},
		{aggregated: true, name: "HEAD /api/tags", method: "HEAD", path: "/api/tags"},
		{ownErrors: true, name: "unknown path", method: "GET", path: "/api/nope", exactBody: true},
		{ownErrors: true, name: "unknown /v1 path", method: "GET", path: "/v1/nope", exactBody: true},
		{ownErrors: true, name: "wrong method on /api/chat", method: "GET", path: "/api/chat", exactBody: true},
		{ownErrors: true, name: "wrong method on /api/tags", method: "POST", path: "/api/tags", body: "{}", exactBody: true},
		{ownErrors: true, name: "wrong method on /v1/models", method: "POST", path: "/v1/models", body: "{}", exactBody: true},

		{name: "chat streaming", method: "POST", path: "/api/chat", body: chat3 + `}`},
		{name: "chat stream:false", method: "POST", path: "/api/chat", body: chat3 + `,"stream":false}`},
		{name: "chat, no messages (load)", method: "POST", path: "/api/chat", body: `{"model":"tiny-llama"}`},
		{ownErrors: true, name: "chat, unknown model", method: "POST", path: "/api/chat", body: `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`},
		{ownErrors: true, name: "chat, no model", method: "POST", path: "/api/chat", body: `{"messages":[{"role":"user","content":"hi"}]}`},
		{ownErrors: true, name: "chat, body not JSON", method: "POST", path: "/api/chat", body: `{"model":`},
		{ownErrors: true, name: "chat, empty body", method: "POST", path: "/api/chat"},
		{name: "chat, model name in capitals", method: "POST", path: "/api/chat", body: `{"model":"TINY-LLAMA","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":3}}`},
		{name: "chat, model with registry and namespace", method: "POST", path: "/api/chat", body: `{"model":"registry.ollama.ai/library/tiny-llama:latest","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":3}}`},
		{name: "chat, embedding model", method: "POST", path: "/api/chat", body: `{"model":"tiny-bert","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{name: "generate streaming", method: "POST", path: "/api/generate", body: gen3 + `}`},
		{name: "generate stream:false", method: "POST", path: "/api/generate", body: gen3 + `,"stream":false}`},
		{name: "generate, no prompt (load)", method: "POST", path: "/api/generate", body: `{"model":"tiny-llama"}`},
		{ownErrors: true, name: "generate, unknown model", method: "POST", path: "/api/generate", body: `{"model":"nope","prompt":"hi"}`},
		{ownErrors: true, name: "generate, no model", method: "POST", path: "/api/generate", body: `{"prompt":"hi"}`},
		{aggregated: true, name: "GET /api/ps (tiny-llama loaded)", method: "GET", path: "/api/ps"},
		{name: "embed", method: "POST", path: "/api/embed", body: `{"model":"tiny-bert","input":["a","b"]}`},
		{name: "embed, chat model", method: "POST", path: "/api/embed", body: `{"model":"tiny-llama","input":"a"}`},
		{ownErrors: true, name: "embed, unknown model", method: "POST", path: "/api/embed", body: `{"model":"nope","input":"a"}`},
		{ownErrors: true, name: "embed, no model", method: "POST", path: "/api/embed", body: `{"input":"a"}`},
		{name: "embeddings (legacy)", method: "POST", path: "/api/embeddings", body: `{"model":"tiny-bert","prompt":"a"}`},
		{ownErrors: true, name: "embeddings (legacy), unknown model", method: "POST", path: "/api/embeddings", body: `{"model":"nope","prompt":"a"}`},
		{name: "show", method: "POST", path: "/api/show", body: `{"model":"tiny-llama"}`},
		{ownErrors: true, name: "show, unknown model", method: "POST", path: "/api/show", body: `{"model":"nope"}`},

		{name: "v1 chat streaming", method: "POST", path: "/v1/chat/completions", body: oai3 + `,"stream":true}`},
		{name: "v1 chat streaming with usage", method: "POST", path: "/v1/chat/completions", body: oai3 + `,"stream":true,"stream_options":{"include_usage":true}}`},
		{name: "v1 chat", method: "POST", path: "/v1/chat/completions", body: oai3 + `}`},
		{ownErrors: true, name: "v1 chat, unknown model", method: "POST", path: "/v1/chat/completions", body: `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`},
		{ownErrors: true, name: "v1 chat, no model", method: "POST", path: "/v1/chat/completions", body: `{"messages":[{"role":"user","content":"hi"}]}`},
		{name: "v1 chat, no messages", method: "POST", path: "/v1/chat/completions", body: `{"model":"tiny-llama"}`},
		{ownErrors: true, name: "v1 chat, body not JSON", method: "POST", path: "/v1/chat/completions", body: `{"model":`},
		{name: "v1 completions streaming", method: "POST", path: "/v1/completions", body: `{"model":"tiny-llama","prompt":"hi","max_tokens":3,"stream":true}`},
		{name: "v1 completions", method: "POST", path: "/v1/completions", body: `{"model":"tiny-llama","prompt":"hi","max_tokens":3}`},
		{name: "v1 embeddings", method: "POST", path: "/v1/embeddings", body: `{"model":"tiny-bert","input":["a","b"]}`},
		{name: "v1 chat, embedding model", method: "POST", path: "/v1/chat/completions", body: `{"model":"tiny-bert","messages":[{"role":"user","content":"hi"}]}`},
		{ownErrors: true, name: "v1 embeddings, unknown model", method: "POST", path: "/v1/embeddings", body: `{"model":"nope","input":"a"}`},
		{aggregated: true, name: "v1 models", method: "GET", path: "/v1/models"},
		{name: "v1 model", method: "GET", path: "/v1/models/tiny-llama"},
		{ownErrors: true, name: "v1 model, unknown", method: "GET", path: "/v1/models/nope"},

		{management: true, name: "pull from the registry", method: "POST", path: "/api/pull", body: fmt.Sprintf(`{"model":%q,"insecure":true}`, pushed), fake: fakePushed},
		{management: true, name: "pull again (present)", method: "POST", path: "/api/pull", body: fmt.Sprintf(`{"model":%q,"insecure":true,"stream":false}`, pushed)},
		{management: true, name: "pull, not in the registry", method: "POST", path: "/api/pull", body: fmt.Sprintf(`{"model":%q,"insecure":true}`, missingInRegistry), fake: fakePullFails},
		{management: true, name: "pull, not in the registry, stream:false", method: "POST", path: "/api/pull", body: fmt.Sprintf(`{"model":%q,"insecure":true,"stream":false}`, missingInRegistry), fake: fakePullFails},
		{management: true, name: "pull, no model", method: "POST", path: "/api/pull", body: `{}`},
		{management: true, name: "delete", method: "DELETE", path: "/api/delete", body: `{"model":"wire-deleted"}`, fake: fakeHasDeleted},
		{management: true, name: "delete, unknown model", method: "DELETE", path: "/api/delete", body: `{"model":"nope"}`},
		{management: true, name: "copy", method: "POST", path: "/api/copy", body: `{"source":"tiny-llama","destination":"wire-copy"}`},
		{management: true, name: "copy, unknown source", method: "POST", path: "/api/copy", body: `{"source":"nope","destination":"wire-copy2"}`},
		{management: true, name: "create from a model", method: "POST", path: "/api/create", body: `{"model":"wire-created","from":"tiny-llama","parameters":{"num_predict":4}}`},
		{management: true, name: "create, stream:false", method: "POST", path: "/api/create", body: `{"model":"wire-created","from":"tiny-llama","stream":false}`},
		{management: true, name: "create, unknown base", method: "POST", path: "/api/create", body: `{"model":"wire-created2","from":"nope"}`, fake: fakeHubUnreachable},
		{management: true, name: "push, unknown model", method: "POST", path: "/api/push", body: fmt.Sprintf(`{"model":"%s/library/nope:latest","insecure":true}`, env.registry)},
		{management: true, name: "HEAD blob, missing", method: "HEAD", path: "/api/blobs/" + zeroDigest},
		{management: true, name: "POST blob, digest mismatch", method: "POST", path: "/api/blobs/" + zeroDigest, body: "not the blob"},
	}

	return probes
}

// compareWire sends every probe to a and to b (before runs first, if set) and
// lists the differences, skipping those ignore allows. The report has every
// description of a's answers, and b's where they differ.
func compareWire(t *testing.T, probes []probe, a, b, bLabel string, before func(probe), ignore func(p probe, key, a, b string) bool) ([]string, string) {
	t.Helper()
	var diffs []string
	var report strings.Builder
	for _, p := range probes {
		if before != nil {
			before(p)
		}
		r, err := rawDo(a, p.method, p.path, p.body)
		if err != nil {
			t.Fatalf("%s: real: %v", p.name, err)
		}
		f, err := rawDo(b, p.method, p.path, p.body)
		if err != nil {
			t.Fatalf("%s: %s: %v", p.name, bLabel, err)
		}
		dr, df := describe(p, r), describe(p, f)
		fmt.Fprintf(&report, "%s (%s %s)\n", p.name, p.method, p.path)
		for _, k := range slices.Sorted(maps.Keys(dr)) {
			fmt.Fprintf(&report, "  %s: %s\n", k, dr[k])
			if df[k] != dr[k] {
				fmt.Fprintf(&report, "  %s (%s): %s\n", k, bLabel, df[k])
			}
		}
		var lines []string
		keys := make([]string, 0, len(dr))
		for k := range dr {
			keys = append(keys, k)
		}
		for k := range df {
			if _, ok := dr[k]; !ok {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		for _, k := range keys {
			if dr[k] != df[k] && (ignore == nil || !ignore(p, k, dr[k], df[k])) {
				lines = append(lines, fmt.Sprintf("    %s:\n      real: %s\n      %s: %s", k, dr[k], bLabel, df[k]))
			}
		}
		if len(lines) > 0 {
			diffs = append(diffs, fmt.Sprintf("%s (%s %s):\n%s", p.name, p.method, p.path, strings.Join(lines, "\n")))
		}
	}
	return diffs, report.String()
}
