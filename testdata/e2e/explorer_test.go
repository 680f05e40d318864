package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tidwall/gjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/browser"
)

// TestExplorerStreamsFromRealOllama opens the API Explorer of a frontend in
// headless Chromium, as a person would, and streams a chat from a real
// Ollama: the page shows the tokens as they arrive (a MutationObserver the
// test installs records each token the page appends, and when), the serving
// backend, and tokens per second from the server's own final counts; the
// server's log shows the chat it answered.
func TestExplorerStreamsFromRealOllama(t *testing.T) {
	scenario(t)
	bin := findChromium(t)
	useConfig(t, "\t\tlb_policy first\n\t\texplorer\n")
	a := env.servers[0]
	// The new frontend's first probe must have seen a (lb_policy first).
	if !eventually(60*time.Second, func() bool {
		res, _, err := postJSON(env.extraURL, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":1}}`)
		return err == nil && res.StatusCode == 200 && res.Header.Get("X-OllamaFlow-Backend") == a.name
	}) {
		t.Fatal("the explorer's frontend never served a chat from a")
	}
	before := chatsLogged(a, http.StatusOK)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b, err := browser.Launch(ctx, bin, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	p, err := b.NewPage(ctx, 1400, 1000)
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%v (page errors: %v)", err, p.Errors())
		}
	}
	text := func(id string) string {
		t.Helper()
		var s string
		must(p.Eval(ctx, fmt.Sprintf(`document.getElementById(%q).textContent`, id), &s))
		return s
	}
	// The extra frontend listens on a loopback IP; the page calls its own
	// origin, whatever it is.
	must(p.Navigate(ctx, env.extraURL+"/explorer/"))
	must(p.WaitFor(ctx, `document.body.dataset.ready === "true"`))
	var models []string
	must(p.Eval(ctx, `[...document.getElementById("model").options].map(o => o.value)`, &models))
	if !contains(models, "tiny-llama:latest") || !contains(models, "tiny-bert:latest") {
		t.Fatalf("model list %v: want tiny-llama:latest and tiny-bert:latest", models)
	}
	must(p.Select(ctx, "#model", "tiny-llama:latest"))
	// Enough tokens to span several page updates however fast the
	// machine: 24 at 3,000 tokens/s (an idle CI machine) took 8 ms and
	// all arrived in one read.
	const tokens = 256
	must(p.Type(ctx, "#body", fmt.Sprintf(`{"model":"tiny-llama:latest","messages":[{"role":"user","content":"hi"}],"stream":true,"options":{"num_predict":%d}}`, tokens)))
	if got := text("body-check"); got != "Valid JSON" {
		t.Fatalf("body check: %q", got)
	}
	must(p.Eval(ctx, `window.__seen = []; new MutationObserver((records) => {
		for (const r of records) for (const n of r.addedNodes) window.__seen.push({text: n.textContent, at: performance.now()});
	}).observe(document.getElementById("output"), {childList: true})`, nil))
	must(p.Click(ctx, "#send"))
	must(p.WaitFor(ctx, `document.body.dataset.state === "done" || document.body.dataset.state === "error"`))

	if got := text("status"); got != "200 OK" {
		t.Fatalf("status %q; error box %q", got, text("error"))
	}
	if got := text("backend-pill"); got != "backend a" {
		t.Errorf("backend pill %q, want backend a (lb_policy first)", got)
	}
	raw := strings.TrimSpace(text("raw"))
	lines := strings.Split(raw, "\n")
	final := gjson.Parse(lines[len(lines)-1])
	if !final.Get("done").Bool() {
		t.Fatalf("the raw body does not end with the final chunk:\n%s", raw)
	}
	var want strings.Builder
	for _, l := range lines {
		want.WriteString(gjson.Get(l, "message.content").String())
	}
	output := text("output")
	if output != want.String() {
		t.Errorf("output %q, want the stream's text %q", output, want.String())
	}

	var seen []struct {
		Text string
		At   float64
	}
	must(p.Eval(ctx, `window.__seen`, &seen))
	var grown strings.Builder
	callbacks := map[float64]bool{}
	for _, s := range seen {
		grown.WriteString(s.Text)
		callbacks[s.At] = true
	}
	if grown.String() != output {
		t.Errorf("the appended pieces %q do not make up the output %q", grown.String(), output)
	}
	chunks := 0
	for _, l := range lines[:len(lines)-1] {
		if gjson.Get(l, "message.content").String() != "" {
			chunks++
		}
	}
	if len(seen) != chunks {
		t.Errorf("the page appended %d pieces for %d token chunks", len(seen), chunks)
	}
	if len(callbacks) < 2 {
		t.Errorf("all %d tokens appeared at once; want them as they arrive", len(seen))
	}
	evalCount, evalNs := final.Get("eval_count").Int(), final.Get("eval_duration").Float()
	if evalCount != tokens {
		t.Errorf("eval_count %d, want num_predict %d", evalCount, tokens)
	}
	if got := text("tokens"); got != strconv.FormatInt(evalCount, 10) {
		t.Errorf("tokens shown %q, eval_count %d", got, evalCount)
	}
	rate := float64(evalCount) / (evalNs / 1e9)
	wantRate := strconv.FormatFloat(rate, 'f', 1, 64)
	if rate < 10 {
		wantRate = strconv.FormatFloat(rate, 'f', 2, 64)
	}
	if got := text("tps"); got != wantRate {
		t.Errorf("tokens/s shown %q, eval_count/eval_duration is %s", got, wantRate)
	}
	if after := chatsLogged(a, http.StatusOK); after != before+1 {
		t.Errorf("server a's log shows %d chats answered, want %d", after, before+1)
	}
	fmt.Printf("FIGURE explorer real-ollama: %d tokens in %d page updates, first token %s, total %s, %s tokens/s (eval_count/eval_duration)\n",
		evalCount, len(callbacks), text("ttft"), text("total"), text("tps"))

	png, err := p.Screenshot(ctx)
	must(err)
	dir := os.Getenv("OLLAMAFLOW_ARTIFACTS")
	if dir == "" {
		dir = env.workDir
	}
	shot := filepath.Join(dir, "explorer-real-ollama.png")
	must(os.WriteFile(shot, png, 0o644))
	t.Logf("screenshot: %s", shot)
	for _, e := range p.Errors() {
		t.Errorf("page error: %s", e)
	}
}

func findChromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no chromium: CI must run the explorer scenario (apt-get install chromium)")
	}
	t.Skip("no chromium")
	return ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
