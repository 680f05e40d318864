package ollamaflow

// The API Explorer in headless Chromium, driven over the DevTools protocol
// (internal/browser) against a real Caddy and fake Ollamas on loopback: a
// person's clicks and typing, and what the page then shows, read from its
// DOM while a stream is still running and after. Screenshots go to
// $OLLAMAFLOW_ARTIFACTS when set (kept), else to the test's temp dir; the
// test logs where.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/tidwall/gjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/browser"
	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// explorerTab is the explorer open in a browser tab.
type explorerTab struct {
	t   *testing.T
	ctx context.Context
	b   *browser.Browser
	p   *browser.Page
}

// openExplorer starts Chromium and opens url, waiting until the page has
// loaded its model list. The browser is closed when the test ends.
func openExplorer(t *testing.T, url string) *explorerTab {
	t.Helper()
	b := startBrowser(t).b
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	p, err := b.NewPage(ctx, 1400, 1000)
	require.NoError(t, err)
	tab := &explorerTab{t: t, ctx: ctx, b: b, p: p}
	require.NoError(t, p.Navigate(ctx, url))
	tab.waitFor(`document.body.dataset.ready === "true"`)
	t.Cleanup(func() {
		var errs []string
		for _, e := range p.Errors() {
			// An answer with an error status is logged as a failed load; the
			// tests ask for those.
			if !strings.HasPrefix(e, "log (network): Failed to load resource: the server responded with a status of") {
				errs = append(errs, e)
			}
		}
		assert.Empty(t, errs, "the page ran without exceptions, console errors or refused loads (CSP)")
	})
	return tab
}

func (x *explorerTab) waitFor(cond string) {
	x.t.Helper()
	require.NoError(x.t, x.p.WaitFor(x.ctx, cond), "page errors: %v", x.p.Errors())
}

func (x *explorerTab) eval(expr string, out any) {
	x.t.Helper()
	require.NoError(x.t, x.p.Eval(x.ctx, expr, out))
}

// text is the text content of the element with id.
func (x *explorerTab) text(id string) string {
	x.t.Helper()
	var s string
	x.eval(fmt.Sprintf(`document.getElementById(%q).textContent`, id), &s)
	return s
}

func (x *explorerTab) click(selector string) {
	x.t.Helper()
	require.NoError(x.t, x.p.Click(x.ctx, selector))
}

func (x *explorerTab) typeInto(selector, text string) {
	x.t.Helper()
	require.NoError(x.t, x.p.Type(x.ctx, selector, text))
}

func (x *explorerTab) choose(selector, value string) {
	x.t.Helper()
	require.NoError(x.t, x.p.Select(x.ctx, selector, value))
}

// headers are the rows of the response header table, by lowercase name.
func (x *explorerTab) headers() map[string]string {
	x.t.Helper()
	var h map[string]string
	x.eval(`Object.fromEntries([...document.querySelectorAll("#headers tr")].map(r => [r.dataset.header, r.querySelector("td").textContent]))`, &h)
	return h
}

// rows reads a load-test table: data attribute value -> count cell.
func (x *explorerTab) rows(table, attr string) map[string]int {
	x.t.Helper()
	var raw map[string]string
	x.eval(fmt.Sprintf(`Object.fromEntries([...document.querySelectorAll("#%s tbody tr")].map(r => [r.dataset[%q], r.querySelector(".count").textContent]))`, table, attr), &raw)
	out := map[string]int{}
	for k, v := range raw {
		n, err := strconv.Atoi(v)
		require.NoError(x.t, err, "%s row %s: %q", table, k, v)
		out[k] = n
	}
	return out
}

// screenshot saves a PNG of the page and logs where.
func (x *explorerTab) screenshot(name string) {
	x.t.Helper()
	png, err := x.p.Screenshot(x.ctx)
	require.NoError(x.t, err)
	require.Greater(x.t, len(png), 1000, "an empty screenshot")
	dir := os.Getenv("OLLAMAFLOW_ARTIFACTS")
	if dir == "" {
		dir = x.t.TempDir()
	}
	require.NoError(x.t, os.MkdirAll(dir, 0o755))
	path := filepath.Join(dir, name+".png")
	require.NoError(x.t, os.WriteFile(path, png, 0o644))
	x.t.Logf("screenshot: %s", path)
}

// lastRequest is the last request f received on path.
func lastRequest(t *testing.T, f *fakeollama.Server, path string) fakeollama.Request {
	t.Helper()
	reqs := f.Requests()
	for i := len(reqs) - 1; i >= 0; i-- {
		if reqs[i].Path == path {
			return reqs[i]
		}
	}
	require.Fail(t, "no request on "+path)
	return fakeollama.Request{}
}

// fmtRate is the page's own rounding of a rate (fmtRate in explorer.html).
func fmtRate(r float64) string {
	if r < 10 {
		return strconv.FormatFloat(r, 'f', 2, 64)
	}
	return strconv.FormatFloat(r, 'f', 1, 64)
}

func TestExplorerStreamsChatTokenByToken(t *testing.T) {
	const tokens = 5
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "nomic-embed-text"}, Tokens: tokens})
	defer a.Close()
	a.StepTokens("/api/chat")
	loadCaddy(t, "backend gpu-a "+a.URL+"\nexplorer")
	waitKnown(t, []*fakeollama.Server{a})

	x := openExplorer(t, siteURL+"/explorer/")
	var models []string
	x.eval(`[...document.getElementById("model").options].map(o => o.value)`, &models)
	assert.Equal(t, []string{"nomic-embed-text:latest", "tiny-llama:latest"}, models, "the frontend's /api/tags")
	var chosen string
	x.eval(`document.getElementById("model").value`, &chosen)
	assert.Equal(t, "tiny-llama:latest", chosen, "a chat model is chosen for chat")
	var body map[string]any
	x.eval(`JSON.parse(document.getElementById("body").value)`, &body)
	assert.Equal(t, "tiny-llama:latest", body["model"], "the body names the chosen model")
	assert.Equal(t, true, body["stream"])
	assert.Equal(t, "Valid JSON", x.text("body-check"))
	assert.Equal(t, "/api/chat", x.text("path"))

	a.Step() // the first token: it carries the response headers
	x.click("#send")
	x.waitFor(fmt.Sprintf(`document.getElementById("output").textContent === %q`, fakeollama.Text(1)))
	assert.NotEqual(t, "–", x.text("ttft"), "time to first token is shown once it came")
	for i := 2; i <= tokens; i++ {
		// Token i has not been let through: the page shows exactly i-1.
		var state string
		x.eval(`document.body.dataset.state`, &state)
		assert.Equal(t, "streaming", state)
		assert.Equal(t, fakeollama.Text(i-1), x.text("output"), "before token %d", i)
		assert.Equal(t, strconv.Itoa(i-1), x.text("tokens"), "the counter follows the chunks")
		assert.Equal(t, "–", x.text("tps"), "no rate before the final counts")
		if i == 3 {
			x.screenshot("explorer-chat-streaming")
		}
		a.Step()
		x.waitFor(fmt.Sprintf(`document.getElementById("output").textContent === %q`, fakeollama.Text(i)))
	}
	assert.Equal(t, "–", x.text("total"), "still streaming: the final chunk has not come")
	a.Step() // the final chunk, with the counts
	x.waitFor(`document.body.dataset.state === "done"`)

	assert.Equal(t, fakeollama.Text(tokens), x.text("output"))
	assert.Equal(t, "200 OK", x.text("status"))
	assert.Equal(t, "backend gpu-a", x.text("backend-pill"))
	assert.Equal(t, "route "+x.headers()["x-ollamaflow-route"], x.text("sticky-pill"), "how the backend was chosen")
	h := x.headers()
	assert.Equal(t, "gpu-a", h["x-ollamaflow-backend"], "every response header is listed")
	assert.Equal(t, "application/x-ndjson", h["content-type"])

	raw := x.text("raw")
	lines := strings.Split(strings.TrimSpace(raw), "\n")
	require.Len(t, lines, tokens+1, "the raw body is the whole NDJSON stream:\n%s", raw)
	final := gjson.Parse(lines[tokens])
	require.True(t, final.Get("done").Bool(), raw)
	evalCount, evalNs := final.Get("eval_count").Int(), final.Get("eval_duration").Float()
	assert.Equal(t, strconv.FormatInt(evalCount, 10), x.text("tokens"), "tokens from eval_count")
	assert.Equal(t, fmtRate(float64(evalCount)/(evalNs/1e9)), x.text("tps"), "tokens/s from eval_count/eval_duration")
	assert.Equal(t, "eval_count / eval_duration", x.text("tps-src"))
	assert.NotEqual(t, "–", x.text("total"))
	x.screenshot("explorer-chat-done")

	last := lastRequest(t, a, "/api/chat")
	assert.Equal(t, "tiny-llama:latest", gjson.GetBytes(last.Body, "model").String(), "the backend got the page's body")
}

func TestExplorerEmbeds(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama", "nomic-embed-text"}})
	defer a.Close()
	loadCaddy(t, "backend a "+a.URL+"\nexplorer")
	waitKnown(t, []*fakeollama.Server{a})

	x := openExplorer(t, siteURL+"/explorer/")
	x.choose("#api", "openai")
	x.choose("#endpoint", "embeddings")
	x.waitFor(`document.getElementById("models-status").textContent === "2 models"`)
	assert.Equal(t, "/v1/embeddings", x.text("path"))
	var model string
	x.eval(`document.getElementById("model").value`, &model)
	assert.Equal(t, "nomic-embed-text:latest", model, "an embedding model is chosen for embeddings (/v1/models)")
	var disabled bool
	x.eval(`document.getElementById("stream").disabled`, &disabled)
	assert.True(t, disabled, "embeddings do not stream")

	x.click("#send")
	x.waitFor(`document.body.dataset.state === "done"`)
	assert.Equal(t, "200 OK", x.text("status"))
	raw := x.text("raw")
	vec := gjson.Get(raw, "data.0.embedding").Array()
	require.Len(t, vec, 32, "the fake's vectors: %s", raw)
	var dims string
	x.eval(`document.getElementById("output").dataset.dimensions`, &dims)
	assert.Equal(t, "32", dims)
	out := x.text("output")
	assert.True(t, strings.HasPrefix(out, "1 vector of 32 dimensions\n[0] "), out)
	var first []string
	for _, v := range vec[:8] {
		first = append(first, strconv.FormatFloat(v.Float(), 'f', 6, 64))
	}
	assert.Contains(t, out, "[0] "+strings.Join(first, ", ")+", …", "the first values as the body has them")
	assert.Equal(t, gjson.Get(raw, "usage.prompt_tokens").String(), x.text("tokens"), "input tokens from usage")
	assert.Equal(t, "a", x.headers()["x-ollamaflow-backend"])
	x.screenshot("explorer-embedding")

	last := lastRequest(t, a, "/v1/embeddings")
	assert.Equal(t, "nomic-embed-text:latest", gjson.GetBytes(last.Body, "model").String())
}

func TestExplorerLoadTestShowsSpread(t *testing.T) {
	var fs []*fakeollama.Server
	var cfg strings.Builder
	cfg.WriteString("lb_policy round_robin\nexplorer\n")
	for _, name := range []string{"alpha", "beta", "gamma"} {
		f := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3})
		defer f.Close()
		fs = append(fs, f)
		fmt.Fprintf(&cfg, "backend %s %s\n", name, f.URL)
	}
	loadCaddy(t, cfg.String())
	waitKnown(t, fs)

	x := openExplorer(t, siteURL+"/explorer/")
	x.click("#stream") // a non-streamed chat
	var body map[string]any
	x.eval(`JSON.parse(document.getElementById("body").value)`, &body)
	require.Equal(t, false, body["stream"], "unticking Stream sets it in the body")
	for _, f := range fs {
		f.ResetStats()
	}

	x.typeInto("#lt-n", "30")
	x.typeInto("#lt-c", "4")
	x.click("#lt-run")
	x.waitFor(`document.body.dataset.loadtest === "done"`)

	spread := x.rows("lt-spread", "backend")
	served := map[string]int{"alpha": fs[0].Count("/api/chat"), "beta": fs[1].Count("/api/chat"), "gamma": fs[2].Count("/api/chat")}
	assert.Equal(t, served, spread, "the spread shown is what each backend received")
	assert.Equal(t, map[string]int{"alpha": 10, "beta": 10, "gamma": 10}, spread, "round_robin over three")
	assert.Equal(t, map[string]int{"200": 30}, x.rows("lt-status", "status"))
	var bars []int
	x.eval(`[...document.querySelectorAll("#lt-hist rect")].map(r => +r.dataset.count)`, &bars)
	sum := 0
	for _, c := range bars {
		sum += c
	}
	assert.Equal(t, 30, sum, "the histogram holds every request: %v", bars)
	assert.NotEqual(t, "–", x.text("lt-rps"))
	assert.NotEqual(t, "–", x.text("lt-p50"))
	assert.Contains(t, x.text("lt-state"), "done: 30 of 30 requests at concurrency 4")
	var tps string
	x.eval(`document.getElementById("lt-tps").textContent`, &tps)
	assert.NotEqual(t, "0.00", tps, "tokens counted from each answer's eval_count")
	x.screenshot("explorer-loadtest")

	// The page bounds what it sends: 1000 requests, 32 at a time.
	for _, f := range fs {
		f.ResetStats()
		f.Hold("/api/chat")
	}
	x.typeInto("#lt-n", "5000")
	x.typeInto("#lt-c", "99")
	x.click("#lt-run")
	x.waitFor(`document.getElementById("lt-n").value === "1000" && document.getElementById("lt-c").value === "32"`)
	require.Eventually(t, func() bool {
		n := 0
		for _, f := range fs {
			n += f.InFlight()
		}
		return n > 0
	}, 20*time.Second, 10*time.Millisecond, "the run started")
	var note string
	x.eval(`document.getElementById("lt-state").textContent`, &note)
	assert.Contains(t, note, "over plain HTTP the browser sends at most 6 at once", "the page says why C > 6 is not C over HTTP/1.1")
	x.click("#lt-stop")
	for _, f := range fs {
		f.Release()
	}
	x.waitFor(`document.body.dataset.loadtest === "stopped"`)
	total := 0
	for _, f := range fs {
		total += f.MaxInFlight()
	}
	assert.LessOrEqual(t, total, 32, "never more than 32 at once")
	received := 0
	for _, f := range fs {
		received += f.Count("/api/chat")
	}
	assert.Less(t, received, 1000, "Stop stops the run")
	var progressMax int
	x.eval(`document.getElementById("lt-progress").max`, &progressMax)
	assert.Equal(t, 1000, progressMax)
}

func TestExplorerShowsErrorsInTheAPIsFormat(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}})
	defer a.Close()
	loadCaddy(t, "backend a "+a.URL+"\nexplorer")
	waitKnown(t, []*fakeollama.Server{a})
	x := openExplorer(t, siteURL+"/explorer/")

	// Live syntax checking: the position is where Go's decoder (Ollama's)
	// stops too.
	for _, bad := range []string{`{"model": x}`, `{"model":"a",}`, `{"model":"a" "b"}`, `{"model":"a"`, `[1,2]]`} {
		x.typeInto("#body", bad)
		var v any
		err := json.Unmarshal([]byte(bad), &v)
		var se *json.SyntaxError
		col := len(bad) + 1 // the end of the input
		if assert.ErrorAs(t, err, &se, bad) && !strings.Contains(err.Error(), "unexpected end") {
			col = int(se.Offset)
		}
		check := x.text("body-check")
		assert.True(t, strings.HasPrefix(check, fmt.Sprintf("Line 1, column %d: ", col)), "%s: %s", bad, check)
		var cls string
		x.eval(`document.getElementById("body").className`, &cls)
		assert.Equal(t, "bad", cls, bad)
	}
	x.typeInto("#body", "{\n  \"model\": \"tiny-llama\",\n}")
	assert.True(t, strings.HasPrefix(x.text("body-check"), `Line 3, column 1: expected a key in double quotes, found "}"`), x.text("body-check"))
	x.screenshot("explorer-syntax-error")

	// Sent anyway, the frontend answers 400 in Ollama's format.
	x.click("#send")
	x.waitFor(`document.body.dataset.state === "error"`)
	_, want := post(t, "/api/chat", "{\n  \"model\": \"tiny-llama\",\n}")
	assert.Equal(t, "400 Bad Request", x.text("status"))
	assert.Equal(t, gjson.Get(want, "error").String(), x.text("error")[len("HTTP 400 (Ollama format)"):], "the frontend's own message")

	// A model found nowhere: 404, Ollama's format, then OpenAI's.
	missing := `{"model":"no-such-model","messages":[{"role":"user","content":"hi"}],"stream":false}`
	x.typeInto("#body", missing)
	x.click("#send")
	x.waitFor(`document.body.dataset.state === "error"`)
	_, want = post(t, "/api/chat", missing)
	var format string
	x.eval(`document.getElementById("error").dataset.format`, &format)
	assert.Equal(t, "Ollama", format)
	assert.Equal(t, "404 Not Found", x.text("status"))
	var msg string
	x.eval(`document.querySelector("#error .msg").textContent`, &msg)
	assert.Equal(t, gjson.Get(want, "error").String(), msg)
	assert.Contains(t, msg, "no-such-model")

	x.choose("#api", "openai")
	x.waitFor(`document.getElementById("models-status").textContent === "1 model"`)
	x.typeInto("#body", missing)
	x.click("#send")
	x.waitFor(`document.body.dataset.state === "error"`)
	_, want = post(t, "/v1/chat/completions", missing)
	x.eval(`document.getElementById("error").dataset.format`, &format)
	assert.Equal(t, "OpenAI", format)
	var shown map[string]string
	x.eval(`({msg: document.querySelector("#error .msg").textContent, type: document.querySelector("#error .type").textContent, code: document.querySelector("#error .code").textContent})`, &shown)
	assert.Equal(t, map[string]string{
		"msg":  gjson.Get(want, "error.message").String(),
		"type": gjson.Get(want, "error.type").String(),
		"code": gjson.Get(want, "error.code").String(),
	}, shown)
	assert.Equal(t, "model_not_found", shown["code"])
	x.screenshot("explorer-error-openai")

	// Dark theme: the same page under prefers-color-scheme: dark.
	require.NoError(t, x.p.ColorScheme(x.ctx, "dark"))
	var bg string
	x.eval(`getComputedStyle(document.body).backgroundColor`, &bg)
	assert.Equal(t, "rgb(17, 19, 24)", bg, "the dark palette applies")
	x.screenshot("explorer-error-dark")
}

// A frontend with tenants: the person enters the key once, it goes as a
// Bearer token, stays in the tab's session, the tenant's rate-limit headers
// show, and the copied curl command works with the key from the environment.
func TestExplorerKeyAndCurl(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 3})
	defer a.Close()
	const key = "k-123"
	t.Setenv("EXPLORER_TEST_KEY", key)
	loadCaddy(t, fmt.Sprintf(`backend a %s
explorer
tenants {
	tenant team {
		key {env.EXPLORER_TEST_KEY}
		requests_per_minute 100
	}
}`, a.URL))
	waitKnown(t, []*fakeollama.Server{a})
	_, refused := send(t, http.MethodGet, siteURL+"/api/tags", "")

	x := openExplorer(t, siteURL+"/explorer/")
	assert.Equal(t, "GET /api/tags: 401 "+gjson.Get(refused, "error").String(), x.text("models-status"), "without a key the list is refused, and the page says why")

	x.typeInto("#key", key)
	x.click("#refresh-models")
	x.waitFor(`document.getElementById("models-status").textContent === "1 model"`)
	var stored struct {
		Session string
		Local   int
	}
	x.eval(`({session: sessionStorage.getItem("ollamaflow.explorer.key"), local: localStorage.length})`, &stored)
	assert.Equal(t, key, stored.Session, "kept in the tab's session")
	assert.Zero(t, stored.Local, "nothing in local storage")

	// The key survives a reload of the tab.
	require.NoError(t, x.p.Navigate(x.ctx, siteURL+"/explorer/"))
	x.waitFor(`document.body.dataset.ready === "true"`)
	var kept string
	x.eval(`document.getElementById("key").value`, &kept)
	assert.Equal(t, key, kept)
	assert.Equal(t, "1 model", x.text("models-status"))

	x.click("#send")
	x.waitFor(`document.body.dataset.state === "done"`)
	assert.Equal(t, fakeollama.Text(3), x.text("output"))
	h := x.headers()
	assert.Equal(t, "100", h["x-ratelimit-limit-requests"], "the tenant's rate-limit headers are listed: %v", h)
	assert.NotEmpty(t, h["x-ratelimit-remaining-requests"])
	var ours []string
	x.eval(`[...document.querySelectorAll("#headers tr.ours")].map(r => r.dataset.header)`, &ours)
	assert.Subset(t, ours, []string{"x-ollamaflow-backend", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"}, "and highlighted")
	assert.NotContains(t, lastRequest(t, a, "/api/chat").Header, "Authorization", "the client's key never reaches a backend")

	require.NoError(t, x.b.GrantPermissions(x.ctx, siteURL, "clipboardReadWrite", "clipboardSanitizedWrite"))
	x.click("#copy-curl")
	x.waitFor(`document.getElementById("copy-note").textContent.startsWith("Copied.")`)
	var copied string
	x.eval(`navigator.clipboard.readText()`, &copied)
	assert.Equal(t, x.text("curl"), copied, "the clipboard holds the command shown")
	assert.NotContains(t, copied, key, "the key itself is never in the copied text")
	assert.Contains(t, copied, `-H "Authorization: Bearer $OLLAMAFLOW_API_KEY"`)
	assert.Contains(t, copied, " -N ", "a streamed request is read unbuffered")
	x.screenshot("explorer-curl")

	// The copied command, run by a shell, gets the same kind of answer.
	if _, err := exec.LookPath("curl"); err != nil {
		t.Log("no curl binary: the copied command is not run")
		return
	}
	runCurl := func(env ...string) string {
		cmd := exec.CommandContext(x.ctx, "sh", "-c", copied)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s\n%s", copied, out)
		return string(out)
	}
	out := runCurl("OLLAMAFLOW_API_KEY=" + key)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var text strings.Builder
	for _, l := range lines {
		text.WriteString(gjson.Get(l, "message.content").String())
	}
	assert.Equal(t, fakeollama.Text(3), text.String(), "the command streams the same chat:\n%s", out)
	assert.True(t, gjson.Get(lines[len(lines)-1], "done").Bool())
	last := lastRequest(t, a, "/api/chat")
	var sent, typed any
	require.NoError(t, json.Unmarshal(last.Body, &sent))
	var bodyText string
	x.eval(`document.getElementById("body").value`, &bodyText)
	require.NoError(t, json.Unmarshal([]byte(bodyText), &typed))
	assert.Equal(t, typed, sent, "the command sends the body on screen")
	wrong := runCurl("OLLAMAFLOW_API_KEY=wrong")
	assert.NotEmpty(t, gjson.Get(wrong, "error").String(), "and needs the key: %s", wrong)
	assert.NotContains(t, wrong, key)
}

// The explorer behind a path prefix (handle_path strips it): the page
// finds the APIs beside itself, not at the site's root.
func TestExplorerBehindAPathPrefix(t *testing.T) {
	a := fakeollama.New(fakeollama.Config{Models: []string{"tiny-llama"}, Tokens: 2})
	defer a.Close()
	loadCaddyfile(t, fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	skip_install_trust
}
:%d {
	handle_path /llm/* {
		ollamaflow {
			backend a %s
			explorer
		}
	}
	respond 404
}
`, adminPort, sitePort, tlsPort, sitePort, a.URL))
	dropIdleConnections()
	waitKnown(t, []*fakeollama.Server{a})

	res, err := noRedirects.Get(siteURL + "/llm/explorer")
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, http.StatusMovedPermanently, res.StatusCode)
	x := openExplorer(t, siteURL+"/llm/explorer") // the redirect, as a browser follows it
	var href string
	x.eval(`location.pathname`, &href)
	assert.Equal(t, "/llm/explorer/", href)
	assert.Equal(t, "1 model", x.text("models-status"), "the list came from /llm/api/tags")
	x.click("#send")
	x.waitFor(`document.body.dataset.state === "done"`)
	assert.Equal(t, fakeollama.Text(2), x.text("output"))
	assert.Contains(t, x.text("curl"), siteURL+"/llm/api/chat")
}
