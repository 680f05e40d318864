// Package browser drives headless Chromium for the browser tests of the
// pages the module serves (the API Explorer, the dashboard). It speaks the
// Chrome DevTools Protocol over --remote-debugging-pipe (JSON messages,
// each ended by a NUL byte, on file descriptors 3 and 4), which needs no
// WebSocket library and no port: the browser is a child process whose pipe
// only the test holds.
//
//	b, err := browser.Launch(ctx, "/usr/bin/chromium", t.TempDir())
//	defer b.Close()
//	p, err := b.NewPage(ctx)
//	err = p.Navigate(ctx, url)
//	err = p.Click(ctx, "#send")
//	err = p.WaitFor(ctx, `document.body.dataset.state === "done"`)
//	var text string
//	err = p.Eval(ctx, `document.getElementById("output").textContent`, &text)
//	png, err := p.Screenshot(ctx)
//
// Only tests use it; it is not part of the module's handler.
package browser

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// Browser is one headless Chromium process.
type Browser struct {
	cmd    *exec.Cmd
	w      *os.File // the browser's fd 3: what we send
	r      *os.File // the browser's fd 4: what it answers
	stderr *strings.Builder

	wmu sync.Mutex // one message at a time on the pipe

	mu      sync.Mutex
	nextID  int64
	pending map[int64]chan message
	logs    map[string][]string // by session: console errors, exceptions, error log entries
	answers map[string][]answer // by session: every response the page received
	closed  chan struct{}
	readErr error
}

type message struct {
	ID        int64           `json:"id,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    json.RawMessage `json:"params,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
		Data    string `json:"data"`
	} `json:"error,omitempty"`
}

// Launch starts headless Chromium with its own profile in dir. Extra
// arguments go on its command line (e.g. "--window-size=1400,1000").
func Launch(ctx context.Context, binary, dir string, args ...string) (*Browser, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	args = append([]string{
		"--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--disable-quic",
		"--no-first-run", "--no-default-browser-check", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--disable-extensions",
		"--user-data-dir=" + dir,
	}, args...)
	args = append(args, "about:blank")
	cmd := exec.Command(binary, args...)
	cmd.ExtraFiles = []*os.File{inR, outW} // fd 3 and fd 4 in the child
	stderr := new(strings.Builder)
	cmd.Stderr = &limitedWriter{b: stderr, left: 1 << 20}
	if err := cmd.Start(); err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return nil, err
	}
	inR.Close()
	outW.Close()
	b := &Browser{cmd: cmd, w: inW, r: outR, stderr: stderr, pending: map[int64]chan message{},
		logs: map[string][]string{}, answers: map[string][]answer{}, closed: make(chan struct{})}
	go b.read()
	// The browser answers once it is up; a first call proves it.
	var v struct{ Product string }
	if err := b.call(ctx, "", "Browser.getVersion", nil, &v); err != nil {
		b.Close()
		return nil, fmt.Errorf("chromium did not answer on its pipe: %w\n%s", err, stderr.String())
	}
	return b, nil
}

// limitedWriter keeps at most left bytes of the browser's stderr.
type limitedWriter struct {
	mu   sync.Mutex
	b    *strings.Builder
	left int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.left > 0 {
		n := min(len(p), l.left)
		l.b.Write(p[:n])
		l.left -= n
	}
	return len(p), nil
}

func (b *Browser) read() {
	defer func() {
		if r := recover(); r != nil {
			b.fail(fmt.Errorf("reading the browser's pipe panicked: %v", r))
		}
	}()
	br := bufio.NewReaderSize(b.r, 1<<20)
	for {
		raw, err := br.ReadBytes(0)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, os.ErrClosed) {
				err = errors.New("the browser closed its pipe")
			}
			b.fail(err)
			return
		}
		var m message
		if err := json.Unmarshal(raw[:len(raw)-1], &m); err != nil {
			continue
		}
		if m.ID != 0 {
			b.mu.Lock()
			ch := b.pending[m.ID]
			delete(b.pending, m.ID)
			b.mu.Unlock()
			if ch != nil {
				ch <- m
			}
			continue
		}
		b.event(m)
	}
}

func (b *Browser) fail(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.readErr == nil {
		b.readErr = err
		close(b.closed)
	}
}

// answer is one response a page received.
type answer struct {
	url    string
	status int
}

// event keeps what a test wants to know went wrong in a page (uncaught
// exceptions, console.error, and the browser's own error log: a refused
// Content-Security-Policy, a failed load), and the responses it received.
func (b *Browser) event(m message) {
	var line string
	switch m.Method {
	case "Network.responseReceived":
		var p struct {
			Response struct {
				URL    string `json:"url"`
				Status int    `json:"status"`
			} `json:"response"`
		}
		if json.Unmarshal(m.Params, &p) == nil {
			b.mu.Lock()
			b.answers[m.SessionID] = append(b.answers[m.SessionID], answer{p.Response.URL, p.Response.Status})
			b.mu.Unlock()
		}
		return
	case "Runtime.exceptionThrown":
		var p struct {
			ExceptionDetails struct {
				Text      string `json:"text"`
				Exception struct {
					Description string `json:"description"`
				} `json:"exception"`
			} `json:"exceptionDetails"`
		}
		_ = json.Unmarshal(m.Params, &p)
		line = "exception: " + p.ExceptionDetails.Text + " " + p.ExceptionDetails.Exception.Description
	case "Runtime.consoleAPICalled":
		var p struct {
			Type string `json:"type"`
			Args []struct {
				Value       any    `json:"value"`
				Description string `json:"description"`
			} `json:"args"`
		}
		_ = json.Unmarshal(m.Params, &p)
		if p.Type != "error" && p.Type != "assert" {
			return
		}
		var parts []string
		for _, a := range p.Args {
			parts = append(parts, fmt.Sprint(a.Value)+a.Description)
		}
		line = "console." + p.Type + ": " + strings.Join(parts, " ")
	case "Log.entryAdded":
		var p struct {
			Entry struct {
				Level  string `json:"level"`
				Source string `json:"source"`
				Text   string `json:"text"`
				URL    string `json:"url"`
			} `json:"entry"`
		}
		_ = json.Unmarshal(m.Params, &p)
		if p.Entry.Level != "error" {
			return
		}
		line = "log (" + p.Entry.Source + "): " + p.Entry.Text + " " + p.Entry.URL
	default:
		return
	}
	b.mu.Lock()
	b.logs[m.SessionID] = append(b.logs[m.SessionID], line)
	b.mu.Unlock()
}

// call sends one command (to a page's session, or the browser with "") and
// decodes its result into out (nil: ignore it).
func (b *Browser) call(ctx context.Context, session, method string, params, out any) error {
	b.mu.Lock()
	if b.readErr != nil {
		err := b.readErr
		b.mu.Unlock()
		return err
	}
	b.nextID++
	id := b.nextID
	ch := make(chan message, 1)
	b.pending[id] = ch
	b.mu.Unlock()

	req := map[string]any{"id": id, "method": method}
	if params != nil {
		req["params"] = params
	}
	if session != "" {
		req["sessionId"] = session
	}
	raw, err := json.Marshal(req)
	if err != nil {
		return err
	}
	b.wmu.Lock()
	_, err = b.w.Write(append(raw, 0))
	b.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return fmt.Errorf("%s: %s %s", method, m.Error.Message, m.Error.Data)
		}
		if out != nil && len(m.Result) > 0 {
			return json.Unmarshal(m.Result, out)
		}
		return nil
	case <-b.closed:
		return fmt.Errorf("%s: %w", method, b.readErr)
	case <-ctx.Done():
		b.mu.Lock()
		delete(b.pending, id)
		b.mu.Unlock()
		return fmt.Errorf("%s: %w", method, ctx.Err())
	}
}

// Close ends the browser process and waits for it.
func (b *Browser) Close() error {
	b.w.Close() // the browser exits when its pipe closes
	done := make(chan error, 1)
	go func() { done <- b.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
		<-done
	}
	b.r.Close()
	return nil
}

// Stderr is what the browser printed on its standard error (at most 1 MiB).
func (b *Browser) Stderr() string { return b.stderr.String() }

// GrantPermissions grants the page origin permissions, e.g.
// "clipboardReadWrite", "clipboardSanitizedWrite".
func (b *Browser) GrantPermissions(ctx context.Context, origin string, perms ...string) error {
	return b.call(ctx, "", "Browser.grantPermissions", map[string]any{"origin": origin, "permissions": perms}, nil)
}

// Page is one tab.
type Page struct {
	b       *Browser
	session string
}

// NewPage opens a blank tab of size width x height.
func (b *Browser) NewPage(ctx context.Context, width, height int) (*Page, error) {
	var t struct {
		TargetID string `json:"targetId"`
	}
	if err := b.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank"}, &t); err != nil {
		return nil, err
	}
	var s struct {
		SessionID string `json:"sessionId"`
	}
	if err := b.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": t.TargetID, "flatten": true}, &s); err != nil {
		return nil, err
	}
	p := &Page{b: b, session: s.SessionID}
	for _, m := range []string{"Page.enable", "Runtime.enable", "Log.enable", "Network.enable"} {
		if err := p.Call(ctx, m, nil, nil); err != nil {
			return nil, err
		}
	}
	if err := p.Viewport(ctx, width, height); err != nil {
		return nil, err
	}
	// A headless tab never has focus; pages that check it (the clipboard)
	// behave as in a focused window.
	if err := p.Call(ctx, "Emulation.setFocusEmulationEnabled", map[string]any{"enabled": true}, nil); err != nil {
		return nil, err
	}
	return p, nil
}

// Call sends any DevTools command to the page.
func (p *Page) Call(ctx context.Context, method string, params, out any) error {
	return p.b.call(ctx, p.session, method, params, out)
}

// Errors returns what went wrong in the page so far: uncaught exceptions,
// console errors and the browser's error log entries for it.
func (p *Page) Errors() []string {
	p.b.mu.Lock()
	defer p.b.mu.Unlock()
	return append([]string(nil), p.b.logs[p.session]...)
}

// Responses lists the status of every response the page received for a
// URL containing part, in order.
func (p *Page) Responses(part string) []int {
	p.b.mu.Lock()
	defer p.b.mu.Unlock()
	var out []int
	for _, a := range p.b.answers[p.session] {
		if strings.Contains(a.url, part) {
			out = append(out, a.status)
		}
	}
	return out
}

// Viewport sets the page's size in CSS pixels.
func (p *Page) Viewport(ctx context.Context, width, height int) error {
	return p.Call(ctx, "Emulation.setDeviceMetricsOverride", map[string]any{"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}, nil)
}

// Headers adds headers to every request the page makes from now on (the
// credentials a person would have typed into the browser's login prompt).
func (p *Page) Headers(ctx context.Context, h map[string]string) error {
	return p.Call(ctx, "Network.setExtraHTTPHeaders", map[string]any{"headers": h}, nil)
}

// Text is the page's visible text.
func (p *Page) Text(ctx context.Context) (string, error) {
	var s string
	err := p.Eval(ctx, `document.body ? document.body.innerText : ""`, &s)
	return s, err
}

// Navigate loads url and waits until its document has loaded.
func (p *Page) Navigate(ctx context.Context, url string) error {
	var r struct {
		ErrorText string `json:"errorText"`
	}
	if err := p.Call(ctx, "Page.navigate", map[string]any{"url": url}, &r); err != nil {
		return err
	}
	if r.ErrorText != "" {
		return fmt.Errorf("navigate %s: %s", url, r.ErrorText)
	}
	return p.WaitFor(ctx, `document.readyState === "complete" && location.href !== "about:blank"`)
}

// Eval evaluates a JavaScript expression in the page, waits for it if it
// is a promise, and decodes its value into out (nil: ignore it).
func (p *Page) Eval(ctx context.Context, expr string, out any) error {
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
	err := p.Call(ctx, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true, "userGesture": true}, &r)
	if err != nil {
		return err
	}
	if r.ExceptionDetails != nil {
		return fmt.Errorf("evaluate %q: %s %s", expr, r.ExceptionDetails.Text, r.ExceptionDetails.Exception.Description)
	}
	if out != nil && len(r.Result.Value) > 0 {
		return json.Unmarshal(r.Result.Value, out)
	}
	return nil
}

// WaitFor evaluates cond until it is true (polling every 10 ms) or ctx
// ends; then the error says what it last saw.
func (p *Page) WaitFor(ctx context.Context, cond string) error {
	var lastErr error
	for {
		var ok bool
		lastErr = p.Eval(ctx, "!!("+cond+")", &ok)
		if lastErr == nil && ok {
			return nil
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return fmt.Errorf("waiting for %s: %w (last: %v)", cond, ctx.Err(), lastErr)
			}
			return fmt.Errorf("waiting for %s: %w", cond, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Click clicks the centre of the first element matching selector with the
// mouse, as a person would: it must be visible and on top.
func (p *Page) Click(ctx context.Context, selector string) error {
	var box struct{ X, Y float64 }
	expr := fmt.Sprintf(`(() => { const e = document.querySelector(%q); if (!e) throw new Error("no element " + %[1]q);
		e.scrollIntoView({block: "center"}); const r = e.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()`, selector)
	if err := p.Eval(ctx, expr, &box); err != nil {
		return err
	}
	for _, typ := range []string{"mouseMoved", "mousePressed", "mouseReleased"} {
		if err := p.Call(ctx, "Input.dispatchMouseEvent", map[string]any{"type": typ, "x": box.X, "y": box.Y, "button": "left", "clickCount": 1}, nil); err != nil {
			return err
		}
	}
	return nil
}

// Hover moves the mouse over the first element matching selector, at fx
// of its width from its left edge and halfway down (a chart's tooltip for
// that point in time, say).
func (p *Page) Hover(ctx context.Context, selector string, fx float64) error {
	var box struct{ X, Y float64 }
	expr := fmt.Sprintf(`(() => { const e = document.querySelector(%q); if (!e) throw new Error("no element " + %[1]q);
		e.scrollIntoView({block: "center"}); const r = e.getBoundingClientRect(); return {x: r.x + r.width * %[2]f, y: r.y + r.height / 2}; })()`, selector, fx)
	if err := p.Eval(ctx, expr, &box); err != nil {
		return err
	}
	return p.Call(ctx, "Input.dispatchMouseEvent", map[string]any{"type": "mouseMoved", "x": box.X, "y": box.Y}, nil)
}

// Type replaces the value of the input or textarea matching selector with
// text, typed in as one insertion (the page sees input events).
func (p *Page) Type(ctx context.Context, selector, text string) error {
	if err := p.Eval(ctx, fmt.Sprintf(`(() => { const e = document.querySelector(%q); e.focus(); e.select(); })()`, selector), nil); err != nil {
		return err
	}
	if text == "" {
		return p.Call(ctx, "Input.dispatchKeyEvent", map[string]any{"type": "keyDown", "key": "Delete", "code": "Delete", "windowsVirtualKeyCode": 46}, nil)
	}
	return p.Call(ctx, "Input.insertText", map[string]any{"text": text}, nil)
}

// Select chooses the option with value in the <select> matching selector
// and fires its change event, as choosing from the list does.
func (p *Page) Select(ctx context.Context, selector, value string) error {
	return p.Eval(ctx, fmt.Sprintf(`(() => { const e = document.querySelector(%q);
		if (![...e.options].some(o => o.value === %q)) throw new Error("no option " + %[2]q);
		e.value = %[2]q; e.dispatchEvent(new Event("change", {bubbles: true})); })()`, selector, value), nil)
}

// ColorScheme emulates prefers-color-scheme: "light" or "dark".
func (p *Page) ColorScheme(ctx context.Context, scheme string) error {
	return p.Call(ctx, "Emulation.setEmulatedMedia", map[string]any{"features": []map[string]string{{"name": "prefers-color-scheme", "value": scheme}}}, nil)
}

// Screenshot returns a PNG of the whole page, beyond the window too.
func (p *Page) Screenshot(ctx context.Context) ([]byte, error) {
	var r struct {
		Data string `json:"data"`
	}
	if err := p.Call(ctx, "Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}, &r); err != nil {
		return nil, err
	}
	return base64.StdEncoding.DecodeString(r.Data)
}
