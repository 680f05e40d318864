package ollamaflow

// The settings a pooled server uses (credentials, probe settings, …) come
// from the newest config that actually started.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// failingApp is an app that breaks the config it is in, at provision
// (after provisioning the http app, so the handlers are provisioned
// first) or at start.
type failingApp struct {
	At string `json:"at"`
}

func init() { caddy.RegisterModule(failingApp{}) }

func (failingApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "ollamaflow_test_failing", New: func() caddy.Module { return new(failingApp) }}
}

func (a *failingApp) Provision(ctx caddy.Context) error {
	if a.At != "provision" {
		return nil
	}
	if _, err := ctx.App("http"); err != nil {
		return err
	}
	return errors.New("failing at provision, on purpose")
}

func (a *failingApp) Start() error {
	if a.At == "start" {
		return errors.New("failing at start, on purpose")
	}
	return nil
}

func (*failingApp) Stop() error { return nil }

// probeLog records the probes a server receives.
type probeLog struct {
	mu     sync.Mutex
	probes []string // "path|authorization"
}

func (p *probeLog) add(r *http.Request) {
	p.mu.Lock()
	p.probes = append(p.probes, r.URL.Path+"|"+r.Header.Get("Authorization"))
	p.mu.Unlock()
}

func (p *probeLog) since(n int) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.probes[n:]...)
}

func (p *probeLog) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.probes)
}

// loadJSONWithApp adapts a Caddyfile, adds an app to it and posts it to
// /load, returning the status.
func loadJSONWithApp(t *testing.T, cfgfile, app string, appCfg any) (int, string) {
	t.Helper()
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfgfile), nil)
	require.NoError(t, err)
	var cfg map[string]any
	require.NoError(t, json.Unmarshal(adapted, &cfg))
	cfg["apps"].(map[string]any)[app] = appCfg
	raw, err := json.Marshal(cfg)
	require.NoError(t, err)
	res, err := adminRequest(http.MethodPost, "/load", "application/json", string(raw))
	require.NoError(t, err)
	defer res.Body.Close()
	msg, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(msg)
}

func TestFailedReloadChangesNoSettings(t *testing.T) {
	f := fakeollama.NewUnstarted(fakeollama.Config{Models: []string{"tiny-llama"}})
	var log probeLog
	mux := http.NewServeMux()
	mux.Handle("/", f.Handler())
	for _, p := range []string{"/old-health", "/new-health"} {
		mux.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			log.add(r)
			w.WriteHeader(http.StatusOK)
		})
	}
	srv := httptest.NewServer(mux)
	defer srv.Close()
	backend := func(token, uri string) string {
		return fmt.Sprintf("backend a %s {\n\tbearer_token %s\n\thealth_uri %s\n\thealth_interval 20ms\n}", srv.URL, token, uri)
	}

	loadCaddy(t, backend("old-token", "/old-health"))
	require.Eventually(t, func() bool { return log.count() >= 2 }, 10*time.Second, 5*time.Millisecond)

	for _, at := range []string{"provision", "start"} {
		status, msg := loadJSONWithApp(t, caddyConfig(backend("new-token", "/new-health")), "ollamaflow_test_failing", map[string]string{"at": at})
		require.NotEqual(t, http.StatusOK, status, "the config must fail at %s", at)
		require.Contains(t, msg, "on purpose")
		n := log.count()
		require.Eventually(t, func() bool { return log.count() >= n+5 }, 10*time.Second, 5*time.Millisecond)
		for _, p := range log.since(n) {
			assert.Equal(t, "/old-health|Bearer old-token", p, "a config that failed at %s changed the probes", at)
		}
		// The running config still serves, with its own credentials.
		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "Bearer old-token", lastAuth(f, "/api/chat"))
	}

	// A config that starts takes over at once.
	loadCaddy(t, backend("new-token", "/new-health"))
	n := log.count()
	require.Eventually(t, func() bool { return log.count() >= n+3 }, 10*time.Second, 5*time.Millisecond)
	probes := log.since(n)
	assert.Equal(t, "/new-health|Bearer new-token", probes[len(probes)-1])
}

// Two frontends naming one server with different credentials: each request
// carries its own frontend's; probes use one frontend's consistently (the
// one whose name sorts first), whatever order Caddy provisions them in.
func TestTwoFrontendsOneServerCredentials(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer f.Close()
	otherPort := freePort()
	site := func(port int, name string) string {
		return fmt.Sprintf(":%d {\n\tollamaflow {\n\t\tname %s\n\t\tbackend a %s {\n\t\t\tbearer_token %[2]s-token\n\t\t\thealth_interval 20ms\n\t\t}\n\t}\n}\n", port, name, f.URL)
	}
	global := fmt.Sprintf("{\n\tadmin localhost:%d\n\thttp_port %d\n\thttps_port %d\n\tskip_install_trust\n}\n", adminPort, sitePort, tlsPort)
	for round := range 3 { // Caddy provisions sites in map order: try a few
		// Reload with the sites swapped, so the order differs across rounds.
		cfg := global + site(sitePort, "zeta") + site(otherPort, "alpha")
		if round%2 == 1 {
			cfg = global + site(otherPort, "alpha") + site(sitePort, "zeta")
		}
		loadCaddyRaw(t, cfg)
		waitHealthy(t, f.URL, stateHealthy)

		res, body := post(t, "/api/chat", chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "Bearer zeta-token", lastAuth(f, "/api/chat"))
		res, body = send(t, http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/api/chat", otherPort), chatFor("tiny-llama"))
		require.Equal(t, http.StatusOK, res.StatusCode, body)
		assert.Equal(t, "Bearer alpha-token", lastAuth(f, "/api/chat"))

		f.ResetStats()
		require.Eventually(t, func() bool { return f.Count("/") >= 3 }, 10*time.Second, 5*time.Millisecond)
		for _, r := range f.Requests() {
			if r.Path == "/" {
				assert.Equal(t, "Bearer alpha-token", r.Header.Get("Authorization"), "probes use the frontend that sorts first")
			}
		}
	}
}

// lastAuth is the Authorization of the last request to path.
func lastAuth(f *fakeollama.Server, path string) string {
	r, _ := lastRequestTo(f, path)
	return r.Header.Get("Authorization")
}

// lastRequestTo is the last request the fake received on path: probes and
// discovery reach it too, at their own pace.
func lastRequestTo(f *fakeollama.Server, path string) (fakeollama.Request, bool) {
	reqs := f.Requests()
	for i := len(reqs) - 1; i >= 0; i-- {
		if reqs[i].Path == path {
			return reqs[i], true
		}
	}
	return fakeollama.Request{}, false
}
