package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
	"unicode"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// Workloads for robustness: what a pool meets besides the cases the balancer was first built
// for, each short. Prompts carry a request number, as real traffic differs from request to
// request (identical bodies are the conversation workloads' concern).
//
//	speed-classes    servers 1×, 2× and 4× slower, with 2, 4 and 3 slots
//	many-models      6 models of skewed popularity over 5 servers with room for 2 each (0.4 s loads)
//	long-short       a quarter of the prompts 1,000 tokens, the rest 20 (prompt cost dominant)
//	speedup          3 equal servers; one starts 4× slower and recovers a third of the way
//	speedup-prompt   the same with one-token answers of one prompt: only the prompt time shows it
//	cold-start       a burst after an idle period in which every model was unloaded (1 s loads)
//	flaky            3 equal servers; one answers 500 for 1.5 s mid-run
//	api-mix          /api/chat and /v1/chat/completions, streamed or not, num_predict set or not
func robustnessWorkloads() []workload {
	models6 := []string{"m1", "m2", "m3", "m4", "m5", "m6"}
	popularity := []int{35, 25, 15, 12, 8, 5} // per cent
	pickModel := func(rng *rand.Rand) string {
		x := rng.IntN(100)
		for i, p := range popularity {
			if x < p {
				return models6[i]
			}
			x -= p
		}
		return models6[0]
	}
	var five []spec
	for i := range 5 {
		five = append(five, spec{name: fmt.Sprintf("s%d", i+1), parallel: 2, prompt: 50 * ms, loadDelay: 400 * ms, maxLoaded: 2})
	}
	numbered := func(client, i int, rng *rand.Rand) request {
		return ask("tiny-llama", "/api/chat", false, 10, question(client, i))
	}
	equal3 := func() []spec {
		return []spec{
			{name: "s1", parallel: 2, prompt: 60 * ms, tokenGap: 5 * ms, loaded: models1},
			{name: "s2", parallel: 2, prompt: 60 * ms, tokenGap: 5 * ms, loaded: models1},
			{name: "s3", parallel: 2, prompt: 60 * ms, tokenGap: 5 * ms, loaded: models1}}
	}
	return []workload{
		{name: "speed-classes", models: models1, servers: []spec{
			{name: "x1", parallel: 2, prompt: 40 * ms, tokenGap: 4 * ms, loaded: models1},
			{name: "x2", parallel: 4, prompt: 80 * ms, tokenGap: 8 * ms, loaded: models1},
			{name: "x4", parallel: 3, prompt: 160 * ms, tokenGap: 16 * ms, loaded: models1}},
			phases: []phase{{conc: 12, n: 300, measured: true, next: numbered}},
			note:   "x1 serves 25 req/s, x2 25, x4 9: the pool needs all three, in that order"},
		{name: "many-models", models: models6, servers: five,
			phases: []phase{
				{conc: 8, n: 100, next: func(client, i int, rng *rand.Rand) request {
					return ask(pickModel(rng), "/api/chat", false, 1, question(client, i))
				}},
				{conc: 8, n: 400, measured: true, next: func(client, i int, rng *rand.Rand) request {
					return ask(pickModel(rng), "/api/chat", false, 1, question(client, i))
				}}},
			note: "10 places for 6 models: once placed, a model need not load again"},
		{name: "long-short", models: models1, servers: []spec{
			{name: "fast", parallel: 4, prompt: 20 * ms, promptCost: ms / 2, tokenGap: 2 * ms, loaded: models1},
			{name: "slow1", parallel: 1, prompt: 40 * ms, promptCost: 2 * ms, tokenGap: 8 * ms, loaded: models1},
			{name: "slow2", parallel: 1, prompt: 40 * ms, promptCost: 2 * ms, tokenGap: 8 * ms, loaded: models1}},
			phases: []phase{{conc: 8, n: 240, measured: true, next: func(client, i int, rng *rand.Rand) request {
				if rng.IntN(4) == 0 {
					return ask("tiny-llama", "/api/chat", false, 5, question(client, i)+strings.Repeat(" word", 1000))
				}
				return ask("tiny-llama", "/api/chat", false, 5, question(client, i)+strings.Repeat(" word", 10))
			}}},
			note: "a long prompt takes 0.5 s on fast, 2 s on a slow one; a short one 30 ms and 80 ms"},
		{name: "speedup", models: models1, slowed: "s1", servers: func() []spec {
			s := equal3()
			s[0].speed = 4
			return s
		}(),
			phases: []phase{
				{conc: 6, n: 150, next: numbered},
				{conc: 6, n: 300, measured: true, next: numbered,
					before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(1) }},
			},
			note: "after the change s1 is as fast as the others: a third of the traffic is its share"},
		{name: "speedup-prompt", models: models1, slowed: "s1", servers: []spec{
			{name: "s1", parallel: 2, prompt: 100 * ms, loaded: models1, speed: 3},
			{name: "s2", parallel: 2, prompt: 100 * ms, loaded: models1},
			{name: "s3", parallel: 2, prompt: 100 * ms, loaded: models1}},
			phases: []phase{
				{conc: 6, n: 60, next: simple},
				{conc: 6, n: 300, measured: true, next: simple,
					before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(1) }},
			},
			note: "no generation time tells the recovery from a prompt cache: a third of the traffic is s1's share"},
		{name: "cold-start", models: models1, servers: []spec{
			{name: "s1", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: models1},
			{name: "s2", parallel: 2, prompt: 50 * ms, tokenGap: 5 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: models1},
			{name: "s3", parallel: 2, prompt: 100 * ms, tokenGap: 10 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: models1}},
			phases: []phase{
				{conc: 2, n: 30, next: numbered},
				{conc: 12, n: 150, measured: true, next: numbered,
					before: func(f map[string]*fakeollama.Server) {
						for _, s := range f {
							s.SetLoaded() // keep_alive expired everywhere
						}
						time.Sleep(1500 * ms)
					}}},
			note: "every server loads once (1 s) and the burst spreads by speed"},
		{name: "flaky", models: models1, servers: equal3(),
			phases: []phase{
				{conc: 6, n: 60, next: numbered},
				{conc: 6, n: 400, measured: true, next: numbered,
					during: func(f map[string]*fakeollama.Server, down func(string, bool)) {
						time.Sleep(time.Second)
						down("s1", true)
						f["s1"].FailWith(500, `{"error":"an error was encountered while running the model: CUDA error"}`, fakeollama.Completions...)
						time.Sleep(1500 * ms)
						f["s1"].ClearFaults()
						down("s1", false)
					}}},
			note: "errors are answers of 500 the client saw"},
		{name: "api-mix", models: models1, servers: []spec{
			{name: "fast", parallel: 4, prompt: 40 * ms, tokenGap: 4 * ms, tokens: 30, loaded: models1},
			{name: "slow1", parallel: 1, prompt: 160 * ms, tokenGap: 16 * ms, tokens: 30, loaded: models1},
			{name: "slow2", parallel: 1, prompt: 160 * ms, tokenGap: 16 * ms, tokens: 30, loaded: models1}},
			phases: []phase{{conc: 8, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				path := "/api/chat"
				if rng.IntN(2) == 0 {
					path = "/v1/chat/completions"
				}
				tokens := 0 // the server's default: 30
				if rng.IntN(2) == 0 {
					tokens = 3
				}
				return ask("tiny-llama", path, rng.IntN(2) == 0, tokens, question(client, i))
			}}},
			note: "an answer without a cap runs 30 tokens (0.16 s on fast), one capped at 3 takes 0.05 s"},
	}
}

// question is a short prompt that differs per client and request.
func question(client, i int) string {
	return fmt.Sprintf("Question %d of client %d: why is the sky blue?", i, client)
}

// ask is a chat request on path (/api/chat or /v1/chat/completions), streamed or not, with a
// cap on the answer when tokens > 0.
func ask(model, path string, stream bool, tokens int, prompt string) request {
	body := map[string]any{"model": model, "stream": stream,
		"messages": []map[string]string{{"role": "user", "content": prompt}}}
	if strings.HasPrefix(path, "/v1/") {
		if tokens > 0 {
			body["max_tokens"] = tokens
		}
		if stream {
			body["stream_options"] = map[string]any{"include_usage": true}
		}
	} else if tokens > 0 {
		body["options"] = map[string]any{"num_predict": tokens}
	}
	b, _ := json.Marshal(body)
	return request{model: model, path: path, body: b, tokens: tokens, promptTokens: countTokens(prompt)}
}

// countTokens counts tokens as the fakes do: a run of letters and digits, or one other
// character that is not a space.
func countTokens(s string) int {
	n, inWord := 0, false
	for _, r := range s {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r):
			if !inWord {
				n++
			}
			inWord = true
		case unicode.IsSpace(r):
			inWord = false
		default:
			n++
			inWord = false
		}
	}
	return n
}
