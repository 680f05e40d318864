package main

import (
	"math/rand/v2"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// Workloads for the spreading of new conversations (affinity.go, nearBest): every request
// that matches no recent conversation, single-turn traffic included, is one.
//
//	equal-exact-warm   equal-exact after an unmeasured warm-up: every server measured, so
//	                   the spreading's band, not the fresh pool's bootstrap, decides
//	equal-over-warm    the same with 16 clients (two per slot)
//	app-conversations  the conversations workload, but every conversation starts with one
//	                   application's 500-token system prompt (a chat product, an agent):
//	                   unrelated conversations share it, and they must still spread
func spreadWorkloads() []workload {
	numbered := func(tokens int) func(client, i int, rng *rand.Rand) request {
		return func(client, i int, _ *rand.Rand) request {
			return ask("tiny-llama", "/api/chat", false, tokens, question(client, i))
		}
	}
	class := func(name string) spec {
		return spec{name: name, parallel: 2, prompt: 40 * ms, tokenGap: 4 * ms, loaded: models1}
	}
	equal4 := []spec{class("s1"), class("s2"), class("s3"), class("s4")}
	const answer = 20
	system := "You are the assistant of a large product. Follow its rules. " + fakeollama.Text(500)
	appConversations := func(client, i int, _ *rand.Rand) request {
		return conversationTurn(client, i, answer, func(int) string { return system })
	}
	equal := func(name string) spec {
		return spec{name: name, parallel: 2, prompt: 20 * ms, promptCost: convPromptCost, tokenGap: 5 * ms, loaded: models1}
	}
	return []workload{
		{name: "equal-exact-warm", models: models1, servers: equal4,
			phases: []phase{{conc: 8, n: 100, next: numbered(10)}, {conc: 8, n: 300, measured: true, next: numbered(10)}},
			note:   "one client per slot after a warm-up: 100 req/s, nothing need wait"},
		{name: "equal-over-warm", models: models1, servers: equal4,
			phases: []phase{{conc: 8, n: 100, next: numbered(10)}, {conc: 16, n: 400, measured: true, next: numbered(10)}},
			note:   "two clients per slot after a warm-up: every request waits one answer"},
		{name: "app-conversations", servers: []spec{equal("s1"), equal("s2"), equal("s3")}, models: models1,
			phases: []phase{{conc: 8, n: 240, measured: true, next: appConversations}},
			note:   "a follow-up evaluates about 300 new tokens where its history is cached; the system prompt is every conversation's"},
	}
}
