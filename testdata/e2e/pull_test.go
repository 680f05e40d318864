package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
)

// TestCLIPullThroughProxy: `ollama pull --insecure` from the private registry
// through a frontend with allow_model_management lands the model on all 3
// servers, and the CLI shows the proxy's merged progress ending in success.
func TestCLIPullThroughProxy(t *testing.T) {
	scenario(t)
	ctx := context.Background()
	model := env.registry + "/library/pulled-llama:latest"
	a := env.servers[0].client()
	t.Cleanup(func() {
		for _, s := range env.servers {
			if err := s.deleteModel(model); err != nil {
				t.Errorf("cleanup: deleting %s on %s: %v", model, s.name, err)
			}
		}
	})
	if err := a.Copy(ctx, &api.CopyRequest{Source: chatModel, Destination: model}); err != nil {
		t.Fatalf("arranging: ollama cp: %v", err)
	}
	if err := a.Push(ctx, &api.PushRequest{Model: model, Insecure: true}, func(api.ProgressResponse) error { return nil }); err != nil {
		t.Fatalf("arranging: ollama push: %v", err)
	}
	if err := env.servers[0].deleteModel(model); err != nil {
		t.Fatalf("arranging: %v", err)
	}

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
