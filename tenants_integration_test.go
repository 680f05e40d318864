package ollamaflow

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
	"golang.org/x/crypto/bcrypt"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// tenantsSite is a whole Caddyfile: global options (a debug log to
// logFile), then one site with an access log to accessLog as the README's
// recipe writes it (X-Api-Key filtered out, the tenant appended), any
// extra site directives, and an ollamaflow block holding body.
func tenantsSite(logFile, accessLog, siteExtra, body string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	skip_install_trust
	log {
		output file %s
		level DEBUG
	}
}
:%d {
	log {
		output file %s
		format filter {
			wrap json
			request>headers>X-Api-Key delete
		}
	}
	log_append tenant {http.ollamaflow.tenant}
%s
	ollamaflow {
%s
	}
}
`, adminPort, sitePort, tlsPort, logFile, sitePort, accessLog, siteExtra, body)
}

func loadTenantsSite(t *testing.T, cfg string) {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: adminPort, LoadRequestTimeout: 30 * time.Second})
	tester.InitServer(cfg, "caddyfile")
	require.False(t, t.Failed(), "caddy did not load the config")
	dropIdleConnections()
}

// finalCounts reads the token counts of a non-streaming native answer.
func finalCounts(t *testing.T, body string) (prompt, completion int64) {
	t.Helper()
	p, c := gjson.Get(body, "prompt_eval_count"), gjson.Get(body, "eval_count")
	require.True(t, p.Exists() && c.Exists(), "no final counts in %s", body)
	return p.Int(), c.Int()
}

// waitCounted waits until usage counts n requests of the tenant: each is
// counted as its handler returns, a moment after the client has its
// answer.
func waitCounted(t *testing.T, frontend, tenant string, n int64) {
	t.Helper()
	require.Eventually(t, func() bool {
		_, raw := adminGet(t, "/ollamaflow/usage")
		return gjson.GetBytes(raw, fmt.Sprintf(`frontends.#(frontend==%q).tenants.#(tenant==%q).total.requests`, frontend, tenant)).Int() >= n
	}, 5*time.Second, time.Millisecond, "%s/%s never counted %d requests", frontend, tenant, n)
}

func headerInt(t *testing.T, res *http.Response, name string) int64 {
	t.Helper()
	v := res.Header.Get(name)
	n, err := strconv.ParseInt(v, 10, 64)
	require.NoError(t, err, "%s: %q", name, v)
	return n
}

func TestTenantsKeysPolicyLimitsAndUsage(t *testing.T) {
	const alphaKey = "sk-alpha-0123456789-secret"
	const betaKey = "sk-beta-9876543210-secret"
	t.Setenv("OLLAMAFLOW_TEST_ALPHA_KEY", alphaKey)
	betaSum := sha256.Sum256([]byte(betaKey))

	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "other-model", "tiny-bert"}, Tokens: 30})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "other-model", "tiny-bert"}, Tokens: 30})
	defer b.Close()
	dir := t.TempDir()
	logFile, accessLog := filepath.Join(dir, "caddy.log"), filepath.Join(dir, "access.log")
	loadTenantsSite(t, tenantsSite(logFile, accessLog, "", fmt.Sprintf(`
		name tenants-test
		lb_policy first
		pin_completions {
			options.seed 7
		}
		tenants {
			tenant alpha {
				key {env.OLLAMAFLOW_TEST_ALPHA_KEY}
				models tiny-llama
				requests_per_minute 3
			}
			tenant beta {
				key sha256:%s
				labels gpu
				allow_embeddings false
				tokens_per_minute 40
				pin_completions {
					options.temperature 0.3
					options.seed 1
				}
			}
		}
		backend a %s
		backend b %s {
			labels gpu
		}`, hex.EncodeToString(betaSum[:]), a.URL, b.URL)))
	waitKnown(t, []*fakeollama.Server{a, b})
	// Counters outlive configs in one test process: compare with a baseline.
	series := []string{
		`ollamaflow_tenant_requests_total{code="200",frontend="tenants-test",tenant="alpha"}`,
		`ollamaflow_tenant_requests_total{code="429",frontend="tenants-test",tenant="beta"}`,
		`ollamaflow_tenant_tokens_total{direction="completion",frontend="tenants-test",model="tiny-llama:latest",tenant="beta"}`,
		`ollamaflow_tenant_tokens_total{direction="prompt",frontend="tenants-test",model="tiny-llama:latest",tenant="beta"}`,
	}
	baseline := map[string]float64{}
	for _, m := range series {
		baseline[m] = max(0, scrape(t, m))
	}

	// No tenant: 401 with a Bearer challenge, in each API's format.
	res, body := post(t, "/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusUnauthorized, res.StatusCode, body)
	assert.Equal(t, "Bearer", res.Header.Get("WWW-Authenticate"))
	assert.Contains(t, gjson.Get(body, "error").String(), "missing API key")
	res, body = post(t, "/v1/chat/completions", chatFor("tiny-llama"), "Authorization", "Bearer sk-alpha-wrong")
	require.Equal(t, http.StatusUnauthorized, res.StatusCode, body)
	assert.Equal(t, "Bearer", res.Header.Get("WWW-Authenticate"))
	assert.Equal(t, "invalid_api_key", gjson.Get(body, "error.code").String(), body)
	assert.NotContains(t, body, "sk-alpha-wrong", "a presented key is never echoed")
	res, body = post(t, "/api/chat", chatFor("tiny-llama"), "Authorization", "Basic "+alphaKey)
	require.Equal(t, http.StatusUnauthorized, res.StatusCode, "Basic credentials are not an API key: %s", body)
	assert.Zero(t, a.Count("/api/chat")+b.Count("/api/chat"), "nothing reached a backend")

	// alpha, by Bearer: its model allow-list and its requests_per_minute.
	res, body = post(t, "/api/chat", chatFor("tiny-llama"), "Authorization", "Bearer "+alphaKey)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "a", res.Header.Get("X-OllamaFlow-Backend"))
	assert.Equal(t, "3", res.Header.Get("X-Ratelimit-Limit-Requests"))
	assert.Equal(t, "2", res.Header.Get("X-Ratelimit-Remaining-Requests"))
	reset, err := time.ParseDuration(res.Header.Get("X-Ratelimit-Reset-Requests"))
	require.NoError(t, err)
	assert.True(t, reset > 0 && reset <= 20*time.Second, "one request of three per minute refills in 20s: %s", reset)
	assert.Empty(t, res.Header.Get("X-Ratelimit-Limit-Tokens"), "alpha has no token limit")
	last, _ := a.LastRequestTo("/api/chat")
	assert.Empty(t, last.Header.Get("Authorization"), "the tenant's key is not forwarded")
	assert.Equal(t, 7.0, gjson.GetBytes(last.Body, "options.seed").Float(), "the frontend's pin")
	alphaPrompt, alphaCompletion := finalCounts(t, body)

	res, body = post(t, "/v1/chat/completions", chatFor("other-model"), "Authorization", "Bearer "+alphaKey)
	require.Equal(t, http.StatusForbidden, res.StatusCode, body)
	assert.Contains(t, gjson.Get(body, "error.message").String(), `"other-model:latest"`)
	assert.Contains(t, gjson.Get(body, "error.message").String(), `"alpha"`)
	assert.Equal(t, "1", res.Header.Get("X-Ratelimit-Remaining-Requests"), "every answer carries the headers")

	res, body = send(t, http.MethodGet, siteURL+"/api/tags", "", "Authorization", "Bearer "+alphaKey)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	var names []string
	for _, m := range gjson.Get(body, "models.#.name").Array() {
		names = append(names, m.String())
	}
	assert.Equal(t, []string{"tiny-llama:latest"}, names, "a tenant sees its own models only")
	assert.Equal(t, "0", res.Header.Get("X-Ratelimit-Remaining-Requests"))

	res, body = post(t, "/v1/chat/completions", chatFor("tiny-llama"), "Authorization", "Bearer "+alphaKey)
	require.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.Equal(t, "rate_limit_exceeded", gjson.Get(body, "error.code").String(), body)
	assert.Contains(t, gjson.Get(body, "error.message").String(), "requests_per_minute")
	assert.Equal(t, "0", res.Header.Get("X-Ratelimit-Remaining-Requests"))
	retry := headerInt(t, res, "Retry-After")
	assert.True(t, retry >= 1 && retry <= 20, "Retry-After %d: the next request of three per minute is at most 20s away", retry)

	// beta, by X-Api-Key: embeddings are not for it, its labels route it
	// to b, its pins apply under the frontend's, and its tokens run out.
	res, body = post(t, "/api/embed", `{"model":"tiny-bert","input":"x"}`, "X-Api-Key", betaKey)
	require.Equal(t, http.StatusForbidden, res.StatusCode, body)
	assert.Contains(t, body, `tenant \"beta\"`)

	before := time.Now()
	res, body = post(t, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"one two three"}],"stream":false,"options":{"temperature":0.9}}`, "X-Api-Key", betaKey)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	assert.Equal(t, "b", res.Header.Get("X-OllamaFlow-Backend"), "beta's label gpu")
	assert.Equal(t, "40", res.Header.Get("X-Ratelimit-Limit-Tokens"))
	assert.Equal(t, "40", res.Header.Get("X-Ratelimit-Remaining-Tokens"), "nothing used yet")
	assert.Empty(t, res.Header.Get("X-Ratelimit-Limit-Requests"), "beta has no request limit")
	last, _ = b.LastRequestTo("/api/chat")
	assert.Empty(t, last.Header.Get("X-Api-Key"), "the tenant's key is not forwarded")
	assert.Equal(t, 0.3, gjson.GetBytes(last.Body, "options.temperature").Float(), "the tenant's pin over the client")
	assert.Equal(t, 7.0, gjson.GetBytes(last.Body, "options.seed").Float(), "the frontend's pin over the tenant's")
	p1, c1 := finalCounts(t, body)
	require.Less(t, p1+c1, int64(40), "the fake's answer fits the limit once")

	res, body = post(t, "/api/chat", chatFor("tiny-llama"), "X-Api-Key", betaKey)
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	// Tokens refill at 40 a minute (one per 1.5s) while the test runs.
	refill := int64(time.Since(before)/(1500*time.Millisecond)) + 1
	remaining := headerInt(t, res, "X-Ratelimit-Remaining-Tokens")
	assert.True(t, remaining >= 40-(p1+c1) && remaining <= min(40, 40-(p1+c1)+refill), "remaining %d after %d tokens used", remaining, p1+c1)
	p2, c2 := finalCounts(t, body)
	// 10 tokens over: the bucket stays empty for 15s, longer than the
	// next request takes.
	require.Greater(t, p1+c1+p2+c2, int64(40+10), "two answers overdraw the bucket")

	// Tokens are charged as the handler returns, just after the answer's
	// last byte went out.
	waitCounted(t, "tenants-test", "beta", 3)
	res, body = post(t, "/api/chat", chatFor("tiny-llama"), "X-Api-Key", betaKey)
	require.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.Contains(t, gjson.Get(body, "error").String(), "tokens_per_minute")
	assert.Equal(t, "0", res.Header.Get("X-Ratelimit-Remaining-Tokens"))
	assert.GreaterOrEqual(t, headerInt(t, res, "Retry-After"), int64(1))

	// Usage: what the fakes served, per tenant, by outcome and model.
	waitCounted(t, "tenants-test", "alpha", 4)
	waitCounted(t, "tenants-test", "beta", 4)
	status, raw := adminGet(t, "/ollamaflow/usage")
	require.Equal(t, http.StatusOK, status, string(raw))
	fu := gjson.GetBytes(raw, `frontends.#(frontend=="tenants-test")`)
	require.True(t, fu.Exists(), string(raw))
	assert.EqualValues(t, 3, fu.Get("unauthorized.total").Int())
	alpha := fu.Get(`tenants.#(tenant=="alpha")`)
	assert.JSONEq(t, `{"200":2,"403":1,"429":1}`, alpha.Get("total.by_status").Raw)
	assert.EqualValues(t, 4, alpha.Get("total.requests").Int())
	assert.EqualValues(t, alphaPrompt, alpha.Get("total.by_model.tiny-llama:latest.prompt").Int())
	assert.EqualValues(t, alphaCompletion, alpha.Get("total.by_model.tiny-llama:latest.completion").Int())
	assert.EqualValues(t, 1, alpha.Get("total.rejections.requests_per_minute").Int())
	assert.EqualValues(t, 1, alpha.Get("total.rejections.model").Int())
	assert.EqualValues(t, 3, alpha.Get("limits.requests_per_minute").Int())
	beta := fu.Get(`tenants.#(tenant=="beta")`)
	assert.JSONEq(t, `{"200":2,"403":1,"429":1}`, beta.Get("total.by_status").Raw)
	assert.EqualValues(t, p1+p2, beta.Get("total.prompt_tokens").Int())
	assert.EqualValues(t, c1+c2, beta.Get("total.completion_tokens").Int())
	assert.EqualValues(t, p1+p2, beta.Get("total.by_model.tiny-llama:latest.prompt").Int())
	assert.EqualValues(t, 1, beta.Get("total.rejections.tokens_per_minute").Int())
	assert.EqualValues(t, 1, beta.Get("total.rejections.request_type").Int())
	assert.EqualValues(t, 0, beta.Get("remaining.tokens").Int())
	assert.False(t, beta.Get("remaining.requests").Exists(), "no request limit, no remaining requests")

	// Metrics, per tenant.
	for m, want := range map[string]int64{series[0]: 2, series[1]: 1, series[2]: c1 + c2, series[3]: p1 + p2} {
		assert.EqualValues(t, want, scrape(t, m)-baseline[m], m)
	}

	// Caddy's access log names the tenant (log_append and the placeholder).
	var access []byte
	require.Eventually(t, func() bool {
		access, _ = os.ReadFile(accessLog)
		return strings.Contains(string(access), `"tenant":"beta"`)
	}, 5*time.Second, 10*time.Millisecond, "no access log line names beta")
	var sawAlpha bool
	for _, line := range strings.Split(strings.TrimSpace(string(access)), "\n") {
		if gjson.Get(line, "tenant").String() == "alpha" && gjson.Get(line, "request.uri").String() == "/api/tags" {
			sawAlpha = true
			assert.EqualValues(t, 200, gjson.Get(line, "status").Int())
		}
	}
	assert.True(t, sawAlpha, "alpha's /api/tags is in the access log with its tenant")

	// The keys are nowhere: admin API, config, metrics, logs.
	var everything []string
	for _, p := range []string{"/ollamaflow/usage", "/ollamaflow/frontends", "/ollamaflow/backends", "/config/", "/metrics"} {
		status, raw := adminGet(t, p)
		require.Equal(t, http.StatusOK, status, p)
		everything = append(everything, string(raw))
	}
	logs, err := os.ReadFile(logFile)
	require.NoError(t, err)
	require.NotEmpty(t, logs, "the log file is the one Caddy writes")
	everything = append(everything, string(logs), string(access))
	for _, s := range everything {
		assert.NotContains(t, s, alphaKey)
		assert.NotContains(t, s, betaKey)
		assert.NotContains(t, s, "sk-alpha-wrong")
	}
}

func TestTenantsIdentityFromBasicAuthAndMaxParallel(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("carol-pw"), bcrypt.MinCost)
	require.NoError(t, err)
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 2})
	defer f.Close()
	dir := t.TempDir()
	accessLog := filepath.Join(dir, "access.log")
	loadTenantsSite(t, tenantsSite(filepath.Join(dir, "caddy.log"), accessLog, fmt.Sprintf(`
	basic_auth {
		carol %s
		dave %s
	}`, hash, hash), fmt.Sprintf(`
		name identity-test
		tenants {
			identity {http.auth.user.id}
			tenant carol {
				max_parallel 1
			}
		}
		backend a %s`, f.URL)))
	waitKnown(t, []*fakeollama.Server{f})

	carol := func(path, body string) (*http.Response, string) {
		req, err := http.NewRequest(http.MethodPost, siteURL+path, strings.NewReader(body))
		require.NoError(t, err)
		req.SetBasicAuth("carol", "carol-pw")
		res, err := client.Do(req)
		require.NoError(t, err)
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		require.NoError(t, err)
		return res, string(b)
	}
	res, body := carol("/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, body)
	last, _ := f.LastRequestTo("/api/chat")
	assert.Empty(t, last.Header.Get("Authorization"), "basic_auth's credentials are not forwarded")

	// dave passes basic_auth but is no tenant here.
	req, err := http.NewRequest(http.MethodPost, siteURL+"/api/chat", strings.NewReader(chatFor("tiny-llama")))
	require.NoError(t, err)
	req.SetBasicAuth("dave", "carol-pw")
	res, err = client.Do(req)
	require.NoError(t, err)
	res.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, res.StatusCode)

	// max_parallel 1: a second request while one is held gets 429.
	f.Hold("/api/chat")
	held := make(chan int, 1)
	go func() {
		res, _ := carol("/api/chat", chatFor("tiny-llama"))
		held <- res.StatusCode
	}()
	require.Eventually(t, func() bool { return f.InFlight() == 1 }, 5*time.Second, time.Millisecond)
	res, body = carol("/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusTooManyRequests, res.StatusCode, body)
	assert.Contains(t, body, "max_parallel")
	assert.Equal(t, "1", res.Header.Get("Retry-After"))
	f.Release()
	require.Equal(t, http.StatusOK, <-held)
	// The place is given back as the handler returns, just after the
	// answer's last byte went out.
	carolInFlight := func() int64 {
		_, raw := adminGet(t, "/ollamaflow/usage")
		return gjson.GetBytes(raw, `frontends.#(frontend=="identity-test").tenants.#(tenant=="carol").in_flight`).Int()
	}
	require.Eventually(t, func() bool { return carolInFlight() == 0 }, 5*time.Second, time.Millisecond)
	res, body = carol("/api/chat", chatFor("tiny-llama"))
	require.Equal(t, http.StatusOK, res.StatusCode, "the place is given back: %s", body)

	require.Eventually(t, func() bool { return carolInFlight() == 0 }, 5*time.Second, time.Millisecond)
	status, raw := adminGet(t, "/ollamaflow/usage")
	require.Equal(t, http.StatusOK, status)
	fu := gjson.GetBytes(raw, `frontends.#(frontend=="identity-test")`)
	assert.EqualValues(t, 1, fu.Get("unauthorized.total").Int(), string(raw))
	c := fu.Get(`tenants.#(tenant=="carol")`)
	assert.JSONEq(t, `{"200":3,"429":1}`, c.Get("total.by_status").Raw, string(raw))
	assert.EqualValues(t, 1, c.Get("total.rejections.max_parallel").Int())
	assert.EqualValues(t, 0, c.Get("in_flight").Int())
	var u usageReport
	require.NoError(t, json.Unmarshal(raw, &u), "the report decodes into its own type")
}

// A tenant's requests wait in the queue as its own class: with one slot
// taken, a higher-priority tenant that queues later is served before a
// lower one that queued first.
func TestTenantsQueueByPriority(t *testing.T) {
	f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 1})
	defer f.Close()
	t.Setenv("OLLAMAFLOW_TEST_LOW_KEY", "low-key-0123")
	t.Setenv("OLLAMAFLOW_TEST_HIGH_KEY", "high-key-4567")
	loadCaddy(t, fmt.Sprintf(`
		name queue-class-test
		tenants {
			tenant low {
				key {env.OLLAMAFLOW_TEST_LOW_KEY}
			}
			tenant high {
				key {env.OLLAMAFLOW_TEST_HIGH_KEY}
				priority 5
			}
		}
		backend a %s {
			max_parallel 1
		}`, f.URL))
	waitKnown(t, []*fakeollama.Server{f})
	h := currentHandler(t)

	f.Hold("/api/chat")
	done := make(chan int, 3)
	ask := func(key, word string) {
		res, _ := post(t, "/api/chat", fmt.Sprintf(`{"model":"tiny-llama","messages":[{"role":"user","content":%q}],"stream":false}`, word), "Authorization", "Bearer "+key)
		done <- res.StatusCode
	}
	go ask("low-key-0123", "first")
	require.Eventually(t, func() bool { return f.InFlight() == 1 }, 5*time.Second, time.Millisecond)
	go ask("low-key-0123", "second")
	require.Eventually(t, func() bool { return h.queue.length() == 1 }, 5*time.Second, time.Millisecond)
	go ask("high-key-4567", "third")
	require.Eventually(t, func() bool { return h.queue.length() == 2 }, 5*time.Second, time.Millisecond)
	f.Release()
	for i := 0; i < 3; i++ {
		require.Equal(t, http.StatusOK, <-done)
	}
	var order []string
	for _, r := range f.Requests() {
		if r.Path == "/api/chat" {
			order = append(order, gjson.GetBytes(r.Body, "messages.0.content").String())
		}
	}
	assert.Equal(t, []string{"first", "third", "second"}, order, "the high-priority tenant goes first")
}
