package fakeollama

import (
	"hash/fnv"
	"net/http"
	"sync"
	"unicode"
)

// The prompt (KV) cache of Ollama's runner, as runner/ollamarunner/cache.go keeps it in v0.17.4:
// a loaded model has one cache slot per parallel slot; each slot remembers the token sequence
// it last held (the prompt and the tokens generated after it). A completion takes the free slot
// whose sequence shares the longest common prefix with its prompt (findLongestCacheSlot, the
// default without OLLAMA_MULTIUSER_CACHE; ties go to the lowest slot; Config.MultiUserCache
// has findBestCacheSlot's least recently used choice instead), reuses that prefix and
// evaluates only the rest, always at least one token (a prompt entirely cached re-evaluates its
// last token so there is something to sample from). prompt_eval_count still reports the whole
// prompt, as Ollama's does (numPromptInputs); prompt_eval_duration covers only what was
// evaluated. An embedding takes a slot the same way without reusing it (cachePrompt false), which
// empties that slot. A model that is loaded again starts with empty slots.
//
// The fake's tokenizer: a token is a run of letters and digits, or one other non-space
// character, so Text(n) is exactly n tokens; the first token of each message carries its role,
// as a chat template's role markers would. Token ids are a hash of both, and /api/generate's
// context holds the ids of the prompt and the answer, so a follow-up that sends it back finds
// them in the slot.

// CacheStats counts the prompt cache's work since the start or ResetStats.
type CacheStats struct {
	// Lookups is the number of completions that looked for a cache slot; Hits those that reused
	// at least one token.
	Lookups, Hits int
	// PromptTokens is the sum of the prompts' lengths; CachedTokens the part reused from a
	// slot, EvaluatedTokens the part evaluated (PromptTokens = CachedTokens + EvaluatedTokens).
	PromptTokens, CachedTokens, EvaluatedTokens int
	// NoSlot counts completions that found every cache slot in use (possible only without
	// Config.Parallel) and evaluated their whole prompt.
	NoSlot int
}

// HitRate is CachedTokens / PromptTokens, 0 without prompts.
func (c CacheStats) HitRate() float64 {
	if c.PromptTokens == 0 {
		return 0
	}
	return float64(c.CachedTokens) / float64(c.PromptTokens)
}

// PromptCacheStats returns the prompt cache's counters.
func (s *Server) PromptCacheStats() CacheStats {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	return s.cacheStats
}

// ClearPromptCache empties every cache slot, as a restart of the model runners would.
func (s *Server) ClearPromptCache() {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	s.caches = nil
}

// CachePath is the fake's own debug endpoint (real Ollama has none): GET answers CacheStats as
// JSON, {"lookups":…,"hits":…,"prompt_tokens":…,"cached_tokens":…,"evaluated_tokens":…,
// "no_slot":…,"hit_rate":…}, for a benchmark that runs the fake in another process.
const CachePath = "/debug/fakeollama/prompt-cache"

func (s *Server) serveCacheStats(c *call) {
	st := s.PromptCacheStats()
	c.json(http.StatusOK, map[string]any{
		"lookups": st.Lookups, "hits": st.Hits, "prompt_tokens": st.PromptTokens,
		"cached_tokens": st.CachedTokens, "evaluated_tokens": st.EvaluatedTokens,
		"no_slot": st.NoSlot, "hit_rate": st.HitRate(),
	})
}

// modelCache is the cache slots of one loaded model.
type modelCache struct {
	slots []cacheSlot
}

type cacheSlot struct {
	tokens   []int
	inUse    bool
	lastUsed uint64 // a clock of lookups, for MultiUserCache's least recently used slot
}

// cacheUse is a completion's hold on a cache slot, from lookup to the end of its work.
type cacheUse struct {
	s      *Server
	key    string // the model's
	slot   int    // -1: no slot was free
	prompt []int
	past   int // tokens reused
}

// evaluated is the number of prompt tokens the completion must evaluate.
func (u *cacheUse) evaluated() int { return len(u.prompt) - u.past }

// takeCacheSlot finds the slot for prompt on model key, as LoadCacheSlot does, and counts the
// lookup. reuse false (embeddings) takes a slot without reusing it.
func (s *Server) takeCacheSlot(key string, prompt []int, reuse bool) *cacheUse {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if s.caches == nil {
		s.caches = map[string]*modelCache{}
	}
	mc := s.caches[key]
	if mc == nil {
		mc = &modelCache{slots: make([]cacheSlot, max(s.cfg.Parallel, 1))}
		s.caches[key] = mc
	}
	u := &cacheUse{s: s, key: key, slot: -1, prompt: prompt}
	var longest int
	if s.cfg.MultiUserCache {
		longest = mc.bestSlot(u)
	} else {
		longest = mc.longestSlot(u)
	}
	if reuse {
		s.cacheStats.Lookups++
		s.cacheStats.PromptTokens += len(prompt)
	}
	if u.slot < 0 {
		if reuse {
			s.cacheStats.NoSlot++
			s.cacheStats.EvaluatedTokens += len(prompt)
		}
		return u
	}
	if reuse {
		u.past = longest
		if u.past == len(prompt) && u.past > 0 {
			u.past-- // leave one token to sample from
		}
	}
	sl := &mc.slots[u.slot]
	sl.inUse = true
	s.cacheClock++
	sl.lastUsed = s.cacheClock
	sl.tokens = sl.tokens[:u.past:u.past] // what is kept; the rest is evaluated anew
	if reuse {
		if u.past > 0 {
			s.cacheStats.Hits++
		}
		s.cacheStats.CachedTokens += u.past
		s.cacheStats.EvaluatedTokens += u.evaluated()
	}
	return u
}

// longestSlot is findLongestCacheSlot: the free slot with the longest common prefix, the
// lowest on a tie. It sets u.slot (-1: none free) and returns the prefix's length.
func (mc *modelCache) longestSlot(u *cacheUse) int {
	longest := -1
	for i := range mc.slots {
		if mc.slots[i].inUse {
			continue
		}
		if n := commonPrefix(mc.slots[i].tokens, u.prompt); n > longest {
			longest, u.slot = n, i
		}
	}
	return longest
}

// bestSlot is findBestCacheSlot (OLLAMA_MULTIUSER_CACHE): the slot holding the longest common
// prefix if it holds nothing more and is free, else the least recently used free slot, into
// which that prefix is copied.
func (mc *modelCache) bestSlot(u *cacheUse) int {
	longest, from := -1, -1
	oldest := -1
	for i := range mc.slots {
		sl := &mc.slots[i]
		if n := commonPrefix(sl.tokens, u.prompt); n > longest {
			longest, from = n, i
		}
		if !sl.inUse && (oldest < 0 || sl.lastUsed < mc.slots[oldest].lastUsed) {
			oldest = i
		}
	}
	if src := &mc.slots[from]; longest == len(src.tokens) && !src.inUse {
		u.slot = from
		return longest
	}
	if oldest < 0 {
		return 0
	}
	if longest > 0 && from != oldest {
		mc.slots[oldest].tokens = append(mc.slots[oldest].tokens[:0], mc.slots[from].tokens[:longest]...)
	}
	u.slot = oldest
	return longest
}

// done frees the slot; it now holds what was evaluated: the prompt and the generated tokens
// when the work finished, the reused prefix when it was cut short.
func (u *cacheUse) done(generated []int, finished bool) {
	if u == nil || u.slot < 0 {
		return
	}
	s := u.s
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	mc := s.caches[u.key]
	if mc == nil || u.slot >= len(mc.slots) { // cleared meanwhile
		return
	}
	sl := &mc.slots[u.slot]
	sl.inUse = false
	if finished {
		sl.tokens = append(append(make([]int, 0, len(u.prompt)+len(generated)), u.prompt...), generated...)
	}
}

// dropCache forgets a model's slots: it was loaded again.
func (s *Server) dropCache(key string) {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	delete(s.caches, key)
}

func commonPrefix(a, b []int) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

// tokens is the fake's tokenizer: the ids of text's tokens, the first marked with role.
func tokens(role, text string) []int {
	var out []int
	start := -1
	emit := func(tok string) {
		h := fnv.New32a()
		if len(out) == 0 {
			h.Write([]byte(role))
			h.Write([]byte{0})
		}
		h.Write([]byte(tok))
		out = append(out, int(h.Sum32()%(1<<20))+1000)
	}
	rs := []rune(text)
	for i, r := range rs {
		word := unicode.IsLetter(r) || unicode.IsDigit(r)
		if start >= 0 && !word {
			emit(string(rs[start:i]))
			start = -1
		}
		switch {
		case word && start < 0:
			start = i
		case !word && !unicode.IsSpace(r):
			emit(string(r))
		}
	}
	if start >= 0 {
		emit(string(rs[start:]))
	}
	return out
}

// promptOf is the token sequence a completion's prompt renders to. Each message's tokens carry
// its role; /api/generate's context comes first, then its system prompt and prompt.
func promptOf(context []int, msgs ...message) []int {
	out := append([]int(nil), context...)
	for _, m := range msgs {
		out = append(out, tokens(m.Role, m.Content)...)
	}
	return out
}

// generated is the token sequence of the answer Text(n).
func generated(n int) []int { return tokens("assistant", Text(n)) }

// promptCacheState is the Server's cache. cacheMu may be taken while Server.mu is held, never
// the other way round.
type promptCacheState struct {
	cacheMu    sync.Mutex
	caches     map[string]*modelCache
	cacheStats CacheStats
	cacheClock uint64
}
