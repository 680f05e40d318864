package main

import (
	"fmt"
	"math/rand/v2"
	"time"
)

// Workloads where the first requests decide where models live: servers that start with
// nothing loaded and room for one model each, and a mix that is not even.
//
//	two-models-empty   3 servers of room 1 (1 s loads), nothing loaded; two thirds of the
//	                   requests for model-a, a third for model-b: ideal is a on two, b on one
//	three-models-four  4 servers of room 1 (0.5 s loads), nothing loaded; models asked 50, 30
//	                   and 20 % of the time: ideal is the first on two servers
//	slow-mix           3 servers of 2 slots and room 2 (2 s loads), answers of 0.6 s (a GPU
//	                   pool's pace: at most 10 requests a second); model-a on s1 only, model-b
//	                   on s2 and s3, and three requests in four for model-a: ideal is model-a
//	                   loaded beside model-b on every server
func placementWorkloads() []workload {
	room1 := func(n int, load time.Duration) []spec {
		var s []spec
		for i := range n {
			s = append(s, spec{name: fmt.Sprintf("s%d", i+1), parallel: 2, prompt: 100 * ms, loadDelay: load, maxLoaded: 1})
		}
		return s
	}
	mix := func(models []string, shares []int) func(client, i int, rng *rand.Rand) request {
		return func(client, i int, rng *rand.Rand) request {
			x := rng.IntN(100)
			for k, p := range shares {
				if x < p {
					return ask(models[k], "/api/chat", false, 1, question(client, i))
				}
				x -= p
			}
			return ask(models[0], "/api/chat", false, 1, question(client, i))
		}
	}
	two := []string{"model-a", "model-b"}
	// slow-mix: servers of 2 slots and room 2 at a GPU pool's pace, one model each.
	slowPool := func(loaded ...string) []spec {
		var s []spec
		for i, m := range loaded {
			s = append(s, spec{name: fmt.Sprintf("s%d", i+1), parallel: 2, prompt: 600 * ms,
				loadDelay: 2 * time.Second, maxLoaded: 2, loaded: []string{m}})
		}
		return s
	}
	slowMix := mix(two, []int{75, 25})
	three := []string{"m1", "m2", "m3"}
	return []workload{
		{name: "two-models-empty", models: two, servers: room1(3, time.Second),
			phases: []phase{{conc: 6, n: 300, measured: true, next: mix(two, []int{67, 33})}},
			note:   "ideal: model-a on two servers, model-b on one, 2 loads"},
		{name: "three-models-four", models: three, servers: room1(4, 500*ms),
			phases: []phase{{conc: 8, n: 400, measured: true, next: mix(three, []int{50, 30, 20})}},
			note:   "ideal: m1 on two servers, m2 and m3 on one each, 4 loads"},
		{name: "slow-mix", models: two, servers: slowPool("model-a", "model-b", "model-b"),
			phases: []phase{{conc: 1, n: 20, next: slowMix}, {conc: 6, n: 500, measured: true, next: slowMix}},
			note:   "6 slots of 0.6 s answers: 10 req/s once model-a is on every server, under 5 on one"},
	}
}
