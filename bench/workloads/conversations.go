package main

// The conversational workloads: what conversation affinity is for, and what it must not cost.
//
//	conversations      3 equal servers whose prompt evaluation costs 200 µs a token except
//	                   what a cache slot holds (Ollama's default slot choice); 8 clients each
//	                   hold 5-turn chats, every turn the whole history, about 300 tokens more
//	                   a turn (a pasted document, code): turn 5 is about 1,500 tokens
//	conversations-few, -crowd, -think, -default-slots, -unequal: the same chats with 4 clients
//	                   (fewer conversations than cache slots), 16 (far more), 12 that read each
//	                   answer for 0.4 s, 3 on four servers of one slot each (Ollama's default
//	                   OLLAMA_NUM_PARALLEL), 6 on a server of 4 slots and two of 1
//	conversations-slowdown  6 clients on the 3 equal servers; after 60 requests one turns 4×
//	                   slower, and 6 conversations have 4 fast cache slots between them
//	same-prompt-burst  issue 7's fast/slow pool, the same prompt cost; 12 unrelated clients
//	                   send the same one-message chat (a 200-token instruction) at once: no
//	                   conversation, so least_delay must spread it like least_conn does
//
// The table's cache hits are the fakes' own counters: prompt tokens found in a cache slot over
// prompt tokens sent (PromptCacheStats).

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// convPromptCost is what a prompt token costs the fakes of these workloads when it is not in
// a cache slot: 5,000 tokens/s, a small GPU.
const convPromptCost = 200 * time.Microsecond

// convMessage is a chat message as a client sends it.
type convMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// chatMessages is a non-streamed /api/chat request of msgs, asking for answer tokens, with its
// prompt's size for the oracle.
func chatMessages(model string, answer int, msgs []convMessage) request {
	body, _ := json.Marshal(map[string]any{"model": model, "messages": msgs, "stream": false,
		"options": map[string]any{"num_predict": answer}})
	n := 0
	for _, m := range msgs {
		n += countTokens(m.Content)
	}
	return request{model: model, body: body, tokens: answer, promptTokens: n}
}

func conversationWorkloads() []workload {
	const answer = 20 // tokens: the fakes answer fakeollama.Text(answer), which the next turn sends back
	conversations := func(client, i int, _ *rand.Rand) request {
		// Each client holds 5-turn conversations one after the other. Every turn sends the
		// whole history with the fake's own answers in it, so the server that answered the
		// previous turn holds all but the new question in a cache slot.
		return conversationTurn(client, i, answer, func(convo int) string {
			return fmt.Sprintf("conversation %d-%d. %s", client, convo, fakeollama.Text(200))
		})
	}
	instruction := []convMessage{{"user", "Summarise the following. " + fakeollama.Text(200)}}
	samePrompt := func(int, int, *rand.Rand) request { return chatMessages("tiny-llama", 5, instruction) }

	equal := func(name string) spec {
		return spec{name: name, parallel: 2, prompt: 20 * ms, promptCost: convPromptCost, tokenGap: 5 * ms, loaded: models1}
	}
	pool := fastSlow(10*ms, 40*ms, 160*ms)
	for i := range pool {
		pool[i].promptCost = convPromptCost
		if i > 0 {
			pool[i].promptCost = 4 * convPromptCost
		}
	}
	slots := func(name string, parallel int) spec {
		s := equal(name)
		s.parallel = parallel
		return s
	}
	three := []spec{equal("s1"), equal("s2"), equal("s3")}
	return []workload{
		{name: "conversations", servers: three, models: models1,
			phases: []phase{{conc: 8, n: 240, measured: true, next: conversations}},
			note:   "a follow-up evaluates about 300 new tokens (60 ms) where its history is cached, up to 1,500 (300 ms) elsewhere"},
		{name: "conversations-few", servers: three, models: models1,
			phases: []phase{{conc: 4, n: 200, measured: true, next: conversations}},
			note:   "fewer conversations (4) than cache slots (6): each can keep its own"},
		{name: "conversations-crowd", servers: three, models: models1,
			phases: []phase{{conc: 16, n: 320, measured: true, next: conversations}},
			note:   "16 conversations on 6 cache slots: most turns find their cache evicted wherever they go"},
		{name: "conversations-think", servers: three, models: models1,
			phases: []phase{{conc: 12, n: 240, measured: true, next: conversations, think: 400 * ms}},
			note:   "12 users reading each answer for 0.4 s: 12 conversations on 6 cache slots, servers not saturated"},
		{name: "conversations-default-slots", servers: []spec{slots("s1", 1), slots("s2", 1), slots("s3", 1), slots("s4", 1)}, models: models1,
			phases: []phase{{conc: 3, n: 150, measured: true, next: conversations, think: 200 * ms}},
			note:   "Ollama's default of one slot (one cached conversation) per server: 3 users on 4 servers"},
		{name: "conversations-unequal", servers: []spec{slots("big", 4), slots("small1", 1), slots("small2", 1)}, models: models1,
			phases: []phase{{conc: 6, n: 240, measured: true, next: conversations}},
			note:   "one server with 4 slots and two with 1: 6 conversations fit, 4 of them on big"},
		{name: "conversations-slowdown", servers: []spec{equal("s1"), equal("s2"), equal("s3")}, models: models1, slowed: "s1",
			phases: []phase{{conc: 6, n: 60, next: conversations},
				{conc: 6, n: 240, measured: true, before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(4) },
					next: func(client, i int, rng *rand.Rand) request { return conversations(client, i+100, rng) }}},
			note: "6 conversations on 6 cache slots; s1 turns 4x slower: on the other two, 4 slots for 6"},
		{name: "same-prompt-burst", servers: pool, models: models1,
			phases: []phase{{conc: 12, n: 300, measured: true, next: samePrompt}},
			note:   "identical one-message chats from unrelated clients: not a conversation"},
	}
}

// cacheHitRate is the fakes' prompt tokens found in a cache slot over those sent, since their
// last ResetStats; "-" when no prompt was sent.
func cacheHitRate(fakes map[string]*fakeollama.Server) string {
	var cached, sent int
	for _, f := range fakes {
		st := f.PromptCacheStats()
		cached += st.CachedTokens
		sent += st.PromptTokens
	}
	if sent == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(cached)/float64(sent))
}

// oracleCache is what the oracle knows a server's cache holds of a conversation: the prompt
// and answer of its last turn, on the server that served it.
type oracleCache struct {
	server *oserver
	tokens int
}

// cachedTokens is how much of req's prompt s has cached: its conversation's last turn, where
// s served it. The oracle's ideal assumes the slot still holds it.
func (o *oracle) cachedTokens(s *oserver, req request) int {
	if c, ok := o.cached[req.convo]; ok && req.turn > 0 && c.server == s {
		return min(c.tokens, req.promptTokens)
	}
	return 0
}

// noteCached records that s serves req's turn of its conversation.
func (o *oracle) noteCached(s *oserver, req request) {
	if o.cached == nil {
		o.cached = map[int]oracleCache{}
	}
	o.cached[req.convo] = oracleCache{server: s, tokens: req.promptTokens + req.tokens}
}

// conversationTurn is request i of client's 5-turn conversations, one after the other: the
// system prompt system(convo) and the whole history, with the fake's own answers (answer
// tokens) in it.
func conversationTurn(client, i, answer int, system func(convo int) string) request {
	convo, turn := i/5, i%5
	msgs := []convMessage{{"system", system(convo)}}
	for t := 0; t <= turn; t++ {
		msgs = append(msgs, convMessage{"user", fmt.Sprintf("question %d of %d-%d: %s", t, client, convo, fakeollama.Text(280))})
		if t < turn {
			msgs = append(msgs, convMessage{"assistant", fakeollama.Text(answer)})
		}
	}
	r := chatMessages("tiny-llama", answer, msgs)
	r.convo, r.turn = client*1000+convo, turn
	return r
}
