package ollamaflow

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/sjson"
)

// Measuring copies. least_delay sends nothing to a server it believes
// slower than queueing elsewhere, so it must re-measure such a server to
// see it recover (a model that shared its GPU was unloaded, throttling
// ended). Sending a client's request there costs that client the slow
// server's time when it has not recovered, so it was done once every
// remeasureAfter, and a server that recovered stayed unused for up to that
// long (speedup: s1 idle for the first 1.1 s of the measured phase, the
// others queueing). Instead, while the others queue and the server is
// idle with the model resident, a copy of a completion that is waiting
// anyway goes there (claimRemeasure: remeasureCopy, at most one
// per server per copyAfter, one in flight), its answer capped at
// copyTokens and read by the proxy alone: the client's request goes where
// the policy sends it, and the server's answer measures it at no client's
// cost. An answer much faster than believed sends the next request there
// (remeasureNow), whose answer confirms the change.
//
// The copy is the request as that server would run it: the frontend's and
// the server's pins apply, then stream false and the output cap
// (options.num_predict; max_tokens on /v1, which Ollama reads as it). It
// loads nothing (only a server with the model resident gets one), teaches
// an answer length only when it ended before its cap, records no
// conversation's place, is charged to no tenant and is counted in
// ollamaflow_measuring_copies_total, not in requests. Its body (at most
// copyMaxBody, maxCopies at once: 4 MiB) is held outside max_body_memory.
//
// A copy goes every copyAfter at most, and no sooner than copyShare times
// as long as the last one held its slot after that one was sent: copies
// take at most a quarter of one slot's time, on a server believed slow
// (the pool's capacity beside the others, queue relief's) and one truly
// slow alike. Sent once a second, a recovery was seen up to a second late,
// the others queueing meanwhile (speedup-prompt: 52.6-54.7 req/s against
// least_conn's 56.5-57.8, as it kept sending there); every 250 ms, 55.6-56.7.
const (
	copyAfter   = 250 * time.Millisecond
	copyShare   = 4
	copyTokens  = 8
	copyMaxBody = 256 << 10 // a larger body is not copied
	// copyMaxPrompt bounds the prompt text of a request copied (about 4k
	// tokens): a long history would hold a slow server's slot for as long
	// as it takes to evaluate it, to learn what a short one shows.
	copyMaxPrompt = 16 << 10
	maxCopies     = 16 // copies in flight in the process at most
	copyTimeout   = time.Minute
)

// copiesInFlight bounds the process's measuring copies (maxCopies).
var copiesInFlight atomic.Int64

// copyable reports whether a request may be copied to measure a server: a
// completion (/api/chat, /api/generate, /v1/chat/completions,
// /v1/completions) with a body of at most copyMaxBody and a prompt of at
// most copyMaxPrompt characters, on a frontend whose policy re-measures.
func (h *Handler) copyable(r *http.Request, api apiFormat, kind routeKind, body []byte, j *job) bool {
	if !h.remeasures || kind != kindCompletion || len(body) > copyMaxBody || j.promptChars > copyMaxPrompt {
		return false
	}
	switch r.URL.Path {
	case "/api/chat", "/api/generate":
		return api == apiOllama
	case "/v1/chat/completions", "/v1/completions":
		return api == apiOpenAI
	}
	return false
}

// sendCopy sends the measuring copy the pick claimed for j (j.copyTo), if
// any; the claim is released whatever happens.
func (h *Handler) sendCopy(r *http.Request, api apiFormat, kind routeKind, body []byte, j *job) {
	h.sendLoadCopy(r, api, kind, body, j)
	b := j.copyTo
	if b == nil {
		return
	}
	j.copyTo, j.copyable = nil, false // one copy per request
	if !h.launchCopy(r, api, kind, body, b, j, copyCap(j.maxOutput), true) {
		b.srv.speed.copyDone()
	}
}

// launchCopy sends a copy of j's request to b, its output capped at
// capTokens, holding one of maxCopies and a slot on b while it runs; a
// measuring copy (measurecopy.go) or a load copy (loadcopy.go). false: none
// was sent.
func (h *Handler) launchCopy(r *http.Request, api apiFormat, kind routeKind, body []byte, b *backend, j *job, capTokens int, measuring bool) bool {
	if copiesInFlight.Add(1) > maxCopies || !b.tryAcquire() {
		copiesInFlight.Add(-1)
		return false
	}
	out, uncached, cancel, err := h.copyRequest(r, api, kind, body, b, capTokens)
	if err != nil {
		b.release()
		copiesInFlight.Add(-1)
		return false
	}
	cj := &job{model: j.model, promptChars: j.promptChars, maxOutput: capTokens, copy: true, uncached: uncached, answers: j.answers}
	go h.runCopy(b, api, out, cancel, cj, measuring)
	return true
}

// dropCopy releases a copy claimed for j that was never sent.
func dropCopy(j *job) {
	if j.loadTo != nil {
		j.loadTo.srv.speed.unplanLoad(j.model)
		j.loadTo = nil
	}
	if j.copyTo != nil {
		j.copyTo.srv.speed.copyDone()
		j.copyTo = nil
	}
}

// copyCap is the output cap of a copy of a request capped at maxOutput (0:
// not capped).
func copyCap(maxOutput int) int {
	if maxOutput > 0 && maxOutput < copyTokens {
		return maxOutput
	}
	return copyTokens
}

// copyRequest builds the copy: the body with the server's pins, not
// streamed, its output capped, its prompt made uncacheable where it can be
// (uncached); bound to the server's life and copyTimeout, not to the
// client's request.
func (h *Handler) copyRequest(r *http.Request, api apiFormat, kind routeKind, body []byte, b *backend, capTokens int) (*http.Request, bool, context.CancelFunc, error) {
	body, err := b.cfg.pinsFor(kind, vocabOf(r.URL.Path)).apply(body)
	if err != nil {
		return nil, false, nil, err
	}
	if body, err = copyPins(api, capTokens).apply(body); err != nil {
		return nil, false, nil, err
	}
	body, uncached := uncacheable(r.URL.Path, body)
	ctx, cancel := context.WithTimeout(b.srv.ctx, min(copyTimeout, max(time.Duration(h.ResponseTimeout), time.Second)))
	out := h.outboundRequest(ctx, r, b, body)
	out.Header.Del("Accept-Encoding") // read here: plain JSON
	return out, uncached, cancel, nil
}

// Uncacheable copies. A copy of a waiting request carries a prompt the
// server being measured may hold in its prompt cache (the same system
// prompt, the same question from many clients), and a prompt served from
// the cache looks faster than the server is: such samples are not learned
// until six come in a row (foldPromptLocked), so a server that recovered
// was seen to only after six seconds of copies. A copy whose prompt begins
// with a nonce finds nothing of itself in any cache slot (Ollama's runner
// reuses a slot's common prefix only), so its prompt time is the server's
// speed, learned from one copy. The nonce goes first in what the model
// reads first: the first message (chat), the system prompt (generate,
// which the template puts before the prompt; the prompt itself in raw
// mode and on /v1/completions). The edited body is decoded again as Ollama
// decodes it (encoding/json: keys matched without case, the last
// duplicate winning); unless the nonce is where Ollama will read it, the
// copy goes as it was and is not taken as uncached. Cost: a copy's prompt
// is evaluated whole, and may take a cache slot a conversation held on a
// server that was getting no requests.

// copyNonce numbers the nonces of uncacheable copies.
var copyNonce atomic.Uint64

// uncacheable is body with a nonce at the start of its prompt, and true;
// or body as it was and false where the nonce cannot be placed so that
// Ollama reads it first (a message's content not a string, a prompt that
// is a list).
func uncacheable(path string, body []byte) ([]byte, bool) {
	read, ok := readPromptFields(body)
	if !ok {
		return body, false
	}
	var field string
	switch path {
	case "/api/chat", "/v1/chat/completions":
		field = "messages.0.content"
	case "/api/generate":
		field = "system"
		if read.Raw {
			field = "prompt"
		}
	case "/v1/completions":
		field = "prompt"
	default:
		return body, false
	}
	current := read.at(field)
	if current == nil && field == "system" {
		current = "" // the model's own system prompt is replaced
	}
	text, ok := current.(string)
	if !ok {
		return body, false
	}
	nonce := fmt.Sprintf("[measure %d %d] ", time.Now().UnixNano(), copyNonce.Add(1))
	edited, err := sjson.SetBytes(body, field, nonce+text)
	if err != nil {
		return body, false
	}
	if again, ok := readPromptFields(edited); !ok || again.at(field) != any(nonce+text) {
		return body, false // Ollama would read it elsewhere (a duplicate key)
	}
	return edited, true
}

// promptFields are the fields of a completion's body a prompt begins
// with, as Ollama's decoder reads them: encoding/json, keys matched
// without case, the last duplicate winning.
type promptFields struct {
	Messages []struct {
		Content any `json:"content"`
	} `json:"messages"`
	System any  `json:"system"`
	Prompt any  `json:"prompt"`
	Raw    bool `json:"raw"`
}

// readPromptFields decodes them; false: not JSON.
func readPromptFields(body []byte) (promptFields, bool) {
	var v promptFields
	return v, json.Unmarshal(body, &v) == nil
}

// at is the value of field (messages.0.content, system or prompt); nil
// when there is none.
func (v *promptFields) at(field string) any {
	switch field {
	case "messages.0.content":
		if len(v.Messages) > 0 {
			return v.Messages[0].Content
		}
	case "system":
		return v.System
	case "prompt":
		return v.Prompt
	}
	return nil
}

// copyCapPins are the pins that make a copy: not streamed, its output
// capped at n tokens (index n-1), per API; parsed once.
var copyCapPins = sync.OnceValue(func() (p [2][copyTokens]*pins) {
	for n := 1; n <= copyTokens; n++ {
		native, _ := parsePins([]byte(fmt.Sprintf(`{"stream":false,"options":{"num_predict":%d}}`, n)), "measuring copy")
		// Ollama's OpenAI layer reads max_tokens as num_predict.
		openai, _ := parsePins([]byte(fmt.Sprintf(`{"stream":false,"max_tokens":%d}`, n)), "measuring copy")
		p[0][n-1], p[1][n-1] = native, openai
	}
	return p
})

// copyPins are the pins of a copy on api capped at n tokens (1..copyTokens).
func copyPins(api apiFormat, n int) *pins {
	if api == apiOpenAI {
		return copyCapPins()[1][n-1]
	}
	return copyCapPins()[0][n-1]
}

// maxCopyAnswer bounds what is read of a copy's answer: a capped,
// unstreamed answer is a few hundred bytes.
const maxCopyAnswer = 64 << 10

// runCopy sends the copy and learns from its answer; it holds a slot on
// the server while it runs, as a client's request would.
func (h *Handler) runCopy(b *backend, api apiFormat, out *http.Request, cancel context.CancelFunc, j *job, measuring bool) {
	defer copiesInFlight.Add(-1)
	if measuring {
		defer b.srv.speed.copyDone()
		metrics.measuringCopies.WithLabelValues(h.Name, b.cfg.Name).Inc()
	} else {
		metrics.loadCopies.WithLabelValues(h.Name, b.cfg.Name, j.model).Inc()
	}
	defer b.release()
	defer cancel()
	started := time.Now()
	work := b.begin(j, started)
	defer work.end()
	res, err := h.roundTrip(b, out)
	if err != nil {
		return
	}
	defer res.Body.Close()
	ttfb := time.Since(started)
	answer, err := io.ReadAll(io.LimitReader(res.Body, maxCopyAnswer))
	if err != nil {
		return
	}
	var tail tailKeeper
	tail.keep(answer)
	if res.StatusCode != http.StatusOK || out.Context().Err() != nil {
		return
	}
	h.learnFromAnswer(b, j, kindCompletion, api, work, &tail, false, ttfb, time.Since(started))
}
