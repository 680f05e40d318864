package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCLI runs the ollama CLI with OLLAMA_HOST pointing at the proxy.
func TestCLI(t *testing.T) {
	scenario(t)
	host := strings.TrimPrefix(env.mainURL, "http://")
	run := func(t *testing.T, host string, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := cli(ctx, host, env.workDir, args...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}

	t.Run("List", func(t *testing.T) {
		out := run(t, host, "list")
		for _, want := range []string{chatModel + ":latest", embedModel + ":latest"} {
			if n := strings.Count(out, want); n != 1 {
				t.Errorf("ollama list: %s appears %d times, want once:\n%s", want, n, out)
			}
		}
	})

	t.Run("Run", func(t *testing.T) {
		out := run(t, host, "run", chatModel, "hi")
		if strings.TrimSpace(out) == "" {
			t.Fatal("ollama run printed nothing")
		}
	})

	t.Run("Ps", func(t *testing.T) {
		out := run(t, host, "ps")
		if !strings.Contains(out, chatModel+":latest") {
			t.Fatalf("ollama ps: want %s:latest listed (ollama run just loaded it):\n%s", chatModel, out)
		}
	})

	t.Run("CreateOnEveryServer", func(t *testing.T) {
		// Through the management frontend, from a Modelfile in another
		// directory: the CLI uploads the GGUF blob and then creates; both must
		// reach all three servers.
		const name = "cli-created"
		t.Cleanup(func() {
			for _, s := range env.servers {
				if err := s.deleteModel(name); err != nil {
					t.Errorf("cleanup: deleting %s on %s: %v", name, s.name, err)
				}
			}
		})
		dir := t.TempDir()
		mf := "FROM " + filepath.Join(env.modelsDir, chatModel+".gguf") + "\nPARAMETER num_predict 4\nPARAMETER num_thread 1\n"
		if err := os.WriteFile(filepath.Join(dir, "Modelfile"), []byte(mf), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := cli(ctx, strings.TrimPrefix(env.mgmtURL, "http://"), dir, "create", name, "-f", "Modelfile")
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range env.servers {
			if !s.has(name + ":latest") {
				names, _ := s.models()
				t.Errorf("after ollama create through the proxy, server %s lacks %s: %v\nCLI output:\n%s", s.name, name, names, out)
			}
		}
		// And it serves: a chat through the main frontend.
		res, body, err := postJSON(env.mainURL, "/api/chat", `{"model":"`+name+`","messages":[{"role":"user","content":"hi"}],"stream":false}`)
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode != 200 {
			t.Errorf("chat with the created model: %d %s", res.StatusCode, body)
		}
	})
}
