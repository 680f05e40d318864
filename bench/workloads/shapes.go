package main

import (
	"math/rand/v2"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// Workloads where servers differ in what they are fast at, not only in speed: a router that
// sizes each request (prompt and answer) against each server's rates sends it where its kind of
// work is cheap; one that counts requests cannot.
//
//	prefill-decode    two servers of 2 slots: one evaluates prompts 8× faster, the other
//	                  generates 8× faster; half the requests summarise a 2,000-token document in 5
//	                  tokens, half write 100 tokens from a one-line question
func shapeWorkloads() []workload {
	doc := fakeollama.Text(2000)
	return []workload{
		{name: "prefill-decode", models: models1, servers: []spec{
			{name: "prefill", parallel: 2, prompt: 5 * ms, promptCost: 50 * time.Microsecond, tokenGap: 8 * ms, loaded: models1},
			{name: "decode", parallel: 2, prompt: 5 * ms, promptCost: 400 * time.Microsecond, tokenGap: ms, loaded: models1}},
			phases: []phase{{conc: 6, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				// The question comes first, so no two prompts share the document in a cache slot.
				if rng.IntN(2) == 0 {
					return ask("tiny-llama", "/api/chat", false, 5, question(client, i)+" Summarise: "+doc)
				}
				return ask("tiny-llama", "/api/chat", false, 100, question(client, i))
			}}},
			note: "a summary takes 0.15 s on prefill, 0.81 s on decode; a 100-token answer 0.81 s on prefill, 0.11 s on decode"},
		{name: "slots-unequal", models: models1, servers: []spec{
			{name: "wide", parallel: 8, prompt: 60 * ms, tokenGap: 4 * ms, loaded: models1},
			{name: "narrow1", parallel: 1, prompt: 60 * ms, tokenGap: 4 * ms, loaded: models1},
			{name: "narrow2", parallel: 1, prompt: 60 * ms, tokenGap: 4 * ms, loaded: models1}},
			phases: []phase{{conc: 10, n: 600, measured: true, next: func(client, i int, _ *rand.Rand) request {
				return ask("tiny-llama", "/api/chat", false, 10, question(client, i))
			}}},
			note: "ideal: 8 at once on wide, 1 on each narrow: 100 req/s, p99 0.1 s"},
	}
}
