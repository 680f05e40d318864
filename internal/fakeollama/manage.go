package fakeollama

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Model management, answered the way Ollama v0.17.4 answers it (server/routes.go,
// server/create.go), checked against a real server: pull, delete, copy, create, blob uploads and
// push. Long operations answer through Ollama's two writers: streamResponse (NDJSON progress,
// "application/x-ndjson"; an error before the first line answers its status with
// {"error":…} as "application/json", chunked; after it, an {"error":…} line ends a 200 stream)
// and waitForStream (with "stream":false: the last progress, or the error with its status, as
// one "application/json" object). Errors found before the operation starts are gin's
// AbortWithStatusJSON: "application/json; charset=utf-8".
//
// What the fake simplifies: a model is three layers (the GGUF model, a template, parameters)
// with digests derived from its name; blobs are kept as digest, size and whether they start
// with the GGUF magic, never as content, and never pruned; a blob is a usable GGUF when it
// starts with "GGUF" (Ollama decodes it); safetensors files are "converted" without looking at
// them; the registry has every model (FailPulls makes it fail), with the layers of what this
// fake pushed under that name, else layers derived from the name; pushes always reach it unless
// FailPushes is set; every progress step waits TokenGap.

// defaultModelsDir is where Ollama keeps its models when it runs as root (its Docker image), as
// error messages show it.
const defaultModelsDir = "/root/.ollama/models"

// layer is one layer of a model's manifest.
type layer struct {
	kind   string // model, template, system, license, params, messages
	digest string // "sha256:…"
	size   int64
}

// blob is what the fake keeps of an uploaded or known blob.
type blob struct {
	size int64
	gguf bool // starts with the GGUF magic
}

var digestFormat = regexp.MustCompile(`^sha256[:-][0-9a-fA-F]{64}$`)

// blobKey is the name of a blob's file in Ollama's store: a digest with "-" for ":".
func blobKey(digest string) string { return strings.ReplaceAll(digest, ":", "-") }

func sha(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// defaultLayers are the layers of a model the fake was configured with or pulled.
func defaultLayers(m model) []layer {
	return []layer{
		{"model", sha([]byte(m.key + "\x00model")), m.size},
		{"template", sha([]byte(m.key + "\x00template")), 74},
		{"params", sha([]byte(m.key + "\x00params")), 48},
	}
}

// configLayer is the manifest's config blob, pushed last.
func configLayer(m model) layer {
	var b strings.Builder
	for _, l := range m.layers {
		b.WriteString(l.digest)
	}
	return layer{"config", sha([]byte(b.String())), 414}
}

// addModel adds m, replacing a model of the same name, and registers its layers as blobs.
func (s *Server) addModel(m model) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addModelLocked(m)
}

func (s *Server) addModelLocked(m model) {
	s.models = slices.DeleteFunc(s.models, func(o model) bool { return o.key == m.key })
	s.models = append(s.models, m)
	for _, l := range append(slices.Clone(m.layers), configLayer(m)) {
		if _, ok := s.blobs[blobKey(l.digest)]; !ok {
			s.blobs[blobKey(l.digest)] = blob{size: l.size, gguf: l.kind == "model"}
		}
	}
}

// Blobs returns the digests of the blobs the fake has ("sha256:…"), uploaded or belonging to a
// model, sorted.
func (s *Server) Blobs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.blobs))
	for k := range s.blobs {
		out = append(out, strings.Replace(k, "-", ":", 1))
	}
	slices.Sort(out)
	return out
}

func (s *Server) hasBlob(digest string) (blob, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[blobKey(digest)]
	return b, ok
}

// validName reports whether Ollama's model.ParseName(name).IsValid() holds: host, namespace,
// model and tag (defaults registry.ollama.ai, library, latest) each of valid characters and
// length.
func validName(name string) bool {
	var host, namespace, mdl, tag string
	s := name
	if strings.LastIndex(s, ":") > strings.LastIndex(s, "/") {
		i := strings.LastIndex(s, ":")
		s, tag = s[:i], s[i+1:]
		if tag == "" {
			return false
		}
	}
	parts := strings.Split(s, "/")
	switch len(parts) {
	case 1:
		mdl = parts[0]
	case 2:
		namespace, mdl = parts[0], parts[1]
	default:
		// ParseNameBare cuts the model and the namespace from the right; the rest is the host.
		host, namespace, mdl = strings.Join(parts[:len(parts)-2], "/"), parts[len(parts)-2], parts[len(parts)-1]
		if _, h, ok := strings.Cut(host, "://"); ok {
			host = h
		}
		if host == "" || namespace == "" || mdl == "" {
			return false
		}
	}
	if len(parts) == 2 && (namespace == "" || mdl == "") {
		return false
	}
	host, namespace, tag = cmp.Or(host, "registry.ollama.ai"), cmp.Or(namespace, "library"), cmp.Or(tag, "latest")
	return validPart(host, 350, ".-_:") && validPart(namespace, 80, "-_") && validPart(mdl, 80, ".-_") && validPart(tag, 80, ".-_")
}

func validPart(s string, maxLen int, extra string) bool {
	if len(s) < 1 || len(s) > maxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_'
		if !alnum && (i == 0 || !strings.ContainsRune(extra, rune(c))) {
			return false
		}
	}
	return true
}

// manifestPath is where Ollama keeps the manifest of name, for its error messages.
func (s *Server) manifestPath(name string) string {
	n := displayName(name)
	i := strings.LastIndex(n, ":")
	base, tag := n[:i], n[i+1:]
	parts := strings.Split(base, "/")
	switch len(parts) {
	case 1:
		parts = []string{"registry.ollama.ai", "library", parts[0]}
	case 2:
		parts = append([]string{"registry.ollama.ai"}, parts...)
	}
	return path.Join(append([]string{s.cfg.ModelsDir, "manifests"}, append(parts, tag)...)...)
}

// progressStream answers a long operation as Ollama's streamResponse (stream) or waitForStream
// (not) does.
type progressStream struct {
	c      *call
	stream bool
	last   progress
	sent   bool // a line went out: errors become error lines
}

func (c *call) progressStream(stream bool) *progressStream {
	if stream {
		c.header(http.StatusOK, ndjson)
	}
	return &progressStream{c: c, stream: stream}
}

// step reports one progress line; false means stop (client gone, fake closed).
func (p *progressStream) step(v progress) bool {
	p.last = v
	if !p.stream {
		return p.c.alive()
	}
	if !p.c.line(v) {
		return false
	}
	p.sent = true
	return true
}

// fail ends the operation with msg: status before anything was streamed, an error line after.
func (p *progressStream) fail(status int, msg string) {
	b, err := json.Marshal(map[string]string{"error": msg})
	if err != nil {
		panic(err)
	}
	switch {
	case p.stream && p.sent:
		p.c.chunk(append(b, '\n'))
	case p.stream: // gin's c.JSON inside c.Stream: flushed, so chunked
		p.c.header(status, jsonPlain)
		p.c.chunk(b)
	default:
		p.c.header(status, jsonPlain)
		p.c.send(b, false)
	}
}

// done ends a successful operation: the stream is complete; otherwise the last progress.
func (p *progressStream) done() {
	if p.stream {
		return
	}
	b, err := json.Marshal(p.last)
	if err != nil {
		panic(err)
	}
	p.c.header(http.StatusOK, jsonPlain)
	p.c.send(b, false)
}

// gap waits TokenGap between two progress steps.
func (p *progressStream) gap() bool { return p.c.wait(p.c.s.cfg.TokenGap) }

// Pull.

func (s *Server) pull(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	name := cmp.Or(req.Model, req.Name)
	if strings.TrimSpace(name) == "" {
		c.ollamaError(http.StatusBadRequest, "invalid model name")
		return
	}
	ps := c.progressStream(req.streaming())
	if _, ok := s.pullSteps(ps, name); ok {
		ps.done()
	}
}

// pullSteps pulls name from the "registry", reporting progress on ps, and returns the model.
// false: the pull failed (answered) or the client went away. Like Ollama: "pulling manifest",
// then each layer and the config blob ("pulling DIGEST12"; one line for a blob it has, more while
// the model's weights download), "verifying sha256 digest", "writing manifest", "success".
func (s *Server) pullSteps(ps *progressStream, name string) (model, bool) {
	s.mu.Lock()
	failure := s.faults.pullError
	s.mu.Unlock()
	m := s.newModel(name, time.Now())
	s.mu.Lock()
	if p, ok := s.pushed[m.key]; ok { // the manifest this fake pushed under that name
		m.digest, m.size, m.embed, m.layers = p.digest, p.size, p.embed, slices.Clone(p.layers)
	}
	s.mu.Unlock()
	steps := []progress{{Status: "pulling manifest"}}
	if failure == "" {
		for _, l := range append(slices.Clone(m.layers), configLayer(m)) {
			p := progress{Status: "pulling " + l.digest[7:19], Digest: l.digest, Total: l.size}
			if _, ok := s.hasBlob(l.digest); !ok && l.kind == "model" {
				half := p
				half.Completed = l.size / 2
				steps = append(steps, p, half)
			}
			p.Completed = l.size
			steps = append(steps, p)
		}
		steps = append(steps, progress{Status: "verifying sha256 digest"}, progress{Status: "writing manifest"}, progress{Status: "success"})
	}
	for i, p := range steps {
		if i > 0 && !ps.gap() {
			return model{}, false
		}
		if p.Status == "success" {
			s.addModel(m)
		}
		if !ps.step(p) {
			return model{}, false
		}
	}
	if failure != "" {
		ps.fail(http.StatusInternalServerError, failure)
		return model{}, false
	}
	return m, true
}

// Delete.

func (s *Server) delete(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	name := cmp.Or(req.Model, req.Name)
	if strings.TrimSpace(name) == "" {
		c.ollamaError(http.StatusBadRequest, fmt.Sprintf("name %q is invalid", name))
		return
	}
	m, ok := s.lookup(name)
	if !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("model '%s' not found", name))
		return
	}
	s.mu.Lock()
	s.models = slices.DeleteFunc(s.models, func(o model) bool { return o.key == m.key })
	s.loaded = slices.DeleteFunc(s.loaded, func(k string) bool { return k == m.key })
	s.mu.Unlock()
	c.header(http.StatusOK, "")
	c.writeHeader()
}

// Copy: 200 with an empty body; the copy shares the source's manifest (digest, size, layers).

func (s *Server) copyModel(c *call) {
	var req struct {
		Source      string `json:"source"`
		Destination string `json:"destination"`
	}
	if !c.decodeOllama(&req) {
		return
	}
	if !validName(req.Source) {
		c.ollamaError(http.StatusBadRequest, fmt.Sprintf("source %q is invalid", req.Source))
		return
	}
	if !validName(req.Destination) {
		c.ollamaError(http.StatusBadRequest, fmt.Sprintf("destination %q is invalid", req.Destination))
		return
	}
	src, ok := s.lookup(req.Source)
	if !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("model %q not found", req.Source))
		return
	}
	dst := src
	dst.name = displayName(req.Destination)
	dst.key = strings.ToLower(dst.name)
	dst.modified = time.Now()
	dst.layers = slices.Clone(src.layers)
	s.addModel(dst)
	c.header(http.StatusOK, "")
	c.writeHeader()
}

// Create.

type createRequest struct {
	Model      string            `json:"model"`
	Name       string            `json:"name"`
	Stream     *bool             `json:"stream"`
	From       string            `json:"from"`
	Files      map[string]string `json:"files"`
	Template   string            `json:"template"`
	System     string            `json:"system"`
	License    any               `json:"license"`
	Parameters map[string]any    `json:"parameters"`
	Messages   []message         `json:"messages"`
}

func (s *Server) create(c *call) {
	var req createRequest
	if !c.decodeOllama(&req) {
		return
	}
	for name := range req.Files {
		if !fs.ValidPath(name) {
			c.ollamaError(http.StatusBadRequest, "file path must be relative")
			return
		}
	}
	name := cmp.Or(req.Model, req.Name)
	if !validName(name) {
		c.ollamaError(http.StatusBadRequest, "invalid model name")
		return
	}
	ps := c.progressStream(req.Stream == nil || *req.Stream)

	var base []layer
	embed := false
	switch {
	case req.From != "":
		if !validName(req.From) {
			ps.fail(http.StatusBadRequest, "invalid model name")
			return
		}
		from, ok := s.lookup(req.From)
		if !ok { // Ollama pulls a base it does not have
			if from, ok = s.pullSteps(ps, req.From); !ok {
				return
			}
		}
		base, embed = slices.Clone(from.layers), from.embed
	case req.Files != nil:
		var ok bool
		if base, ok = s.fileLayers(ps, req.Files); !ok {
			return
		}
	default:
		ps.fail(http.StatusBadRequest, "neither 'from' or 'files' was specified")
		return
	}

	layers, statuses := s.applyCreate(base, req)
	for _, st := range statuses {
		if !ps.gap() || !ps.step(progress{Status: st}) {
			return
		}
	}
	if !ps.gap() || !ps.step(progress{Status: "writing manifest"}) {
		return
	}
	m := s.newModel(name, time.Now())
	m.layers, m.embed = layers, m.embed || embed
	if len(layers) > 0 && layers[0].kind == "model" {
		m.size = layers[0].size
	}
	s.addModel(m)
	if ps.step(progress{Status: "success"}) {
		ps.done()
	}
}

// fileLayers is Ollama's convertModelFromFiles for blobs uploaded before: GGUF files are parsed
// ("parsing GGUF" each), safetensors are converted.
func (s *Server) fileLayers(ps *progressStream, files map[string]string) ([]layer, bool) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names) // Ollama walks the map in random order
	kind := ""
detect:
	for _, n := range names {
		switch {
		case strings.HasSuffix(n, ".safetensors"):
			kind = "safetensors"
			break detect
		case strings.HasSuffix(n, ".gguf"):
			kind = "gguf"
			break detect
		}
		b, ok := s.hasBlob(files[n])
		if !ok || !digestFormat.MatchString(files[n]) {
			break detect
		}
		if b.gguf {
			kind = "gguf"
			break detect
		}
	}
	switch kind {
	case "gguf":
		var out []layer
		for _, n := range names {
			d := files[n]
			if !ps.step(progress{Status: "parsing GGUF"}) {
				return nil, false
			}
			if !digestFormat.MatchString(d) {
				ps.fail(http.StatusInternalServerError, "invalid digest format")
				return nil, false
			}
			b, ok := s.hasBlob(d)
			if !ok {
				ps.fail(http.StatusInternalServerError, fmt.Sprintf("open %s/blobs/%s: no such file or directory", s.cfg.ModelsDir, blobKey(d)))
				return nil, false
			}
			if !b.gguf {
				ps.fail(http.StatusBadRequest, "supplied file was not in GGUF format")
				return nil, false
			}
			out = append(out, layer{"model", d, b.size})
		}
		return out, true
	case "safetensors":
		if !ps.step(progress{Status: "converting model"}) {
			return nil, false
		}
		var all []byte
		var size int64
		for _, n := range names {
			b, ok := s.hasBlob(files[n])
			if !ok || !digestFormat.MatchString(files[n]) {
				ps.fail(http.StatusInternalServerError, fmt.Sprintf("open %s/blobs/%s: no such file or directory", s.cfg.ModelsDir, blobKey(files[n])))
				return nil, false
			}
			all = append(all, files[n]...)
			size += b.size
		}
		return []layer{{"model", sha(all), size}}, true
	}
	ps.fail(http.StatusBadRequest, "unknown type")
	return nil, false
}

// applyCreate is Ollama's createModel on top of base: template, system, licenses, parameters
// and messages become layers, in that order, replacing those of their kind (licenses add). It
// returns the layers and the status of each, "using existing layer D" or "creating new layer D"
// for a blob the fake did not have, which it now has.
func (s *Server) applyCreate(base []layer, req createRequest) ([]layer, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	layers := slices.Clone(base)
	fresh := map[string]bool{}
	set := func(kind string, content []byte, replace bool) {
		if replace {
			layers = slices.DeleteFunc(layers, func(l layer) bool { return l.kind == kind })
		}
		l := layer{kind, sha(content), int64(len(content))}
		if _, ok := s.blobs[blobKey(l.digest)]; !ok {
			s.blobs[blobKey(l.digest)] = blob{size: l.size}
			fresh[l.digest] = true
		}
		layers = append(layers, l)
	}
	encode := func(v any) []byte {
		var b bytes.Buffer
		if err := json.NewEncoder(&b).Encode(v); err != nil {
			panic(err)
		}
		return b.Bytes()
	}
	if req.Template != "" {
		set("template", []byte(req.Template), true)
	}
	if req.System != "" {
		set("system", []byte(req.System), true)
	}
	switch l := req.License.(type) {
	case string:
		if l != "" {
			set("license", []byte(l), false)
		}
	case []any:
		for _, v := range l {
			if str, ok := v.(string); ok {
				set("license", []byte(str), false)
			}
		}
	}
	i := slices.IndexFunc(layers, func(l layer) bool { return l.kind == "params" })
	switch {
	case len(req.Parameters) > 0:
		old := ""
		if i >= 0 {
			old = layers[i].digest
		}
		set("params", append([]byte(old), encode(req.Parameters)...), true)
	case i >= 0: // Ollama rewrites the same parameters: the same blob, moved last
		p := layers[i]
		layers = append(slices.Delete(layers, i, i+1), p)
	}
	if len(req.Messages) > 0 {
		set("messages", encode(req.Messages), true)
	}
	statuses := make([]string, 0, len(layers))
	for _, l := range layers {
		how := "using existing layer"
		if fresh[l.digest] {
			how = "creating new layer"
		}
		statuses = append(statuses, how+" "+l.digest)
	}
	return layers, statuses
}

// Blobs: HEAD tells whether the fake has one, POST uploads one (201), verifying its digest.

func isBlobPath(p string) bool {
	d, ok := strings.CutPrefix(p, "/api/blobs/")
	return ok && d != "" && !strings.Contains(d, "/")
}

func (s *Server) headBlob(c *call) {
	d := strings.TrimPrefix(c.r.URL.Path, "/api/blobs/")
	if !digestFormat.MatchString(d) {
		c.ollamaError(http.StatusBadRequest, "invalid digest format")
		return
	}
	if _, ok := s.hasBlob(d); !ok {
		c.ollamaError(http.StatusNotFound, fmt.Sprintf("blob %q not found", d))
		return
	}
	c.header(http.StatusOK, "")
	c.writeHeader()
}

func (s *Server) postBlob(c *call) {
	d := strings.TrimPrefix(c.r.URL.Path, "/api/blobs/")
	if !digestFormat.MatchString(d) {
		c.ollamaError(http.StatusBadRequest, "invalid digest format")
		return
	}
	if _, ok := s.hasBlob(d); ok { // Ollama does not read the body of a blob it has
		c.header(http.StatusOK, "")
		c.writeHeader()
		return
	}
	h := sha256.New()
	var magic [4]byte
	head := &prefix{buf: magic[:0:4]}
	n, err := io.Copy(io.MultiWriter(h, head), c.r.Body)
	if err != nil {
		c.notice()
		return
	}
	got := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if got != d {
		c.ollamaError(http.StatusBadRequest, fmt.Sprintf("digest mismatch, expected %q, got %q", d, got))
		return
	}
	s.mu.Lock()
	s.blobs[blobKey(d)] = blob{size: n, gguf: string(head.buf) == "GGUF"}
	s.mu.Unlock()
	c.header(http.StatusCreated, "")
	c.writeHeader()
}

// prefix keeps the first cap(buf) bytes written to it.
type prefix struct{ buf []byte }

func (p *prefix) Write(b []byte) (int, error) {
	if room := cap(p.buf) - len(p.buf); room > 0 {
		p.buf = append(p.buf, b[:min(room, len(b))]...)
	}
	return len(b), nil
}

// Push: "retrieving manifest", one "pushing DIGEST12" per layer and the config, "pushing
// manifest", "success".

func (s *Server) push(c *call) {
	var req apiRequest
	if !c.decodeOllama(&req) {
		return
	}
	name := cmp.Or(req.Model, req.Name)
	if name == "" {
		c.ollamaError(http.StatusBadRequest, "model is required")
		return
	}
	s.mu.Lock()
	failure := s.faults.pushError
	s.mu.Unlock()
	ps := c.progressStream(req.streaming())
	if !ps.step(progress{Status: "retrieving manifest"}) {
		return
	}
	m, ok := s.lookup(name)
	if !ok {
		if ps.step(progress{Status: "couldn't retrieve manifest"}) {
			ps.fail(http.StatusInternalServerError, fmt.Sprintf("open %s: no such file or directory", s.manifestPath(name)))
		}
		return
	}
	if failure != "" {
		ps.fail(http.StatusInternalServerError, failure)
		return
	}
	for _, l := range append(slices.Clone(m.layers), configLayer(m)) {
		p := progress{Status: "pushing " + l.digest[7:19], Digest: l.digest, Total: l.size, Completed: l.size}
		if !ps.gap() || !ps.step(p) {
			return
		}
	}
	for _, st := range []string{"pushing manifest", "success"} {
		if st == "success" {
			s.mu.Lock()
			s.pushed[m.key] = m
			s.mu.Unlock()
		}
		if !ps.gap() || !ps.step(progress{Status: st}) {
			return
		}
	}
	ps.done()
}
