package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// bearerTransport adds an API key to every request, as a client configured
// with one does (the Ollama Go client has no option for it).
type bearerTransport struct{ key string }

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.key)
	return http.DefaultTransport.RoundTrip(r)
}

// tenantUsage reads one tenant's totals from GET /ollamaflow/usage once
// they count at least requests requests: each is counted as its handler
// returns, a moment after the client has its answer.
func tenantUsage(t *testing.T, tenant string, requests int64) (byStatus map[string]int64, prompt, completion int64, rejections map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		byStatus, prompt, completion, rejections = readTenantUsage(t, tenant)
		n := int64(0)
		for _, c := range byStatus {
			n += c
		}
		if n >= requests || time.Now().After(deadline) {
			return byStatus, prompt, completion, rejections
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readTenantUsage(t *testing.T, tenant string) (byStatus map[string]int64, prompt, completion int64, rejections map[string]int64) {
	t.Helper()
	var rep struct {
		Frontends []struct {
			Frontend string
			Tenants  []struct {
				Tenant string
				Total  struct {
					ByStatus         map[string]int64 `json:"by_status"`
					PromptTokens     int64            `json:"prompt_tokens"`
					CompletionTokens int64            `json:"completion_tokens"`
					Rejections       map[string]int64
				}
			}
		}
	}
	if err := getJSON("http://"+env.admin+"/ollamaflow/usage", &rep); err != nil {
		t.Fatal(err)
	}
	for _, f := range rep.Frontends {
		for _, tu := range f.Tenants {
			if f.Frontend == "extra" && tu.Tenant == tenant {
				return tu.Total.ByStatus, tu.Total.PromptTokens, tu.Total.CompletionTokens, tu.Total.Rejections
			}
		}
	}
	t.Fatalf("no usage of tenant %s on frontend extra", tenant)
	return nil, 0, 0, nil
}

// TestTenants drives a frontend with tenants through the official OpenAI
// and Ollama Go clients: keys, a model allow-list, request and token
// limits with the SDK's own retry after 429, and usage totals against what
// the real servers reported.
func TestTenants(t *testing.T) {
	scenario(t)
	ctx := context.Background()
	const appKey, burstKey, tokKey = "sk-e2e-app-1f2e3d", "sk-e2e-burst-4c5b6a", "sk-e2e-tok-7d8e9f"
	t.Setenv("E2E_APP_KEY", appKey)
	t.Setenv("E2E_TOK_KEY", tokKey)
	sum := sha256.Sum256([]byte(burstKey))
	useConfig(t, fmt.Sprintf(`		tenants {
			tenant app {
				key {env.E2E_APP_KEY}
				models %s
			}
			tenant burst {
				key sha256:%s
				requests_per_minute 60
			}
			tenant tok {
				key {env.E2E_TOK_KEY}
				tokens_per_minute 40
			}
		}
`, chatModel, hex.EncodeToString(sum[:])))
	base := env.extraURL + "/v1/"
	chat := openai.ChatCompletionNewParams{
		Model:     chatModel,
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		MaxTokens: openai.Int(4),
	}

	t.Run("WrongKey", func(t *testing.T) {
		c := openai.NewClient(option.WithBaseURL(base), option.WithAPIKey("sk-e2e-wrong"), option.WithMaxRetries(0))
		_, err := c.Chat.Completions.New(ctx, chat)
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized || apiErr.Code != "invalid_api_key" {
			t.Fatalf("want 401 invalid_api_key, got %v", err)
		}
		if strings.Contains(apiErr.Message, "sk-e2e-wrong") {
			t.Errorf("the error echoes the key: %s", apiErr.Message)
		}
		_, err = proxyClient(env.extraURL).List(ctx)
		var st api.AuthorizationError
		if !errors.As(err, &st) || st.StatusCode != http.StatusUnauthorized {
			t.Fatalf("Ollama client without a key: want 401, got %v", err)
		}
	})

	t.Run("AppKeyBothClients", func(t *testing.T) {
		c := openai.NewClient(option.WithBaseURL(base), option.WithAPIKey(appKey), option.WithMaxRetries(0))
		res, err := c.Chat.Completions.New(ctx, chat)
		if err != nil {
			t.Fatal(err)
		}
		if res.Usage.CompletionTokens != 4 {
			t.Errorf("usage.completion_tokens: want 4, got %d", res.Usage.CompletionTokens)
		}
		emb := openai.EmbeddingNewParams{Model: embedModel, Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("x")}}
		_, err = c.Embeddings.New(ctx, emb)
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusForbidden || !strings.Contains(apiErr.Message, embedModel) {
			t.Fatalf("a model outside the tenant's list: want 403 naming it, got %v", err)
		}

		u, _ := url.Parse(env.extraURL)
		oc := api.NewClient(u, &http.Client{Timeout: 2 * time.Minute, Transport: bearerTransport{appKey}})
		list, err := oc.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Models) != 1 || !strings.HasPrefix(list.Models[0].Name, chatModel) {
			t.Errorf("the tenant's model list: want only %s, got %+v", chatModel, list.Models)
		}
		stream := false
		var final api.ChatResponse
		err = oc.Chat(ctx, &api.ChatRequest{Model: chatModel, Messages: []api.Message{{Role: "user", Content: "hi"}}, Stream: &stream, Options: map[string]any{"num_predict": 3}},
			func(r api.ChatResponse) error { final = r; return nil })
		if err != nil {
			t.Fatal(err)
		}
		byStatus, prompt, completion, _ := tenantUsage(t, "app", 4)
		if byStatus["200"] != 3 || byStatus["403"] != 1 {
			t.Errorf("app's requests by status: want 3×200 and 1×403, got %v", byStatus)
		}
		if want := res.Usage.PromptTokens + int64(final.PromptEvalCount); prompt != want {
			t.Errorf("app's prompt tokens: want %d (what the servers reported), got %d", want, prompt)
		}
		if want := res.Usage.CompletionTokens + int64(final.EvalCount); completion != want {
			t.Errorf("app's completion tokens: want %d, got %d", want, completion)
		}
	})

	t.Run("RequestLimitAndSDKRetry", func(t *testing.T) {
		// Empty burst's bucket with cheap requests, until the first 429.
		refused := 0
		for i := 0; i < 200 && refused == 0; i++ {
			req, _ := http.NewRequest(http.MethodGet, base+"models", nil)
			req.Header.Set("Authorization", "Bearer "+burstKey)
			res, err := httpClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusTooManyRequests {
				refused++
				var e struct{ Error struct{ Code string } }
				_ = json.Unmarshal(body, &e)
				if e.Error.Code != "rate_limit_exceeded" || res.Header.Get("Retry-After") != "1" ||
					res.Header.Get("X-Ratelimit-Limit-Requests") != "60" || res.Header.Get("X-Ratelimit-Remaining-Requests") != "0" {
					t.Fatalf("429: want rate_limit_exceeded, Retry-After 1 and the x-ratelimit headers, got %s %v", body, res.Header)
				}
			}
		}
		if refused == 0 {
			t.Fatal("200 requests in a row never met requests_per_minute 60")
		}
		// The SDK, with its default retries, waits Retry-After and gets in.
		c := openai.NewClient(option.WithBaseURL(base), option.WithAPIKey(burstKey))
		start := time.Now()
		var raw *http.Response
		res, err := c.Chat.Completions.New(ctx, chat, option.WithResponseInto(&raw))
		if err != nil {
			t.Fatalf("the SDK's retry after 429 did not get through: %v", err)
		}
		if len(res.Choices) != 1 {
			t.Fatalf("want one choice, got %+v", res.Choices)
		}
		if took := time.Since(start); took < 500*time.Millisecond {
			t.Errorf("the SDK answered in %s: it did not wait for the bucket", took)
		}
		_, _, _, rejections := tenantUsage(t, "burst", 62)
		if rejections["requests_per_minute"] < 2 {
			t.Errorf("want the drain's 429 and the SDK's first try refused, got %v", rejections)
		}
		fmt.Printf("e2e: burst tenant: %d refusals before the SDK got through in %s\n", rejections["requests_per_minute"], time.Since(start).Round(time.Millisecond))
	})

	t.Run("TokenLimit", func(t *testing.T) {
		c := openai.NewClient(option.WithBaseURL(base), option.WithAPIKey(tokKey), option.WithMaxRetries(0))
		big := chat
		big.MaxTokens = openai.Int(30)
		used := int64(0)
		var apiErr *openai.Error
		n := int64(0)
		for i := 0; i < 5; i++ {
			n++
			res, err := c.Chat.Completions.New(ctx, big)
			if errors.As(err, &apiErr) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			used += res.Usage.PromptTokens + res.Usage.CompletionTokens
		}
		if apiErr == nil || apiErr.StatusCode != http.StatusTooManyRequests || apiErr.Code != "rate_limit_exceeded" || !strings.Contains(apiErr.Message, "tokens_per_minute") {
			t.Fatalf("want 429 rate_limit_exceeded for tokens_per_minute once 40 tokens are used, got %v after %d tokens", apiErr, used)
		}
		if used < 40 {
			t.Errorf("refused after %d tokens, under the limit of 40", used)
		}
		_, prompt, completion, _ := tenantUsage(t, "tok", n)
		if prompt+completion != used {
			t.Errorf("usage counts %d tokens, the SDK saw %d", prompt+completion, used)
		}
		fmt.Printf("e2e: tok tenant (tokens_per_minute 40) refused after %d tokens in %d answers\n", used, n-1)
	})

	t.Run("KeysNowhere", func(t *testing.T) {
		var seen []string
		for _, p := range []string{"/ollamaflow/usage", "/ollamaflow/frontends", "/ollamaflow/backends", "/config/", "/metrics"} {
			res, err := httpClient.Get("http://" + env.admin + p)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			seen = append(seen, string(b))
		}
		logs, err := os.ReadFile(filepath.Join(env.workDir, "caddy.log"))
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, string(logs))
		for _, s := range seen {
			for _, k := range []string{appKey, burstKey, tokKey, "sk-e2e-wrong"} {
				if strings.Contains(s, k) {
					t.Errorf("a key shows: %s", k)
				}
			}
		}
	})
}
