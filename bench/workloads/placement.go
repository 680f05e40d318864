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
	three := []string{"m1", "m2", "m3"}
	return []workload{
		{name: "two-models-empty", models: two, servers: room1(3, time.Second),
			phases: []phase{{conc: 6, n: 300, measured: true, next: mix(two, []int{67, 33})}},
			note:   "ideal: model-a on two servers, model-b on one, 2 loads"},
		{name: "three-models-four", models: three, servers: room1(4, 500*ms),
			phases: []phase{{conc: 8, n: 400, measured: true, next: mix(three, []int{50, 30, 20})}},
			note:   "ideal: m1 on two servers, m2 and m3 on one each, 4 loads"},
	}
}
