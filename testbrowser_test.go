package ollamaflow

// The browser tests' handle on headless Chromium: internal/browser, the one
// DevTools driver, with each step failing the test on an error and bounded
// by its own timeout, so a test reads as the steps a person takes.

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/caddy-ollamaflow/ollamaflow/internal/browser"
)

// browserStep bounds one step (a call, or a wait for what the page shows).
const browserStep = 30 * time.Second

// testBrowser is one headless Chromium, closed when the test ends.
type testBrowser struct {
	t *testing.T
	b *browser.Browser
}

// startBrowser starts Chromium with its own profile (the test is skipped,
// or fails in CI, without one: see findBrowser).
func startBrowser(t *testing.T) *testBrowser {
	t.Helper()
	bin := findBrowser(t)
	ctx, cancel := context.WithTimeout(context.Background(), browserStep)
	defer cancel()
	// Screenshots that do not depend on the machine's scrollbars or font hinting.
	b, err := browser.Launch(ctx, bin, t.TempDir(), "--hide-scrollbars", "--font-render-hinting=none")
	require.NoError(t, err)
	t.Cleanup(func() { b.Close() })
	return &testBrowser{t: t, b: b}
}

// testPage is one tab of a testBrowser.
type testPage struct {
	t *testing.T
	p *browser.Page
}

// newPage opens a tab with a viewport of width×height CSS pixels.
func (tb *testBrowser) newPage(width, height int) *testPage {
	tb.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), browserStep)
	defer cancel()
	p, err := tb.b.NewPage(ctx, width, height)
	require.NoError(tb.t, err)
	return &testPage{t: tb.t, p: p}
}

// step runs fn with a context bounded by browserStep, failing the test on
// an error.
func (p *testPage) step(fn func(ctx context.Context) error, what string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), browserStep)
	defer cancel()
	require.NoError(p.t, fn(ctx), "%s; page errors: %v", what, p.p.Errors())
}

func (p *testPage) viewport(width, height int) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Viewport(ctx, width, height) }, "viewport")
}

// colorScheme makes prefers-color-scheme report "light" or "dark".
func (p *testPage) colorScheme(scheme string) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.ColorScheme(ctx, scheme) }, "color scheme")
}

// headers adds headers to every request the page makes (credentials, say).
func (p *testPage) headers(h map[string]string) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Headers(ctx, h) }, "headers")
}

// navigate loads url and waits for its document to have loaded.
func (p *testPage) navigate(url string) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Navigate(ctx, url) }, "navigating to "+url)
}

// eval evaluates a JavaScript expression (awaiting a promise) and decodes
// its value into out, when out is not nil.
func (p *testPage) eval(expr string, out any) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Eval(ctx, expr, out) }, "evaluating")
}

// waitFor waits until the expression is truthy: the page polls and
// renders on its own clock, so this waits for it rather than for a time.
func (p *testPage) waitFor(expr, what string) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), browserStep)
	defer cancel()
	if err := p.p.WaitFor(ctx, expr); err != nil {
		p.t.Fatalf("waiting for %s: %v; page errors: %v\n%s", what, err, p.p.Errors(), p.text())
	}
}

// text is the page's visible text, for failure messages.
func (p *testPage) text() string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, _ := p.p.Text(ctx)
	return s
}

// click presses the left mouse button over the middle of the element, as a
// person does: the page sees trusted events.
func (p *testPage) click(selector string) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Click(ctx, selector) }, "clicking "+selector)
}

// hover moves the mouse over the element, at fx of its width from its left
// edge and halfway down.
func (p *testPage) hover(selector string, fx float64) {
	p.t.Helper()
	p.step(func(ctx context.Context) error { return p.p.Hover(ctx, selector, fx) }, "hovering "+selector)
}

// screenshot saves a PNG of the whole page at width: the viewport takes the
// page's full height first, so nothing is cut or scrolled.
func (p *testPage) screenshot(path string, width int) {
	p.t.Helper()
	var height int
	p.eval(`Math.ceil(document.documentElement.scrollHeight)`, &height)
	p.viewport(width, height)
	var png []byte
	p.step(func(ctx context.Context) (err error) { png, err = p.p.Screenshot(ctx); return err }, "screenshot")
	require.Greater(p.t, len(png), 1000, "an empty screenshot")
	require.NoError(p.t, os.WriteFile(path, png, 0o644))
}

// responses lists the status of every response the page received for a
// URL containing part, in order.
func (p *testPage) responses(part string) []int { return p.p.Responses(part) }
