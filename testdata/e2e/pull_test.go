package e2e

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestCLIPullThroughProxy: `ollama pull --insecure` from the private registry
// through a frontend with allow_model_management lands the model on all 3
// servers, and the CLI shows the proxy's merged progress ending in success.
func TestCLIPullThroughProxy(t *testing.T) {
	scenario(t)
	ctx := context.Background()
	model := env.registry + "/library/pulled-llama:latest"
	publishToRegistry(t, model)

	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := cli(cctx, strings.TrimPrefix(env.mgmtURL, "http://"), env.workDir, "pull", "--insecure", model)
	if err != nil {
		t.Fatalf("ollama pull through the proxy: %v\n%s", err, out)
	}
	t.Logf("ollama pull printed:\n%s", out)
	for _, want := range []string{"pulling manifest", "success"} {
		if !strings.Contains(out, want) {
			t.Errorf("ollama pull output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Error") {
		t.Errorf("ollama pull reported an error:\n%s", out)
	}
	for _, s := range env.servers {
		if !s.has(model) {
			names, _ := s.models()
			t.Errorf("after ollama pull through the proxy, %s lacks %s: %v", s.name, model, names)
		}
	}

	// Through the main frontend (no model management) the same pull is refused.
	out, err = cli(cctx, strings.TrimPrefix(env.mainURL, "http://"), env.workDir, "pull", "--insecure", model)
	if err == nil || !strings.Contains(out+err.Error(), "allow_model_management") {
		t.Errorf("pull through a frontend without model management: want a refusal naming allow_model_management, got err=%v:\n%s", err, out)
	}
}
