package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestFakeConformanceTests runs the root module's conformance tests
// (internal/fakeollama: TestConformsToRealOllama and
// TestManagementConformsToRealOllama) against a real Ollama of their own, the
// way a developer runs them with FAKEOLLAMA_REAL_URL against theirs. They
// create and delete models there; afterwards the server must list exactly the
// models it started with, so a test that leaves one behind fails here even if
// its own clean-up check were wrong.
func TestFakeConformanceTests(t *testing.T) {
	scenario(t)
	srv := &ollamaServer{name: "conformance", dir: filepath.Join(env.workDir, "ollama-conformance")}
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	srv.port = port
	_ = os.RemoveAll(srv.dir)
	if err := srv.start(); err != nil {
		t.Fatalf("arranging: %v", err)
	}
	t.Cleanup(srv.stop)
	for _, m := range []string{chatModel, embedModel} {
		if err := srv.createModel(m, m); err != nil {
			t.Fatalf("arranging: %v", err)
		}
	}
	before, err := srv.models()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(before)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "test", "-count=1", "-v",
		"-run", "^(TestConformsToRealOllama|TestManagementConformsToRealOllama)$", "./internal/fakeollama")
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(),
		"FAKEOLLAMA_REAL_URL="+srv.url(),
		"FAKEOLLAMA_GGUF="+filepath.Join(env.modelsDir, chatModel+".gguf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("go test ./internal/fakeollama against %s: %v\n%s", srv.url(), err, out)
	}
	// Skipped is not passed: the variable must have reached them.
	for _, name := range []string{"TestConformsToRealOllama", "TestManagementConformsToRealOllama"} {
		if !strings.Contains(string(out), "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass against %s:\n%s", name, srv.url(), out)
		}
	}

	after, err := srv.models()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(after)
	if !slices.Equal(before, after) {
		t.Errorf("the conformance tests left the server with models %v; it had %v", after, before)
	}
}
