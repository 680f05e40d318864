package ollamaflow

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// provisionJSON provisions a handler from its JSON config, as Caddy would,
// and cleans it up when the test ends.
func provisionJSON(t *testing.T, raw string) (*Handler, error) {
	t.Helper()
	var h Handler
	require.NoError(t, json.Unmarshal([]byte(raw), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	err := h.Provision(ctx)
	if err == nil {
		t.Cleanup(func() { _ = h.Cleanup() })
	}
	return &h, err
}

func TestProvisionValidates(t *testing.T) {
	cases := map[string]string{
		`{}`: "at least one backend",
		`{"lb_policy":"fastest","backends":[{"name":"a","url":"127.0.0.1:1"}]}`:                                      `unknown policy "fastest"`,
		`{"retries":-1,"backends":[{"name":"a","url":"127.0.0.1:1"}]}`:                                               "retries: must not be negative",
		`{"backends":[{"name":"a","url":"127.0.0.1:1"},{"name":"a","url":"127.0.0.1:2"}]}`:                           "duplicate backend name",
		`{"backends":[{"name":"a","url":"127.0.0.1:1"},{"name":"b","url":"http://127.0.0.1:1/"}]}`:                   `same server as backend "a"`,
		`{"backends":[{"name":"a","url":"ftp://x"}]}`:                                                                "scheme must be http or https",
		`{"backends":[{"name":"a b","url":"127.0.0.1:1"}]}`:                                                          "may only contain",
		`{"backends":[{"name":"a","url":"127.0.0.1:1","max_parallel":-2}]}`:                                          "max_parallel: must not be negative",
		`{"backends":[{"name":"a","url":"127.0.0.1:1","health_method":"POST"}]}`:                                     "health_method",
		`{"backends":[{"name":"a","url":"127.0.0.1:1","health_status":42}]}`:                                         "health_status",
		`{"backends":[{"name":"a","url":"127.0.0.1:1","bearer_token":"x","headers":{"Authorization":["Basic y"]}}]}`: "keep one",
	}
	for raw, want := range cases {
		_, err := provisionJSON(t, raw)
		require.Error(t, err, raw)
		assert.Contains(t, err.Error(), want, raw)
	}
}

func TestProvisionDefaultsAndPlaceholders(t *testing.T) {
	t.Setenv("OF_TEST_TOKEN", "from-env")
	h, err := provisionJSON(t, `{"backends":[{"name":"a","url":"127.0.0.1:1","bearer_token":"{env.OF_TEST_TOKEN}","headers":{"X-Key":["{env.OF_TEST_TOKEN}-h"]}}]}`)
	require.NoError(t, err)
	assert.Equal(t, "ollamaflow", h.Name)
	assert.Equal(t, 2, h.retries)
	assert.EqualValues(t, 64<<20, h.MaxRequestBody)
	b := h.backends[0]
	assert.Equal(t, "Bearer from-env", b.header.Get("Authorization"))
	assert.Equal(t, "from-env-h", b.header.Get("X-Key"))
	assert.Equal(t, "http://127.0.0.1:1", b.base.String())
	assert.Equal(t, http.MethodGet, b.cfg.HealthMethod)
	assert.Equal(t, 3, b.cfg.FailThreshold)
	require.NotNil(t, pooled(t, "http://127.0.0.1:1"), "the server is in the pool while the handler lives")

	zero := 0
	h2, err := provisionJSON(t, `{"retries":0,"backends":[{"name":"a","url":"127.0.0.1:1"}]}`)
	require.NoError(t, err)
	assert.Equal(t, zero, h2.retries, "retries 0 is kept")
	assert.Same(t, b.srv, h2.backends[0].srv, "two frontends naming one server share its state")
}

// TestProvisionRejectsEmptyPlaceholders: a credential whose placeholder
// resolves to nothing (an unset variable) fails the config, naming the option
// and the variable, instead of sending no credentials.
func TestProvisionRejectsEmptyPlaceholders(t *testing.T) {
	t.Setenv("OF_TEST_SET", "v")
	t.Setenv("OF_TEST_EMPTY", "")
	cases := map[string]string{
		`"bearer_token":"{env.OF_TEST_UNSET}"`:                  "bearer_token: {env.OF_TEST_UNSET} is empty: the environment variable OF_TEST_UNSET is unset or empty",
		`"bearer_token":"{env.OF_TEST_EMPTY}"`:                  "bearer_token: {env.OF_TEST_EMPTY} is empty",
		`"headers":{"X-Key":["k-{env.OF_TEST_UNSET}"]}`:         "header X-Key: {env.OF_TEST_UNSET} is empty",
		`"query":"key={env.OF_TEST_UNSET}"`:                     "query: {env.OF_TEST_UNSET} is empty",
		`"bearer_token":"{env.OF_TEST_SET}{env.OF_TEST_UNSET}"`: "variable OF_TEST_UNSET",
	}
	for opt, want := range cases {
		_, err := provisionJSON(t, `{"backends":[{"name":"a","url":"127.0.0.1:1",`+opt+`}]}`)
		require.Error(t, err, opt)
		assert.Contains(t, err.Error(), want, opt)
		assert.NotContains(t, err.Error(), "k-", "the rest of the value is not shown")
	}
	_, err := provisionJSON(t, `{"backends":[{"name":"a","url":"{env.OF_TEST_UNSET}:11434"}]}`)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "url: {env.OF_TEST_UNSET} is empty")

	// Set variables, escaped braces and unknown placeholders are not errors.
	h, err := provisionJSON(t, `{"backends":[{"name":"a","url":"127.0.0.1:1","bearer_token":"{env.OF_TEST_SET}","headers":{"X-Lit":["\\{env.OF_TEST_UNSET}"],"X-Unknown":["{not.a.placeholder}"]}}]}`)
	require.NoError(t, err)
	assert.Equal(t, "Bearer v", h.backends[0].header.Get("Authorization"))
	assert.Equal(t, "{not.a.placeholder}", h.backends[0].header.Get("X-Unknown"))
	assert.Equal(t, "{env.OF_TEST_UNSET}", h.backends[0].header.Get("X-Lit"))
}

func TestCleanupReleasesPool(t *testing.T) {
	var h Handler
	require.NoError(t, json.Unmarshal([]byte(`{"backends":[{"name":"a","url":"127.0.0.1:7"}]}`), &h))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	require.NoError(t, h.Provision(ctx))
	require.NotNil(t, pooled(t, "http://127.0.0.1:7"))
	require.NoError(t, h.Cleanup())
	assert.Nil(t, pooled(t, "http://127.0.0.1:7"), "the last user gone, the server leaves the pool")
}
