package e2e

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestOpenAIClient drives the proxy's /v1 API with the official OpenAI Go SDK.
func TestOpenAIClient(t *testing.T) {
	scenario(t)
	ctx := context.Background()
	// No SDK retries: an error from the proxy must reach the test.
	c := openai.NewClient(option.WithBaseURL(env.mainURL+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
	chat := openai.ChatCompletionNewParams{
		Model:     chatModel,
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		MaxTokens: openai.Int(8),
	}

	t.Run("ChatCompletion", func(t *testing.T) {
		res, err := c.Chat.Completions.New(ctx, chat)
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Choices) != 1 || res.Choices[0].Message.Content == "" || res.Choices[0].FinishReason != "length" {
			t.Fatalf("want one choice with content and finish_reason length, got %+v", res.Choices)
		}
		if res.Usage.CompletionTokens != 8 {
			t.Errorf("usage.completion_tokens: want 8, got %d", res.Usage.CompletionTokens)
		}
	})

	t.Run("ChatCompletionStreaming", func(t *testing.T) {
		params := chat
		params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
		stream := c.Chat.Completions.NewStreaming(ctx, params)
		var chunks []openai.ChatCompletionChunk
		for stream.Next() {
			chunks = append(chunks, stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatalf("stream ended with an error after %d chunks: %v", len(chunks), err)
		}
		// 8 token chunks, one with finish_reason, one with usage and no choices.
		var text strings.Builder
		tokens, finish, usage := 0, "", int64(0)
		for _, ch := range chunks {
			if len(ch.Choices) == 1 {
				if d := ch.Choices[0].Delta.Content; d != "" {
					tokens++
					text.WriteString(d)
				}
				if f := ch.Choices[0].FinishReason; f != "" {
					finish = f
				}
			}
			if ch.Usage.CompletionTokens > 0 {
				usage = ch.Usage.CompletionTokens
			}
		}
		if tokens != 8 || finish != "length" || usage != 8 {
			t.Fatalf("want 8 token chunks, finish_reason length and usage of 8 tokens; got %d chunks with text, finish %q, usage %d (of %d chunks)", tokens, finish, usage, len(chunks))
		}
	})

	t.Run("ChatCompletionStreamingRaw", func(t *testing.T) {
		// The SDK ends a stream quietly on EOF; only the wire shows whether the
		// stream really ended with [DONE], chunk by chunk.
		res, err := httpClient.Post(env.mainURL+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":8}`))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		if ct := res.Header.Get("Content-Type"); res.StatusCode != http.StatusOK || ct != "text/event-stream" {
			t.Fatalf("want 200 text/event-stream, got %d %q", res.StatusCode, ct)
		}
		if b := res.Header.Get("X-OllamaFlow-Backend"); !slices.Contains([]string{"a", "b", "c"}, b) {
			t.Errorf("X-OllamaFlow-Backend: want a, b or c, got %q", b)
		}
		var events []string
		sc := bufio.NewScanner(res.Body)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				events = append(events, data)
			}
		}
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
		if len(events) != 10 || events[9] != "[DONE]" || !strings.Contains(events[8], `"finish_reason":"length"`) {
			t.Fatalf("want 8 token events, a finish event and [DONE], got %d: %q", len(events), events)
		}
	})

	t.Run("Embeddings", func(t *testing.T) {
		res, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{
			Model: embedModel,
			Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"hello", "world"}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Data) != 2 || len(res.Data[0].Embedding) != 32 || res.Data[1].Index != 1 {
			t.Fatalf("want 2 embeddings of 32 dimensions, got %d", len(res.Data))
		}
	})

	t.Run("ModelsList", func(t *testing.T) {
		page, err := c.Models.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, m := range page.Data {
			ids = append(ids, m.ID)
		}
		for _, want := range []string{chatModel + ":latest", embedModel + ":latest"} {
			if n := count(ids, want); n != 1 {
				t.Errorf("models list: %s listed %d times, want once: %v", want, n, ids)
			}
		}
	})

	t.Run("ModelsGet", func(t *testing.T) {
		m, err := c.Models.Get(ctx, chatModel)
		if err != nil {
			t.Fatal(err)
		}
		if m.ID != chatModel {
			t.Errorf("want id %s, got %q", chatModel, m.ID)
		}
	})

	t.Run("MissingModel", func(t *testing.T) {
		params := chat
		params.Model = "no-such-model"
		_, err := c.Chat.Completions.New(ctx, params)
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) {
			t.Fatalf("want an *openai.Error, got %T %v", err, err)
		}
		if apiErr.StatusCode != http.StatusNotFound || !strings.Contains(apiErr.Message, "no-such-model") {
			t.Fatalf("want 404 naming the model, got %d %q (type %q, code %q)", apiErr.StatusCode, apiErr.Message, apiErr.Type, apiErr.Code)
		}
	})
}
