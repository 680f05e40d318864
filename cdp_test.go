package ollamaflow

// A minimal Chrome DevTools Protocol client, enough for tests to drive a
// real headless Chromium as a person would: open a page, wait for what it
// shows, click with the mouse, read the DOM and take screenshots. It talks
// over --remote-debugging-pipe (NUL-terminated JSON on file descriptors 3
// and 4), so it needs no WebSocket library and no port.

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// cdpBrowser is one headless Chromium process.
type cdpBrowser struct {
	t       *testing.T
	cmd     *exec.Cmd
	toChild io.WriteCloser

	mu      sync.Mutex
	nextID  int64
	pending map[int64]chan cdpMessage
	events  map[string][]cdpMessage // by session id
	exited  chan struct{}
	stderr  strings.Builder
}

type cdpMessage struct {
	ID        int64           `json:"id,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    json.RawMessage `json:"params,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

// startCDPBrowser starts Chromium with its own profile; it is closed when
// the test ends.
func startCDPBrowser(t *testing.T) *cdpBrowser {
	t.Helper()
	path := findBrowser(t)
	// fd 3: the browser reads commands; fd 4: it writes answers and events.
	cmdR, cmdW, err := os.Pipe()
	require.NoError(t, err)
	evR, evW, err := os.Pipe()
	require.NoError(t, err)
	b := &cdpBrowser{t: t, toChild: cmdW, pending: map[int64]chan cdpMessage{}, events: map[string][]cdpMessage{}, exited: make(chan struct{})}
	b.cmd = exec.Command(path,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-extensions", "--hide-scrollbars", "--font-render-hinting=none",
		"--remote-debugging-pipe", "--user-data-dir="+t.TempDir(), "about:blank")
	b.cmd.ExtraFiles = []*os.File{cmdR, evW}
	b.cmd.Stderr = &lockedWriter{mu: &b.mu, w: &b.stderr}
	require.NoError(t, b.cmd.Start())
	cmdR.Close()
	evW.Close()
	go b.readLoop(evR)
	go func() {
		_ = b.cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = b.call(ctx, "", "Browser.close", nil)
		select {
		case <-b.exited:
		case <-time.After(5 * time.Second):
			_ = b.cmd.Process.Kill()
			<-b.exited
		}
		cmdW.Close()
	})
	return b
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (b *cdpBrowser) readLoop(r io.ReadCloser) {
	defer func() {
		recover() // a malformed message ends the loop; pending calls time out
		r.Close()
	}()
	br := bufio.NewReaderSize(r, 1<<20)
	for {
		raw, err := br.ReadBytes(0)
		if err != nil {
			return
		}
		var m cdpMessage
		if json.Unmarshal(raw[:len(raw)-1], &m) != nil {
			continue
		}
		b.mu.Lock()
		if m.ID != 0 {
			if ch, ok := b.pending[m.ID]; ok {
				delete(b.pending, m.ID)
				ch <- m
			}
		} else if m.Method != "" {
			b.events[m.SessionID] = append(b.events[m.SessionID], m)
		}
		b.mu.Unlock()
	}
}

// call sends one command (to the browser when session is empty, else to
// that page) and returns its result.
func (b *cdpBrowser) call(ctx context.Context, session, method string, params any) (json.RawMessage, error) {
	ch := make(chan cdpMessage, 1)
	b.mu.Lock()
	b.nextID++
	id := b.nextID
	b.pending[id] = ch
	b.mu.Unlock()
	msg := map[string]any{"id": id, "method": method}
	if params != nil {
		msg["params"] = params
	}
	if session != "" {
		msg["sessionId"] = session
	}
	raw, err := json.Marshal(msg)
	if err != nil {
		return nil, err
	}
	if _, err := b.toChild.Write(append(raw, 0)); err != nil {
		return nil, fmt.Errorf("%s: %w", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return nil, fmt.Errorf("%s: %s (%d)", method, m.Error.Message, m.Error.Code)
		}
		return m.Result, nil
	case <-b.exited:
		b.mu.Lock()
		defer b.mu.Unlock()
		return nil, fmt.Errorf("%s: the browser exited: %s", method, b.stderr.String())
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: %w", method, ctx.Err())
	}
}

// cdpPage is one tab.
type cdpPage struct {
	b       *cdpBrowser
	t       *testing.T
	session string
}

// newPage opens a tab with a viewport of width×height CSS pixels.
func (b *cdpBrowser) newPage(width, height int) *cdpPage {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := b.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"})
	require.NoError(b.t, err)
	var target struct {
		TargetID string `json:"targetId"`
	}
	require.NoError(b.t, json.Unmarshal(res, &target))
	res, err = b.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true})
	require.NoError(b.t, err)
	var att struct {
		SessionID string `json:"sessionId"`
	}
	require.NoError(b.t, json.Unmarshal(res, &att))
	p := &cdpPage{b: b, t: b.t, session: att.SessionID}
	p.do("Page.enable", nil)
	p.do("Runtime.enable", nil)
	p.do("Network.enable", nil)
	p.viewport(width, height)
	return p
}

// do runs a command on the page, failing the test on an error.
func (p *cdpPage) do(method string, params any) json.RawMessage {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := p.b.call(ctx, p.session, method, params)
	require.NoError(p.t, err)
	return res
}

func (p *cdpPage) viewport(width, height int) {
	p.t.Helper()
	p.do("Emulation.setDeviceMetricsOverride", map[string]any{"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false})
}

// colorScheme makes prefers-color-scheme report "light" or "dark".
func (p *cdpPage) colorScheme(scheme string) {
	p.t.Helper()
	p.do("Emulation.setEmulatedMedia", map[string]any{"features": []map[string]string{{"name": "prefers-color-scheme", "value": scheme}}})
}

// headers adds headers to every request the page makes (credentials, say).
func (p *cdpPage) headers(h map[string]string) {
	p.t.Helper()
	p.do("Network.setExtraHTTPHeaders", map[string]any{"headers": h})
}

// navigate loads url and waits for its load event to have run.
func (p *cdpPage) navigate(url string) {
	p.t.Helper()
	res := p.do("Page.navigate", map[string]any{"url": url})
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	require.NoError(p.t, json.Unmarshal(res, &nav))
	require.Empty(p.t, nav.ErrorText, "navigating to %s", url)
	p.waitFor(`document.readyState === "complete"`, "the page to load")
}

// eval evaluates a JavaScript expression (awaiting a promise) and decodes
// its value into out, when out is not nil.
func (p *cdpPage) eval(expr string, out any) {
	p.t.Helper()
	require.NoError(p.t, p.tryEval(expr, out))
}

func (p *cdpPage) tryEval(expr string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := p.b.call(ctx, p.session, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true})
	if err != nil {
		return err
	}
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		return err
	}
	if r.ExceptionDetails != nil {
		return fmt.Errorf("%s: %s %s", expr, r.ExceptionDetails.Text, r.ExceptionDetails.Exception.Description)
	}
	if out != nil && len(r.Result.Value) > 0 {
		return json.Unmarshal(r.Result.Value, out)
	}
	return nil
}

// waitFor waits until the expression is truthy: the page polls and
// renders on its own clock, so this waits for it rather than for a time.
func (p *cdpPage) waitFor(expr, what string) {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		var ok bool
		if last = p.tryEval("!!("+expr+")", &ok); last == nil && ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.t.Fatalf("waiting for %s (%s): never true; last error: %v\n%s", what, expr, last, p.text())
}

// text is the page's visible text, for failure messages.
func (p *cdpPage) text() string {
	var s string
	_ = p.tryEval(`document.body ? document.body.innerText : ""`, &s)
	return s
}

// click moves the mouse to the middle of the element and presses the left
// button, as a person does: the page sees trusted events.
func (p *cdpPage) click(selector string) {
	p.t.Helper()
	var box struct{ X, Y float64 }
	p.eval(fmt.Sprintf(`(() => {
		const e = document.querySelector(%q);
		if (!e) throw new Error("no element matches " + %[1]q);
		e.scrollIntoView({block: "center"});
		const r = e.getBoundingClientRect();
		return {X: r.left + r.width / 2, Y: r.top + r.height / 2};
	})()`, selector), &box)
	for _, typ := range []string{"mouseMoved", "mousePressed", "mouseReleased"} {
		p.do("Input.dispatchMouseEvent", map[string]any{"type": typ, "x": box.X, "y": box.Y, "button": "left", "clickCount": 1})
	}
}

// hover moves the mouse over the element, at fx of its width from its left
// edge and halfway down.
func (p *cdpPage) hover(selector string, fx float64) {
	p.t.Helper()
	var box struct{ X, Y float64 }
	p.eval(fmt.Sprintf(`(() => {
		const e = document.querySelector(%q);
		if (!e) throw new Error("no element matches " + %[1]q);
		e.scrollIntoView({block: "center"});
		const r = e.getBoundingClientRect();
		return {X: r.left + r.width * %[2]f, Y: r.top + r.height / 2};
	})()`, selector, fx), &box)
	p.do("Input.dispatchMouseEvent", map[string]any{"type": "mouseMoved", "x": box.X, "y": box.Y})
}

// screenshot saves a PNG of the whole page at the viewport's width.
func (p *cdpPage) screenshot(path string, width int) {
	p.t.Helper()
	var height int
	p.eval(`Math.ceil(document.documentElement.scrollHeight)`, &height)
	p.viewport(width, height)
	res := p.do("Page.captureScreenshot", map[string]any{"format": "png"})
	var shot struct {
		Data string `json:"data"`
	}
	require.NoError(p.t, json.Unmarshal(res, &shot))
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	require.NoError(p.t, err)
	require.NoError(p.t, os.WriteFile(path, png, 0o644))
}

// responses lists the status of every response the page received for a
// URL containing part, in order.
func (p *cdpPage) responses(part string) []int {
	p.b.mu.Lock()
	defer p.b.mu.Unlock()
	var out []int
	for _, ev := range p.b.events[p.session] {
		if ev.Method != "Network.responseReceived" {
			continue
		}
		var r struct {
			Response struct {
				URL    string `json:"url"`
				Status int    `json:"status"`
			} `json:"response"`
		}
		if json.Unmarshal(ev.Params, &r) == nil && strings.Contains(r.Response.URL, part) {
			out = append(out, r.Response.Status)
		}
	}
	return out
}
