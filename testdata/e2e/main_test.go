package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// timings records how long setup and each scenario took, printed at the end.
var timings struct {
	sync.Mutex
	rows []string
}

func recordTiming(name string, d time.Duration, outcome string) {
	timings.Lock()
	defer timings.Unlock()
	timings.rows = append(timings.rows, fmt.Sprintf("  %-34s %8.1fs  %s", name, d.Seconds(), outcome))
}

// scenario marks a test as a scenario: its duration and outcome go into the
// timing table, and it is logged as it starts and ends.
func scenario(t *testing.T) {
	t.Helper()
	start := time.Now()
	fmt.Printf("--- scenario %s\n", t.Name())
	t.Cleanup(func() {
		outcome := "pass"
		if t.Failed() {
			outcome = "FAIL"
		}
		d := time.Since(start)
		fmt.Printf("--- scenario %s: %s in %.1fs\n", t.Name(), outcome, d.Seconds())
		recordTiming(t.Name(), d, outcome)
	})
}

// keepWorkDir keeps the work directory after the run: OLLAMAFLOW_E2E_KEEP=1,
// or a failure (its logs explain it).
var keepWorkDir = os.Getenv("OLLAMAFLOW_E2E_KEEP") == "1"

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	suiteStart := time.Now()
	teardown, err := setup()
	if teardown != nil {
		defer teardown()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e setup failed: %v\n", err)
		if env.workDir != "" {
			keepWorkDir = true
			fmt.Fprintf(os.Stderr, "e2e logs: %s\n", env.workDir)
		}
		return 1
	}
	recordTiming("setup", time.Since(suiteStart), "")
	code := m.Run()
	keepWorkDir = keepWorkDir || code != 0
	recordTiming("total", time.Since(suiteStart), "")
	fmt.Println("e2e timings:")
	for _, r := range timings.rows {
		fmt.Println(r)
	}
	if keepWorkDir {
		fmt.Printf("e2e logs: %s (serve.log per server, caddy.log, wire reports)\n", env.workDir)
	}
	return code
}

// setup starts the three Ollama servers, the registry and Caddy. The returned
// teardown stops whatever was started, also after an error.
func setup() (func(), error) {
	var stops []func()
	teardown := func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}

	env.ollamaBin = os.Getenv("OLLAMAFLOW_E2E_OLLAMA")
	env.modelsDir = os.Getenv("OLLAMAFLOW_E2E_MODELS")
	if env.ollamaBin == "" || env.modelsDir == "" {
		return teardown, fmt.Errorf("set OLLAMAFLOW_E2E_OLLAMA (the ollama binary) and OLLAMAFLOW_E2E_MODELS (the directory with Modelfile.%s and Modelfile.%s); .ci/e2e does this with rig/setup.sh", chatModel, embedModel)
	}
	if st, err := os.Stat(env.ollamaBin); err != nil || st.IsDir() {
		return teardown, fmt.Errorf("OLLAMAFLOW_E2E_OLLAMA=%s is not a file", env.ollamaBin)
	}
	for _, m := range []string{chatModel, embedModel} {
		if _, err := os.Stat(filepath.Join(env.modelsDir, "Modelfile."+m)); err != nil {
			return teardown, fmt.Errorf("OLLAMAFLOW_E2E_MODELS: %w", err)
		}
	}

	env.workDir = os.Getenv("OLLAMAFLOW_E2E_WORKDIR")
	if env.workDir == "" {
		d, err := os.MkdirTemp("", "ollamaflow-e2e-")
		if err != nil {
			return teardown, err
		}
		env.workDir = d
		stops = append(stops, func() {
			if !keepWorkDir {
				os.RemoveAll(d)
			}
		})
	}
	// Caddy keeps its data under XDG_DATA_HOME; keep it out of the user's home.
	os.Setenv("XDG_DATA_HOME", filepath.Join(env.workDir, "xdg-data"))
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(env.workDir, "xdg-config"))

	t0 := time.Now()
	for _, name := range []string{"a", "b", "c"} {
		port, err := freePort()
		if err != nil {
			return teardown, err
		}
		dir := filepath.Join(env.workDir, "ollama-"+name)
		os.RemoveAll(dir) // a kept work directory must not leak models into this run
		env.servers = append(env.servers, &ollamaServer{name: name, port: port, dir: dir})
	}
	errs := make(chan error, len(env.servers))
	for _, s := range env.servers {
		stops = append(stops, s.stop)
		go func() {
			if err := s.start(); err != nil {
				errs <- err
				return
			}
			for _, m := range []string{chatModel, embedModel} {
				if err := s.createModel(m, m); err != nil {
					errs <- fmt.Errorf("server %s: %w", s.name, err)
					return
				}
			}
			errs <- nil
		}()
	}
	for range env.servers {
		if err := <-errs; err != nil {
			return teardown, err
		}
	}
	fmt.Printf("e2e: 3 ollama servers with %s and %s in %.1fs\n", chatModel, embedModel, time.Since(t0).Seconds())

	reg, stopReg, err := startRegistry()
	if err != nil {
		return teardown, err
	}
	stops = append(stops, stopReg)
	env.registry = reg

	ports := make([]int, 4)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return teardown, err
		}
	}
	env.admin = fmt.Sprintf("127.0.0.1:%d", ports[0])
	env.mainURL = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	env.mgmtURL = fmt.Sprintf("http://127.0.0.1:%d", ports[2])
	env.extraURL = fmt.Sprintf("http://127.0.0.1:%d", ports[3])
	t1 := time.Now()
	if err := loadCaddy(caddyfile("")); err != nil {
		return teardown, err
	}
	stops = append(stops, func() { _ = caddy.Stop() })
	fmt.Printf("e2e: caddy loaded in %.1fs (admin %s, main %s, mgmt %s)\n", time.Since(t1).Seconds(), env.admin, env.mainURL, env.mgmtURL)
	for _, s := range env.servers {
		fmt.Printf("e2e: ollama %s on %s\n", s.name, s.url())
	}
	fmt.Printf("e2e: registry on %s\n", env.registry)
	return teardown, nil
}
