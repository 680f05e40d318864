package ollamaflow

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// commandJSON parses args as `caddy ollamaflow` would and returns the
// config the command would run, as JSON, or the error it would exit with.
func commandJSON(t *testing.T, args ...string) (string, error) {
	t.Helper()
	c, ok := caddycmd.Commands()["ollamaflow"]
	require.True(t, ok, "the ollamaflow command is registered")
	cmd := &cobra.Command{Use: c.Name}
	c.CobraFunc(cmd)
	require.NoError(t, cmd.ParseFlags(args))
	opts, err := commandOptionsFromFlags(caddycmd.Flags{FlagSet: cmd.Flags()})
	require.NoError(t, err)
	cfg, err := commandConfig(opts)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(cfg)
	require.NoError(t, err)
	return string(b), nil
}

func TestCommandConfig(t *testing.T) {
	const handler = "apps.http.servers.ollamaflow.routes.0.handle.0"

	js, err := commandJSON(t, "--to", "gpu1:11434", "--to", "10.0.0.6", "--to", "fast=https://llm.internal:8443")
	require.NoError(t, err)
	assert.Equal(t, `[":11434"]`, gjson.Get(js, "apps.http.servers.ollamaflow.listen").Raw, "Ollama's port on every interface by default")
	assert.True(t, gjson.Get(js, "apps.http.servers.ollamaflow.automatic_https.disable").Bool(), "no domain: plain HTTP")
	assert.False(t, gjson.Get(js, "apps.http.servers.ollamaflow.routes.0.match").Exists(), "no host matcher")
	assert.Equal(t, "ollamaflow", gjson.Get(js, handler+".handler").String())
	assert.Equal(t, `["gpu1","10.0.0.6","fast"]`, gjson.Get(js, handler+".backends.#.name").Raw)
	assert.Equal(t, `["gpu1:11434","10.0.0.6","https://llm.internal:8443"]`, gjson.Get(js, handler+".backends.#.url").Raw)
	assert.True(t, gjson.Get(js, "admin.disabled").Bool(), "no admin API unless asked")
	assert.False(t, gjson.Get(js, "apps.http.servers.ollamaflow.logs").Exists())

	js, err = commandJSON(t, "--from", "llm.example.com", "--to", "a:1", "--to", "a:2",
		"--policy", "round_robin", "--model", "llama3", "--model", "nomic-embed-text",
		"--allow-model-management", "--access-log", "--admin", "localhost:2999")
	require.NoError(t, err)
	assert.Equal(t, `[":443"]`, gjson.Get(js, "apps.http.servers.ollamaflow.listen").Raw, "a domain: HTTPS")
	assert.False(t, gjson.Get(js, "apps.http.servers.ollamaflow.automatic_https").Exists(), "automatic HTTPS stays on")
	assert.Equal(t, `["llm.example.com"]`, gjson.Get(js, "apps.http.servers.ollamaflow.routes.0.match.0.host").Raw)
	assert.Equal(t, `["a-1","a-2"]`, gjson.Get(js, handler+".backends.#.name").Raw, "two backends on one host: host-port")
	assert.Equal(t, "round_robin", gjson.Get(js, handler+".lb_policy").String())
	assert.Equal(t, `["llama3","nomic-embed-text"]`, gjson.Get(js, handler+".models").Raw)
	assert.True(t, gjson.Get(js, handler+".allow_model_management").Bool())
	assert.True(t, gjson.Get(js, "apps.http.servers.ollamaflow.logs").Exists(), "--access-log")
	assert.Equal(t, "localhost:2999", gjson.Get(js, "admin.listen").String())
	assert.False(t, gjson.Get(js, "admin.disabled").Bool())

	for from, listen := range map[string]string{
		"127.0.0.1:8080":         "127.0.0.1:8080",
		"localhost":              "localhost:11434",
		"[::1]:9000":             "[::1]:9000",
		"http://llm.example.com": ":11434",
		"llm.example.com:80":     ":80",
	} {
		js, err := commandJSON(t, "--from", from, "--to", "a")
		require.NoError(t, err, from)
		assert.Equal(t, `["`+listen+`"]`, gjson.Get(js, "apps.http.servers.ollamaflow.listen").Raw, from)
		assert.True(t, gjson.Get(js, "apps.http.servers.ollamaflow.automatic_https.disable").Bool(), "%s: plain HTTP", from)
	}
	js, err = commandJSON(t, "--to", "a", "--explorer")
	require.NoError(t, err)
	assert.Equal(t, "/explorer/", gjson.Get(js, handler+".explorer_path").String(), "--explorer serves the API Explorer")
	js, err = commandJSON(t, "--to", "a")
	require.NoError(t, err)
	assert.False(t, gjson.Get(js, handler+".explorer_path").Exists(), "off without --explorer")

	js, err = commandJSON(t, "--from", "https://127.0.0.1:8443", "--to", "a")
	require.NoError(t, err)
	assert.Equal(t, `["127.0.0.1"]`, gjson.Get(js, "apps.http.servers.ollamaflow.routes.0.match.0.host").Raw, "HTTPS on an IP: Caddy's internal CA certifies it")

	for want, args := range map[string][]string{
		"--to is required":                  {},
		"a path is not allowed":             {"--from", ":8080/v1", "--to", "a"},
		"HTTPS needs a host name":           {"--from", "https://:8443", "--to", "a"},
		"credentials in the URL":            {"--to", "http://u:p@a"},
		"scheme must be http or https, got": {"--to", "ftp://a"},
	} {
		_, err := commandJSON(t, args...)
		require.Error(t, err, "%v", args)
		assert.Contains(t, err.Error(), want, "%v", args)
	}
}

// TestCommandRuns runs the config the command builds, on loopback, in front
// of two fake Ollamas: requests are served by the named backends, the model
// allow-list holds, and the admin API shows the backends.
func TestCommandRuns(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	b := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "tiny-bert"}})
	defer b.Close()
	port := freePort()
	js, err := commandJSON(t, "--from", fmt.Sprintf("127.0.0.1:%d", port),
		"--to", "one="+a.HostPort(), "--to", "two="+b.URL, "--policy", "round_robin",
		"--model", "tiny-llama", "--admin", fmt.Sprintf("localhost:%d", adminPort), "--explorer")
	require.NoError(t, err)
	// The shared in-process Caddy: the admin address is the tests' own, so
	// the next test's load replaces this config as usual.
	require.NoError(t, caddy.Load([]byte(js), true))
	waitKnown(t, []*fakeollama.Server{a, b})

	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	seen := map[string]int{}
	for range 4 {
		res, err := client.Post(base+"/api/chat", "application/json", strings.NewReader(chatFor("tiny-llama")))
		require.NoError(t, err)
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		require.Equal(t, http.StatusOK, res.StatusCode, string(body))
		assert.Contains(t, string(body), `"done":true`)
		seen[res.Header.Get("X-OllamaFlow-Backend")]++
	}
	assert.Equal(t, map[string]int{"one": 2, "two": 2}, seen, "round_robin over both backends, by their names")

	res, err := client.Post(base+"/api/embed", "application/json", strings.NewReader(`{"model":"tiny-bert","input":"x"}`))
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	assert.Equal(t, http.StatusForbidden, res.StatusCode, "--model is the allow-list: %s", body)

	res, err = client.Get(fmt.Sprintf("http://localhost:%d/ollamaflow/backends", adminPort))
	require.NoError(t, err)
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode, string(body))
	assert.Contains(t, string(body), `"one"`)
	assert.Contains(t, string(body), `"two"`)

	res, err = client.Get(base + "/explorer/")
	require.NoError(t, err)
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	assert.Equal(t, http.StatusOK, res.StatusCode)
	assert.Contains(t, string(body), "API Explorer", "--explorer serves the page")

	res, err = client.Get(base + "/api/tags")
	require.NoError(t, err)
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	assert.Equal(t, `["tiny-llama:latest"]`, gjson.GetBytes(body, "models.#.name").Raw, "the list shows only the allowed model")
}

// TestCommandAccessLogDropsKeys runs --access-log and reads the line a
// request leaves: headers are there, API keys are not, in any header a
// client sends them in.
func TestCommandAccessLogDropsKeys(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	port := freePort()
	js, err := commandJSON(t, "--from", fmt.Sprintf("127.0.0.1:%d", port), "--to", "one="+a.HostPort(),
		"--access-log", "--admin", fmt.Sprintf("localhost:%d", adminPort))
	require.NoError(t, err)
	assert.Equal(t, `["http.log.access.ollamaflow"]`, gjson.Get(js, "logging.logs.default.exclude").Raw,
		"the default log leaves the access log out, or it would print each line unfiltered")
	// The command logs to stderr; the test reads a file instead.
	logFile := filepath.Join(t.TempDir(), "access.log")
	js, err = sjson.Set(js, "logging.logs.access.writer", map[string]string{"output": "file", "filename": logFile})
	require.NoError(t, err)
	require.NoError(t, caddy.Load([]byte(js), true))

	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/api/chat", port), strings.NewReader(chatFor("tiny-llama")))
	require.NoError(t, err)
	req.Header.Set("X-Api-Key", "sk-secret-one")
	req.Header.Set("api-key", "sk-secret-two")
	req.Header.Set("Authorization", "Bearer sk-secret-three")
	req.Header.Set("X-Client-Tag", "visible-tag")
	res, err := client.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	require.Equal(t, http.StatusOK, res.StatusCode, string(body))

	var line string
	require.Eventually(t, func() bool {
		b, _ := os.ReadFile(logFile)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "visible-tag") {
				line = l
				return true
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond, "no access log line for the request")
	assert.Equal(t, "/api/chat", gjson.Get(line, "request.uri").String(), line)
	assert.Equal(t, `["visible-tag"]`, gjson.Get(line, "request.headers.X-Client-Tag").Raw, "other headers are logged")
	assert.True(t, gjson.Get(line, "request.headers.Authorization").Exists(), "Caddy redacts Authorization itself")
	assert.False(t, gjson.Get(line, "request.headers.X-Api-Key").Exists(), line)
	assert.False(t, gjson.Get(line, "request.headers.Api-Key").Exists(), line)
	for _, secret := range []string{"sk-secret-one", "sk-secret-two", "sk-secret-three"} {
		assert.NotContains(t, line, secret)
	}
}
