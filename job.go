package ollamaflow

import (
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
)

// job is what a request asks of a server, read from its body: the input of
// the cost model.
type job struct {
	model       string    // normalised; "" for a request that names none
	promptChars int       // characters of prompt text: prompt, system, suffix, messages, input
	maxOutput   int       // num_predict, max_tokens or max_completion_tokens; 0 when not set
	arrived     time.Time // when the request came (proxy): its delay as the client sees it
	// refs are prompt lines other candidates learned, for a server that
	// has timed only shorter prompts (cost.go, promptScaled).
	refs promptRefs
	// cachedOn is the server whose prompt cache conversation affinity sent
	// the request to (affinity.go). Ollama counts a cached prompt whole in
	// prompt_eval_count but times only what it evaluated, so its timing
	// there says nothing of the server's prompt rate.
	cachedOn *speed
	// cacheSaving is the prompt time, in seconds, its cache there was
	// expected to save, cacheClass what was known of that cache, and turn
	// the conversation's record, which keeps whether it was found
	// (cacheodds.go).
	cacheSaving float64
	cacheClass  cacheClass
	turn        *convActivity
	// avoid is what the current attempt passes over above largePool
	// (largepool.go).
	avoid avoidance
	// spareOn is the server the request was sent to as a spare beside
	// its measuring request, and spareAmong the candidates that may
	// outrun it (spare.go); nil otherwise.
	spareOn    *server
	spareAmong []*backend
	// measureOn is the server the request was sent to as its measuring
	// request (spareAmong then holds the candidates): when a spare
	// beside it began answering first, it waits behind that one and is
	// moved like a spare (spare.go).
	measureOn *server
	// claimHeld: the measuring request or spare this request was claimed
	// as (claimProbe) became a slot taken (takeOrHold), so begin does not
	// give up a claim again.
	claimHeld bool
	// cands are the candidates of the request's latest pick: those the
	// pick is offered and the others (busy, or left to older requests in
	// the queue), for a policy that would rather wait for one of the
	// others than load the model (loadUnderWayElsewhere).
	cands []*backend
	// moved: it was a spare request once and was moved; it is not sent
	// as one again.
	moved bool
	// newConversation: it starts a conversation nothing of which is
	// cached anywhere (spreadNew): where it goes, its later turns follow.
	newConversation bool
	// heldSince is when least_delay first held it back for a server
	// still being measured (awaitMeasuring); zero if never.
	heldSince time.Time
	// copyable: a copy of the request may measure a server believed slow
	// (measurecopy.go) or load a model (loadcopy.go); copyTo is the server
	// a pick claimed a measuring one for, sent by the attempt loop; copy:
	// this is a copy, measuring or loading.
	copyable bool
	copyTo   *backend
	copy     bool
	// loadTo is the server a demand move claimed a load copy for
	// (loadcopy.go), sent by the attempt loop with the measuring copy.
	loadTo *backend
	// uncached: a copy whose prompt begins with a nonce (uncacheable), so
	// no prompt cache served any of it.
	uncached bool
	// answers is where the typical length of the model's uncapped
	// answers is read (nil: only what each server saw itself).
	answers *answerTable
}

// answerLengths is how long each model's answers run when nothing caps
// them, over every server of every frontend: an answer's length is the
// model's and the request's, not the server's. A server that has only
// answered capped requests (or none) prices an uncapped one by what the
// others saw, instead of as no output at all (a capped first answer left
// a slow server looking as cheap for a 30-token answer as for a 3-token
// one, and the queue went there).
var answerLengths answerTable

// answerTable is a model's typical uncapped answer, in tokens, each an
// EWMA weighted by time like a server's rates (a sample after a silence
// of remeasureAfter replaces it). Lock-free to read: estimates read it
// for every candidate. At most maxAnswerModels models are kept.
type answerTable struct {
	m  sync.Map     // normalised model -> *answerLength
	n  atomic.Int64 // entries
	mu sync.Mutex   // writers
}

type answerLength struct {
	tokens atomic.Uint64 // float64 bits
	at     atomic.Int64  // unix nanoseconds of the last sample
}

const maxAnswerModels = 1024

// typical is model's typical uncapped answer in tokens; 0 when none was
// seen.
func (a *answerTable) typical(model string) float64 {
	if a == nil || model == "" {
		return 0
	}
	if v, ok := a.m.Load(model); ok {
		return math.Float64frombits(v.(*answerLength).tokens.Load())
	}
	return 0
}

// note folds an answer of tokens that ended on its own (no cap cut it)
// into model's typical length.
func (a *answerTable) note(model string, tokens float64, now time.Time) {
	if a == nil || model == "" || tokens <= 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.m.Load(model)
	if !ok {
		if a.n.Load() >= maxAnswerModels {
			// Full: the model answered least recently makes room (a
			// scan, only when a new model is first answered).
			var oldest any
			oldestAt := int64(math.MaxInt64)
			a.m.Range(func(k, v any) bool {
				if at := v.(*answerLength).at.Load(); at < oldestAt {
					oldest, oldestAt = k, at
				}
				return true
			})
			a.m.Delete(oldest)
			a.n.Add(-1)
		}
		l := &answerLength{}
		l.tokens.Store(math.Float64bits(tokens))
		l.at.Store(now.UnixNano())
		a.m.Store(model, l)
		a.n.Add(1)
		return
	}
	l := v.(*answerLength)
	old := math.Float64frombits(l.tokens.Load())
	w := sampleWeight(now.Sub(time.Unix(0, l.at.Load())))
	l.tokens.Store(math.Float64bits(old + w*(tokens-old)))
	l.at.Store(now.UnixNano())
}

// newJob reads what a request asks for from its body, the way Ollama
// decodes it (keys match case-insensitively, escapes decoded, the last
// duplicate wins). Parts it does not understand count as nothing: the
// estimate is a guide for routing, never a limit.
func newJob(model string, api apiFormat, body []byte) *job {
	j := &job{model: model}
	if len(body) == 0 {
		return j
	}
	fields := map[string]int{}
	gjson.ParseBytes(body).ForEach(func(k, v gjson.Result) bool {
		key := foldedKey(k.String(), jobFields)
		switch {
		case key == "prompt", key == "system", key == "suffix":
			fields[key] = textChars(v)
		case key == "messages":
			n := 0
			v.ForEach(func(_, m gjson.Result) bool {
				m.ForEach(func(mk, mv gjson.Result) bool {
					if strings.EqualFold(mk.String(), "content") {
						n += textChars(mv)
					}
					return true
				})
				return true
			})
			fields[key] = n
		case key == "input":
			fields[key] = textChars(v)
		case key == "options" && api == apiOllama:
			v.ForEach(func(ok, ov gjson.Result) bool {
				if strings.EqualFold(ok.String(), "num_predict") && ov.Type == gjson.Number {
					j.maxOutput = max(int(ov.Int()), 0)
				}
				return true
			})
		case (key == "max_tokens" || key == "max_completion_tokens") && api == apiOpenAI && v.Type == gjson.Number:
			j.maxOutput = max(int(v.Int()), 0)
		}
		return true
	})
	for _, n := range fields {
		j.promptChars += n
	}
	return j
}

// jobFields are the body's top-level members newJob reads.
var jobFields = []string{"prompt", "system", "suffix", "messages", "input", "options", "max_tokens", "max_completion_tokens"}

// foldedKey is the field of fields that key names as encoding/json matches
// keys (equal under Unicode simple folding, so "ſystem" and "max_tokenſ"
// count as Ollama reads them, which lowercasing would miss), "" if none.
func foldedKey(key string, fields []string) string {
	for _, f := range fields {
		if strings.EqualFold(key, f) {
			return f
		}
	}
	return ""
}

// textChars is the length of a text value: a string, or OpenAI's content
// parts ([{"type":"text","text":…}]) and arrays of strings.
func textChars(v gjson.Result) int {
	switch {
	case v.Type == gjson.String:
		return len(v.Str)
	case v.IsArray():
		n := 0
		v.ForEach(func(_, e gjson.Result) bool {
			if e.Type == gjson.String {
				n += len(e.Str)
			} else if e.IsObject() {
				e.ForEach(func(k, t gjson.Result) bool {
					if strings.EqualFold(k.String(), "text") && t.Type == gjson.String {
						n += len(t.Str)
					}
					return true
				})
			}
			return true
		})
		return n
	}
	return 0
}
