package e2e

// The rig: real Ollama servers, the OCI registry and Caddy, and the helpers
// scenarios use to arrange and inspect them.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/ollama/ollama/api"

	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-ollamaflow/ollamaflow"
)

const (
	chatModel  = "tiny-llama"
	embedModel = "tiny-bert"
)

// modelRefresh is the backends' model_refresh: how often the proxy reads each
// server's /api/tags and /api/ps.
const modelRefresh = 2 * time.Second

// env is what TestMain set up; scenarios read it.
var env struct {
	ollamaBin string
	modelsDir string
	workDir   string

	servers  []*ollamaServer // a, b, c
	registry string          // host:port of the OCI registry
	admin    string          // host:port of Caddy's admin endpoint
	mainURL  string          // frontend "main": completions, embeddings, reads
	mgmtURL  string          // frontend "mgmt": the same backends, allow_model_management
	extraURL string          // a third site scenarios configure for themselves
}

// freePort asks the kernel for a free loopback port. Another process could
// take it before we listen again; on a test machine that is rare enough.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// ollamaServer is one real `ollama serve` with its own model store.
type ollamaServer struct {
	name string
	port int
	dir  string
	env  []string // more of the server's environment (OLLAMA_MAX_LOADED_MODELS=2)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func (o *ollamaServer) hostPort() string { return fmt.Sprintf("127.0.0.1:%d", o.port) }
func (o *ollamaServer) url() string      { return "http://" + o.hostPort() }

// client talks to this server directly, bypassing the proxy: for arranging
// and checking, never for the behaviour under test.
func (o *ollamaServer) client() *api.Client {
	u, _ := url.Parse(o.url())
	return api.NewClient(u, &http.Client{Timeout: 2 * time.Minute})
}

// noHub is the HTTPS proxy every ollama process gets: a loopback port nothing
// listens on. Ollama's model hub is then unreachable on every machine, with
// or without internet access, and a pull from it fails with the same message
// everywhere (the wire comparison depends on it). Loopback registries, the
// suite's own included, are never proxied.
const noHub = "http://127.0.0.1:1"

// noHubError is how a manifest request to the hub fails through noHub.
func noHubError(model string) string {
	return `pull model manifest: Get "https://registry.ollama.ai/v2/library/` + model + `/manifests/latest": proxyconnect tcp: dial tcp 127.0.0.1:1: connect: connection refused`
}

// ollamaEnv is the environment of every ollama process we run: the caller's
// without its OLLAMA_* and proxy settings, plus ours.
func ollamaEnv(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(name) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY":
			continue
		}
		if !strings.HasPrefix(kv, "OLLAMA_") {
			out = append(out, kv)
		}
	}
	return append(append(out, "HTTPS_PROXY="+noHub), extra...)
}

// start runs `ollama serve` and waits until it answers. Its store survives a
// kill, so a restarted server has the models it had.
func (o *ollamaServer) start() error {
	for _, d := range []string{"home", "models"} {
		if err := os.MkdirAll(filepath.Join(o.dir, d), 0o755); err != nil {
			return err
		}
	}
	logf, err := os.OpenFile(filepath.Join(o.dir, "serve.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(env.ollamaBin, "serve")
	cmd.Env = ollamaEnv(
		"HOME="+filepath.Join(o.dir, "home"),
		"OLLAMA_HOST="+o.hostPort(),
		"OLLAMA_MODELS="+filepath.Join(o.dir, "models"),
		"GIN_MODE=release",
	)
	cmd.Env = append(cmd.Env, o.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so that killing it takes its model runners too;
	// and a dying test binary takes the server with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start ollama %s: %w", o.name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	o.mu.Lock()
	o.cmd, o.done = cmd, done
	o.mu.Unlock()

	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("ollama %s exited at start; see %s", o.name, filepath.Join(o.dir, "serve.log"))
		default:
		}
		if _, err := o.client().Version(context.Background()); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("ollama %s did not answer on %s within 20s", o.name, o.hostPort())
}

// kill ends the server and its runners at once, as a crash would.
func (o *ollamaServer) kill() { o.signal(syscall.SIGKILL) }

// stop ends the server gracefully, and forcefully after 5 seconds.
func (o *ollamaServer) stop() {
	o.mu.Lock()
	done := o.done
	o.mu.Unlock()
	if done == nil {
		return
	}
	o.signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		o.kill()
	}
}

func (o *ollamaServer) signal(sig syscall.Signal) {
	o.mu.Lock()
	cmd, done := o.cmd, o.done
	o.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, sig)
	if sig == syscall.SIGKILL {
		<-done
	}
}

// cli runs the ollama CLI against host (a server or the proxy) in dir.
func cli(ctx context.Context, host, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, env.ollamaBin, args...)
	cmd.Dir = dir
	cmd.Env = ollamaEnv("OLLAMA_HOST="+host, "HOME="+filepath.Join(env.workDir, "cli-home"), "TERM=dumb", "NO_COLOR=1")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("ollama %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// createModel creates name on the server from Modelfile.<from> in the models
// directory, the way a user would.
func (o *ollamaServer) createModel(name, from string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := cli(ctx, o.hostPort(), env.modelsDir, "create", name, "-f", "Modelfile."+from)
	return err
}

// deleteModel removes name from the server; a missing model is not an error.
func (o *ollamaServer) deleteModel(name string) error {
	err := o.client().Delete(context.Background(), &api.DeleteRequest{Model: name})
	var se api.StatusError
	if errors.As(err, &se) && se.StatusCode == http.StatusNotFound {
		return nil
	}
	return err
}

// models lists the server's model names as /api/tags gives them.
func (o *ollamaServer) models() ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := o.client().List(ctx)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, m := range list.Models {
		names = append(names, m.Name)
	}
	return names, nil
}

func (o *ollamaServer) has(model string) bool {
	names, err := o.models()
	return err == nil && slices.Contains(names, model)
}

// startRegistry serves an in-memory OCI registry (go-containerregistry's) on
// a free loopback port, for `ollama push --insecure` and pulls of
// host:port/library/name:tag.
func startRegistry() (string, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: &ollamaRegistry{inner: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}}
	go func() { _ = srv.Serve(l) }()
	return l.Addr().String(), func() { _ = srv.Close() }, nil
}

// ollamaRegistry adapts a plain OCI registry to two expectations of Ollama's
// registry client, which is written against its own registry and CDN:
//
//   - a blob download is answered with a redirect to another host, where the
//     bytes are (Ollama follows that redirect only when the host differs), so
//     a blob GET on 127.0.0.1 is sent to localhost, the same listener under
//     another name, marked so that it is served there and not sent on again;
//   - upload locations are absolute URLs, while go-containerregistry gives
//     paths.
type ollamaRegistry struct {
	inner http.Handler
}

// servedHere marks a blob request that was already redirected.
const servedHere = "served-here"

func (g *ollamaRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	isBlobGet := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
	switch {
	case isBlobGet && !q.Has(servedHere):
		host := r.Host
		if h, port, err := net.SplitHostPort(r.Host); err == nil && h == "127.0.0.1" {
			host = net.JoinHostPort("localhost", port)
		}
		http.Redirect(w, r, "http://"+host+r.URL.Path+"?"+servedHere+"=1", http.StatusTemporaryRedirect)
		return
	case q.Has(servedHere):
		q.Del(servedHere)
		r.URL.RawQuery = q.Encode()
	}
	g.inner.ServeHTTP(&absoluteLocation{ResponseWriter: w, base: "http://" + r.Host}, r)
}

// absoluteLocation prefixes a path-only Location header with the registry's
// own base URL as the response goes out.
type absoluteLocation struct {
	http.ResponseWriter
	base string
}

func (w *absoluteLocation) WriteHeader(code int) {
	if loc := w.Header().Get("Location"); strings.HasPrefix(loc, "/") {
		w.Header().Set("Location", w.base+loc)
	}
	w.ResponseWriter.WriteHeader(code)
}

// Caddy.

// backendsBlock is the backend lines for the three servers. Health is probed
// every second so that a killed server is noticed and a restarted one comes
// back quickly; model lists are read every 2 seconds so that scenarios can
// wait a known time for the proxy to see a change made behind its back.
func backendsBlock() string {
	var b strings.Builder
	for _, s := range env.servers {
		fmt.Fprintf(&b, "\t\tbackend %s %s {\n\t\t\thealth_interval 1s\n\t\t\tmodel_refresh %s\n\t\t}\n", s.name, s.hostPort(), modelRefresh)
	}
	return b.String()
}

// caddyfile is the suite's Caddy config: the main and mgmt frontends, plus
// extra, the body of a third frontend's ollamaflow block (none if empty).
func caddyfile(extra string) string {
	site := func(u, name, opts string) string {
		return fmt.Sprintf("%s {\n\tollamaflow {\n\t\tname %s\n%s%s\t}\n}\n", u, name, opts, backendsBlock())
	}
	cfg := fmt.Sprintf(`{
	admin %s
	auto_https off
	persist_config off
	storage file_system %s
	log {
		output file %s
		level INFO
	}
}
`, env.admin, filepath.Join(env.workDir, "caddy-data"), filepath.Join(env.workDir, "caddy.log"))
	cfg += site(env.mainURL, "main", "")
	cfg += site(env.mgmtURL, "mgmt", "\t\tallow_model_management\n")
	if extra != "" {
		cfg += site(env.extraURL, "extra", extra)
	}
	return cfg
}

// loadCaddy adapts the Caddyfile and (re)loads Caddy with it in-process.
func loadCaddy(cfg string) error {
	adapter := caddyconfig.GetAdapter("caddyfile")
	js, warns, err := adapter.Adapt([]byte(cfg), nil)
	if err != nil {
		return fmt.Errorf("adapting the Caddyfile: %w", err)
	}
	for _, w := range warns {
		fmt.Fprintf(os.Stderr, "caddyfile warning: %s\n", w.String())
	}
	if err := caddy.Load(js, true); err != nil {
		return fmt.Errorf("loading the config: %w", err)
	}
	// Load returns once the old servers have begun to shut down, not once
	// they stopped accepting: they share the listening socket with the new
	// ones, and a connection the old one accepts in that window is closed
	// unanswered (TestFailover's first three requests, sent 0-1 ms after the
	// previous scenario's reload, got EOF and resets in CI). A moment lets
	// the old accept loops end.
	time.Sleep(250 * time.Millisecond)
	// A load stops the old server, which closes its kept-alive
	// connections; a POST sent on one the client still thinks open fails
	// with a reset and is not retried (TestFailover's first requests did,
	// in CI). The tests' clients start on fresh connections.
	httpClient.CloseIdleConnections()
	if tr, ok := http.DefaultTransport.(*http.Transport); ok {
		tr.CloseIdleConnections()
	}
	return nil
}

// useConfig loads the base config plus a third frontend for the duration of
// the test, and the base config again afterwards.
func useConfig(t *testing.T, extra string) {
	t.Helper()
	if err := loadCaddy(caddyfile(extra)); err != nil {
		t.Fatalf("caddy: %v", err)
	}
	t.Cleanup(func() {
		if err := loadCaddy(caddyfile("")); err != nil {
			t.Errorf("caddy: restoring the base config: %v", err)
		}
	})
}

// HTTP helpers.

var httpClient = &http.Client{Timeout: 2 * time.Minute}

// postJSON posts body to base+path and returns the response with its body read.
func postJSON(base, path, body string) (*http.Response, []byte, error) {
	res, err := httpClient.Post(base+path, "application/json", strings.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res, b, err
}

func getJSON(u string, v any) error {
	res, err := httpClient.Get(u)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", u, res.Status, b)
	}
	return json.Unmarshal(b, v)
}

// proxyClient is the official Go client pointed at a frontend.
func proxyClient(base string) *api.Client {
	u, _ := url.Parse(base)
	return api.NewClient(u, &http.Client{Timeout: 2 * time.Minute})
}

// eventually polls cond every 200ms until it holds or timeout passes.
func eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitAllServing waits until the main frontend answers a chat on every
// backend: after a restart, the health checker must have seen the server.
func waitAllServing(timeout time.Duration) error {
	seen := map[string]bool{}
	ok := eventually(timeout, func() bool {
		res, _, err := postJSON(env.mainURL, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false}`)
		if err == nil && res.StatusCode == http.StatusOK {
			seen[res.Header.Get("X-OllamaFlow-Backend")] = true
		}
		return len(seen) == len(env.servers)
	})
	if !ok {
		return fmt.Errorf("not every backend served within %s (served: %v)", timeout, seen)
	}
	return nil
}
