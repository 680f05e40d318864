package main

import (
	"math/rand/v2"
	"time"

	"github.com/tidwall/sjson"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// Workloads for generalization: pools, traffic and changes unlike the ones least_delay was
// tuned on, each short (four policies in well under a minute), to find where it loses to
// least_conn on what a real pool meets. Prompts carry a request number.
//
//	big-pool          8 servers of 4 speed classes with 1-4 slots, 20 clients
//	equal-exact       4 equal servers of 2 slots, 8 clients (one per slot)
//	equal-over        the same with 16 clients (two per slot)
//	stream-long       streamed answers of 100 tokens on both APIs, fast (4 slots) + 2 slow
//	shared-system     3 equal servers with a prompt cost; every request starts with the same
//	                  1,000-token system prompt and asks its own question (a RAG or agent
//	                  template): not a conversation, its prefix is cached on every server
//	models-room-2-3   3 models over 3 servers with room for 1, 2 and 3 models (1 s loads)
//	slowdown-2x       3 equal servers; one turns 2× slower a third of the way
//	unloaded-mid      3 servers, two models resident on each (room 2, 1 s loads); one server
//	                  has every model unloaded mid-run (keep_alive, another tenant, a restart)
//	open-loop         the fast/slow pool, requests arriving at 30/s whatever the answers
//	long-predict      3 equal servers; one request in ten asks for 300 tokens, the rest 10
//	openai-stream     the fast/slow pool, /v1/chat/completions streamed as the OpenAI SDKs
//	                  stream by default: without stream_options.include_usage, so no token counts
//	three-speeds      a fast, a middle and a slow server (2, 2 and 1 slots; 0.12, 0.24 and
//	                  0.7 s an answer): 20 requests at concurrency 1, then 10 clients
//	slowdown-prompt   3 equal servers of one-token answers to one prompt; one turns 3× slower
func generalizationWorkloads() []workload {
	numbered := func(tokens int) func(client, i int, rng *rand.Rand) request {
		return func(client, i int, _ *rand.Rand) request {
			return ask("tiny-llama", "/api/chat", false, tokens, question(client, i))
		}
	}
	class := func(name string, slots int, factor time.Duration) spec {
		return spec{name: name, parallel: slots, prompt: 20 * factor * ms, tokenGap: 2 * factor * ms, loaded: models1}
	}
	equal4 := []spec{class("s1", 2, 2), class("s2", 2, 2), class("s3", 2, 2), class("s4", 2, 2)}
	equal3 := func() []spec { return []spec{class("s1", 2, 2), class("s2", 2, 2), class("s3", 2, 2)} }
	system := "You are a support assistant for a large product. Answer with the documents below. " + fakeollama.Text(1000)
	threeModels := []string{"m1", "m2", "m3"}
	return []workload{
		{name: "big-pool", models: models1, servers: []spec{
			class("a1", 4, 2), class("a2", 4, 2), class("b1", 2, 4), class("b2", 2, 4),
			class("c1", 1, 8), class("c2", 1, 8), class("d1", 3, 3), class("e1", 2, 16)},
			phases: []phase{{conc: 20, n: 600, measured: true, next: numbered(10)}},
			note:   "a 80 ms answer on a1/a2, 120 ms on d1, 160 ms on b, 320 ms on c, 640 ms on e1"},
		{name: "equal-exact", models: models1, servers: equal4,
			phases: []phase{{conc: 8, n: 300, measured: true, next: numbered(10)}},
			note:   "one client per slot: 100 req/s, nothing need wait"},
		{name: "equal-over", models: models1, servers: equal4,
			phases: []phase{{conc: 16, n: 400, measured: true, next: numbered(10)}},
			note:   "two clients per slot: 100 req/s, every request waits one answer"},
		{name: "stream-long", models: models1, servers: fastSlow(2*ms, 20*ms, 80*ms),
			phases: []phase{{conc: 8, n: 160, measured: true, next: func(client, i int, rng *rand.Rand) request {
				path := "/api/chat"
				if rng.IntN(2) == 0 {
					path = "/v1/chat/completions"
				}
				return ask("tiny-llama", path, true, 100, question(client, i))
			}}},
			note: "an answer streams 100 tokens: 0.22 s on fast, 0.88 s on a slow one"},
		{name: "shared-system", models: models1, servers: func() []spec {
			s := equal3()
			for i := range s {
				s[i].promptCost = convPromptCost
			}
			return s
		}(),
			phases: []phase{{conc: 8, n: 300, measured: true, next: func(client, i int, _ *rand.Rand) request {
				return chatMessages("tiny-llama", 10, []convMessage{{"system", system}, {"user", question(client, i)}})
			}}},
			note: "the system prompt is in every server's cache slots after its first requests"},
		{name: "models-room-2-3", models: threeModels, servers: []spec{
			{name: "r1", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: []string{"m1"}},
			{name: "r2", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 2, loaded: []string{"m1", "m2"}},
			{name: "r3", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 3, loaded: []string{"m1", "m2", "m3"}}},
			phases: []phase{{conc: 6, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				m := threeModels[min(rng.IntN(10)/4, 2)] // 40%, 40%, 20%
				return ask(m, "/api/chat", false, 10, question(client, i))
			}}},
			note: "every model fits without a reload: r3 holds all three, r2 two, r1 one"},
		{name: "slowdown-2x", models: models1, slowed: "s1", servers: equal3(),
			phases: []phase{
				{conc: 6, n: 150, next: numbered(10)},
				{conc: 6, n: 300, measured: true, next: numbered(10),
					before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(2) }},
			},
			note: "after the change s1 serves half as fast: about a fifth of the traffic is its share"},
		{name: "unloaded-mid", models: []string{"m1", "m2"}, servers: []spec{
			{name: "s1", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 2, loaded: []string{"m1", "m2"}},
			{name: "s2", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 2, loaded: []string{"m1", "m2"}},
			{name: "s3", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 2, loaded: []string{"m1", "m2"}}},
			phases: []phase{
				{conc: 6, n: 60, next: func(client, i int, rng *rand.Rand) request {
					return ask([]string{"m1", "m2"}[rng.IntN(2)], "/api/chat", false, 10, question(client, i))
				}},
				{conc: 6, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
					return ask([]string{"m1", "m2"}[rng.IntN(2)], "/api/chat", false, 10, question(client, i))
				}, during: func(f map[string]*fakeollama.Server, _ func(string, bool)) {
					time.Sleep(time.Second)
					f["s1"].SetLoaded()
				}}},
			note: "s1 must load both models again (2 loads): the rest of the pool is warm"},
		{name: "open-loop", models: models1, servers: fastSlow(0, 100*ms, 400*ms),
			phases: []phase{{rate: 30, n: 240, measured: true, next: numbered(1)}},
			note:   "30 req/s on a fast server of 40 req/s: a good router keeps p99 near 0.1-0.2 s"},
		{name: "long-predict", models: models1, servers: equal3(),
			phases: []phase{{conc: 6, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				if rng.IntN(10) == 0 {
					return ask("tiny-llama", "/api/chat", false, 300, question(client, i))
				}
				return ask("tiny-llama", "/api/chat", false, 10, question(client, i))
			}}},
			note: "a long answer holds a slot 1.2 s, a short one 80 ms"},
		{name: "openai-stream", models: models1, servers: fastSlow(2*ms, 20*ms, 80*ms),
			phases: []phase{{conc: 8, n: 200, measured: true, next: func(client, i int, rng *rand.Rand) request {
				r := ask("tiny-llama", "/v1/chat/completions", true, 50, question(client, i))
				r.body, _ = sjson.DeleteBytes(r.body, "stream_options")
				return r
			}}},
			note: "50 streamed tokens: 0.12 s on fast, 0.48 s on a slow one; only the events tell the tokens"},
		{name: "three-speeds", models: models1, servers: []spec{
			{name: "fast", parallel: 2, prompt: 80 * ms, tokenGap: 2 * ms, loaded: models1},
			{name: "mid", parallel: 2, prompt: 160 * ms, tokenGap: 4 * ms, loaded: models1},
			{name: "slow", parallel: 1, prompt: 500 * ms, tokenGap: 10 * ms, loaded: models1}},
			phases: []phase{{conc: 1, n: 20, next: numbered(20)}, {conc: 10, n: 300, measured: true, next: numbered(20)}},
			note:   "the slow server adds 6 % to the pool's capacity at 0.7 s an answer; the queue at the others ends within 0.5 s"},
		{name: "slowdown-prompt", models: models1, slowed: "s1", servers: []spec{
			{name: "s1", parallel: 2, prompt: 100 * ms, loaded: models1},
			{name: "s2", parallel: 2, prompt: 100 * ms, loaded: models1},
			{name: "s3", parallel: 2, prompt: 100 * ms, loaded: models1}},
			phases: []phase{{conc: 6, n: 60, next: simple},
				{conc: 6, n: 300, measured: true, next: simple,
					before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(3) }}},
			note: "after the change s1 takes 0.3 s, a queue at the others 0.2 s"},
	}
}
