package e2e

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
)

// TestRequiredModelSync: a model pushed to a private registry and listed in
// required_models (with insecure_pulls) is pulled onto every server, and then
// every server serves it.
func TestRequiredModelSync(t *testing.T) {
	scenario(t)
	model := env.registry + "/library/sync-llama:latest"

	publishToRegistry(t, model)

	start := time.Now()
	useConfig(t, fmt.Sprintf("\t\tlb_policy round_robin\n\t\trequired_models %s\n\t\tinsecure_pulls\n", model))

	for _, s := range env.servers {
		if !eventually(90*time.Second, func() bool { return s.has(model) }) {
			names, _ := s.models()
			t.Fatalf("server %s did not get %s within 90s: it has %v", s.name, model, names)
		}
	}
	t.Logf("pulled onto all 3 servers %.1fs after the config load", time.Since(start).Seconds())

	// Served by all: round robin over the three servers, each of which now has
	// the model (discovery may lag the pull by one refresh).
	seen := map[string]int{}
	var lastErr string
	ok := eventually(60*time.Second, func() bool {
		res, body, err := postJSON(env.extraURL, "/api/chat", fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":2}}`, model))
		switch {
		case err != nil:
			lastErr = err.Error()
		case res.StatusCode != http.StatusOK:
			lastErr = fmt.Sprintf("%d %s", res.StatusCode, body)
		default:
			seen[res.Header.Get("X-OllamaFlow-Backend")]++
		}
		return len(seen) == len(env.servers)
	})
	if !ok {
		t.Fatalf("the synced model was not served by every server within 60s: served by %v; last error: %s", seen, lastErr)
	}
}

// publishToRegistry copies tiny-llama to model (a name in the test registry)
// on server a, pushes it, and removes it there again, so that the registry
// has it and no server does. Every server drops it when the test ends.
func publishToRegistry(t *testing.T, model string) {
	t.Helper()
	ctx := context.Background()
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
	var last api.ProgressResponse
	if err := a.Push(ctx, &api.PushRequest{Model: model, Insecure: true}, func(p api.ProgressResponse) error { last = p; return nil }); err != nil {
		t.Fatalf("arranging: ollama push to the registry: %v", err)
	}
	if last.Status != "success" {
		t.Fatalf("arranging: push ended with %q", last.Status)
	}
	if err := env.servers[0].deleteModel(model); err != nil {
		t.Fatalf("arranging: %v", err)
	}
}
