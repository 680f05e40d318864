package e2e

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/types/model"
)

// backendRecorder remembers the X-OllamaFlow-Backend header of every response,
// by request path.
type backendRecorder struct {
	mu   sync.Mutex
	seen map[string][]string
}

func (r *backendRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	res, err := http.DefaultTransport.RoundTrip(req)
	if err == nil {
		r.mu.Lock()
		if r.seen == nil {
			r.seen = map[string][]string{}
		}
		r.seen[req.URL.Path] = append(r.seen[req.URL.Path], res.Header.Get("X-OllamaFlow-Backend"))
		r.mu.Unlock()
	}
	return res, err
}

func (r *backendRecorder) backends(path string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen[path])
}

// TestGoClient drives the proxy with Ollama's own Go client, the one the CLI
// and many Go programs use.
func TestGoClient(t *testing.T) {
	scenario(t)
	rec := &backendRecorder{}
	u, _ := url.Parse(env.mainURL)
	c := api.NewClient(u, &http.Client{Timeout: 2 * time.Minute, Transport: rec})
	ctx := context.Background()
	stream, noStream := true, false
	opts := map[string]any{"num_predict": 8}
	hi := []api.Message{{Role: "user", Content: "hi"}}

	t.Run("List", func(t *testing.T) {
		list, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, m := range list.Models {
			names = append(names, m.Name)
		}
		for _, want := range []string{chatModel + ":latest", embedModel + ":latest"} {
			if n := count(names, want); n != 1 {
				t.Errorf("List: %s listed %d times, want once (the union over 3 servers): %v", want, n, names)
			}
		}
	})

	t.Run("ChatNotStreaming", func(t *testing.T) {
		var calls []api.ChatResponse
		err := c.Chat(ctx, &api.ChatRequest{Model: chatModel, Messages: hi, Stream: &noStream, Options: opts}, func(r api.ChatResponse) error {
			calls = append(calls, r)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(calls) != 1 || !calls[0].Done || calls[0].Message.Content == "" || calls[0].EvalCount != 8 {
			t.Fatalf("Chat stream=false: want one done response with content and eval_count 8, got %+v", calls)
		}
		assertBackendHeader(t, rec, "/api/chat")
	})

	t.Run("ChatStreaming", func(t *testing.T) {
		var calls []api.ChatResponse
		err := c.Chat(ctx, &api.ChatRequest{Model: chatModel, Messages: hi, Stream: &stream, Options: opts}, func(r api.ChatResponse) error {
			calls = append(calls, r)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// tiny-llama emits one chunk per token, then a final chunk.
		if len(calls) != 9 {
			t.Fatalf("Chat streaming: want 8 token chunks and a final one, got %d", len(calls))
		}
		for i, r := range calls[:8] {
			if r.Done || r.Message.Content == "" {
				t.Errorf("chunk %d: want a token, got %+v", i, r)
			}
		}
		if last := calls[8]; !last.Done || last.DoneReason != "length" || last.EvalCount != 8 {
			t.Errorf("final chunk: want done, done_reason length, eval_count 8, got %+v", last)
		}
	})

	t.Run("GenerateNotStreaming", func(t *testing.T) {
		var calls []api.GenerateResponse
		err := c.Generate(ctx, &api.GenerateRequest{Model: chatModel, Prompt: "hi", Stream: &noStream, Options: opts}, func(r api.GenerateResponse) error {
			calls = append(calls, r)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(calls) != 1 || !calls[0].Done || calls[0].Response == "" || len(calls[0].Context) == 0 {
			t.Fatalf("Generate stream=false: want one done response with text and context, got %+v", calls)
		}
		assertBackendHeader(t, rec, "/api/generate")
	})

	t.Run("GenerateStreaming", func(t *testing.T) {
		var calls []api.GenerateResponse
		err := c.Generate(ctx, &api.GenerateRequest{Model: chatModel, Prompt: "hi", Stream: &stream, Options: opts}, func(r api.GenerateResponse) error {
			calls = append(calls, r)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(calls) != 9 || !calls[8].Done || calls[8].EvalCount != 8 {
			t.Fatalf("Generate streaming: want 8 token chunks and a final one with eval_count 8, got %d: %+v", len(calls), calls)
		}
	})

	t.Run("Embed", func(t *testing.T) {
		res, err := c.Embed(ctx, &api.EmbedRequest{Model: embedModel, Input: []string{"hello", "world"}})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Embeddings) != 2 || len(res.Embeddings[0]) != 32 {
			t.Fatalf("Embed: want 2 vectors of 32 dimensions, got %d", len(res.Embeddings))
		}
		assertBackendHeader(t, rec, "/api/embed")
	})

	t.Run("Show", func(t *testing.T) {
		res, err := c.Show(ctx, &api.ShowRequest{Model: chatModel})
		if err != nil {
			t.Fatal(err)
		}
		if res.Details.Family != "llama" || !slices.Contains(res.Capabilities, model.CapabilityCompletion) {
			t.Fatalf("Show: want family llama with the completion capability, got %+v %v", res.Details, res.Capabilities)
		}
	})

	t.Run("ListRunning", func(t *testing.T) {
		// The chats above loaded tiny-llama on at least one server.
		ps, err := c.ListRunning(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, m := range ps.Models {
			names = append(names, m.Name)
		}
		if !slices.Contains(names, chatModel+":latest") {
			t.Fatalf("ListRunning: want %s:latest among the loaded models, got %v", chatModel, names)
		}
	})

	t.Run("Version", func(t *testing.T) {
		v, err := c.Version(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if v != "0.17.4" {
			t.Fatalf("Version: want 0.17.4, got %q", v)
		}
	})

	t.Run("MissingModel", func(t *testing.T) {
		calls := []func() error{
			func() error {
				return c.Chat(ctx, &api.ChatRequest{Model: "no-such-model", Messages: hi, Stream: &noStream}, func(api.ChatResponse) error { return nil })
			},
			func() error {
				return c.Chat(ctx, &api.ChatRequest{Model: "no-such-model", Messages: hi, Stream: &stream}, func(api.ChatResponse) error { return nil })
			},
			func() error {
				return c.Generate(ctx, &api.GenerateRequest{Model: "no-such-model", Prompt: "hi"}, func(api.GenerateResponse) error { return nil })
			},
			func() error {
				_, err := c.Embed(ctx, &api.EmbedRequest{Model: "no-such-model", Input: "hi"})
				return err
			},
			func() error { _, err := c.Show(ctx, &api.ShowRequest{Model: "no-such-model"}); return err },
		}
		for i, call := range calls {
			err := call()
			var se api.StatusError
			if !errors.As(err, &se) {
				t.Errorf("call %d: want an api.StatusError, got %T %v", i, err, err)
				continue
			}
			if se.StatusCode != http.StatusNotFound || !strings.Contains(se.ErrorMessage, "no-such-model") {
				t.Errorf("call %d: want 404 naming the model, got %d %q", i, se.StatusCode, se.ErrorMessage)
			}
		}
	})
}

func count(names []string, want string) int {
	n := 0
	for _, s := range names {
		if s == want {
			n++
		}
	}
	return n
}

func assertBackendHeader(t *testing.T, rec *backendRecorder, path string) {
	t.Helper()
	seen := rec.backends(path)
	if len(seen) == 0 {
		t.Errorf("%s: no response recorded", path)
		return
	}
	if b := seen[len(seen)-1]; !slices.Contains([]string{"a", "b", "c"}, b) {
		t.Errorf("%s: X-OllamaFlow-Backend is %q, want a, b or c", path, b)
	}
}
