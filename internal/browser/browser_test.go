package browser_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/browser"
)

func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("no chromium in CI")
	}
	t.Skip("no chromium")
	return ""
}

// A page's own errors are reported, a script the page's CSP refuses among
// them, so the explorer's tests can tell a policy that blocks its script.
func TestPageClicksTypesAndReportsRefusedScripts(t *testing.T) {
	bin := chromium(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/favicon.ico", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `<!doctype html><input id="in"><button id="b" style="margin:300px">go</button><p id="out"></p>
<script>document.getElementById("b").onclick = (e) => { document.getElementById("out").textContent = "clicked " + e.isTrusted + " " + document.getElementById("in").value; };</script>`)
	})
	mux.HandleFunc("/refused", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'none'")
		fmt.Fprint(w, `<!doctype html><p id="out">static</p><script>document.getElementById("out").textContent = "ran";</script>`)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := browser.Launch(ctx, bin, t.TempDir())
	require.NoError(t, err)
	defer b.Close()
	p, err := b.NewPage(ctx, 800, 600)
	require.NoError(t, err)

	require.NoError(t, p.Navigate(ctx, srv.URL+"/ok"))
	require.NoError(t, p.Type(ctx, "#in", "typed text"))
	require.NoError(t, p.Click(ctx, "#b"))
	require.NoError(t, p.WaitFor(ctx, `document.getElementById("out").textContent !== ""`))
	var out string
	require.NoError(t, p.Eval(ctx, `document.getElementById("out").textContent`, &out))
	assert.Equal(t, "clicked true typed text", out, "a trusted mouse click, after typing")
	assert.Empty(t, p.Errors())
	png, err := p.Screenshot(ctx)
	require.NoError(t, err)
	assert.Equal(t, "\x89PNG", string(png[:4]))

	require.NoError(t, p.Navigate(ctx, srv.URL+"/refused"))
	require.NoError(t, p.Eval(ctx, `document.getElementById("out").textContent`, &out))
	assert.Equal(t, "static", out, "the policy kept the script from running")
	require.Eventually(t, func() bool {
		for _, e := range p.Errors() {
			if strings.Contains(e, "Content Security Policy") {
				return true
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond, "the refusal is reported: %v", p.Errors())

	err = p.Eval(ctx, `(() => { throw new Error("boom") })()`, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "boom")
}

// Headers set on a page reach the server with every request, the page's
// responses are listed with their status, and a hover is a real mouse move.
func TestPageHeadersResponsesAndHover(t *testing.T) {
	bin := chromium(t)
	mux := http.NewServeMux()
	mux.HandleFunc("/favicon.ico", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/page", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Basic b3BzOnB3" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		fmt.Fprint(w, `<!doctype html><div id="box" style="width:200px;height:50px;margin:20px"></div><p id="out"></p>
<script>
document.getElementById("box").onmousemove = (e) => { document.getElementById("out").textContent = "at " + Math.round(e.offsetX) + " " + e.isTrusted; };
fetch("/missing").then(() => { document.body.dataset.done = "1"; });
</script>`)
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := browser.Launch(ctx, bin, t.TempDir())
	require.NoError(t, err)
	defer b.Close()
	p, err := b.NewPage(ctx, 800, 600)
	require.NoError(t, err)

	require.NoError(t, p.Headers(ctx, map[string]string{"Authorization": "Basic b3BzOnB3"}))
	require.NoError(t, p.Navigate(ctx, srv.URL+"/page"))
	require.NoError(t, p.WaitFor(ctx, `document.body.dataset.done === "1"`))
	assert.Equal(t, []int{http.StatusOK}, p.Responses("/page"), "the page was let in with the header")
	assert.Equal(t, []int{http.StatusNotFound}, p.Responses("/missing"))

	require.NoError(t, p.Hover(ctx, "#box", 0.75))
	require.NoError(t, p.WaitFor(ctx, `document.getElementById("out").textContent !== ""`))
	text, err := p.Text(ctx)
	require.NoError(t, err)
	assert.Equal(t, "at 150 true", strings.TrimSpace(text), "the mouse is three quarters across the box")
}
