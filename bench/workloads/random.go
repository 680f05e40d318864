package main

// Random workloads, to see how the policies do on pools and mixes nobody
// tuned them on: -random N adds N of them, each drawn from its own seed
// (the same N gives the same workloads on every machine), named random-01,
// random-02 and so on. Not run by default: the suite's own workloads are
// what the README's tables report; these are for a check before a change
// lands (`-random 30 -policies least_delay,least_conn`: 45 minutes on a 2-core machine).

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

// randomWorkloads draws n workloads: 2 to 5 servers of 1 to 4 slots, each
// 1× to 4× slower than the base, with its own prompt and token times;
// clients from half to twice the pool's slots; and one of four shapes: a
// burst of short and long answers (some with long prompts), multi-turn
// conversations, a server changing speed (4× faster to 4× slower) after a
// warm-up, or a quiet start at concurrency 1 before the burst.
func randomWorkloads(n int) []workload {
	var out []workload
	for seed := uint64(1); seed <= uint64(n); seed++ {
		r := rand.New(rand.NewPCG(seed, 7))
		var servers []spec
		slots := 0
		for i := range 2 + r.IntN(4) {
			s := spec{name: fmt.Sprintf("r%d", i+1), parallel: 1 + r.IntN(4),
				prompt: time.Duration(20+r.IntN(80)) * ms, promptCost: convPromptCost,
				tokenGap: time.Duration(1+r.IntN(8)) * ms, loaded: models1,
				speed: []float64{1, 1, 1, 1.5, 2, 3, 4}[r.IntN(7)]}
			servers = append(servers, s)
			slots += s.parallel
		}
		conc := max(2, slots*(50+r.IntN(150))/100)
		shape, longShare, longPrompts := r.IntN(4), r.IntN(40), r.IntN(3) == 0
		answer, system := 10+int(seed%20), 100+int(seed*37%900)
		next := func(client, i int, rng *rand.Rand) request {
			tokens := 1 + rng.IntN(10)
			if rng.IntN(100) < longShare {
				tokens = 30 + rng.IntN(80)
			}
			q := question(client, i)
			if longPrompts && rng.IntN(4) == 0 {
				q += strings.Repeat(" word", 200+rng.IntN(800))
			}
			return ask("tiny-llama", "/api/chat", false, tokens, q)
		}
		measured := 25 * conc
		w := workload{name: fmt.Sprintf("random-%02d", seed), models: models1, servers: servers}
		var what string
		switch shape {
		case 0:
			w.phases = []phase{{conc: conc, n: measured, measured: true, next: next}}
			what = "a burst"
		case 1:
			w.phases = []phase{{conc: conc, n: measured, measured: true, next: func(client, i int, _ *rand.Rand) request {
				return conversationTurn(client, i, answer, func(convo int) string {
					return fmt.Sprintf("conversation %d-%d. %s", client, convo, fakeollama.Text(system))
				})
			}}}
			what = fmt.Sprintf("conversations (%d-token answers, %d-token system prompt)", answer, system)
		case 2:
			changed := servers[r.IntN(len(servers))].name
			factor := []float64{0.25, 0.5, 2, 3, 4}[r.IntN(5)]
			w.slowed = changed
			w.phases = []phase{{conc: conc, n: measured / 2, next: next},
				{conc: conc, n: measured, measured: true, next: next,
					before: func(f map[string]*fakeollama.Server) { f[changed].SetSpeed(factor) }}}
			what = fmt.Sprintf("a burst; %s's time ×%v after a warm-up", changed, factor)
		default:
			w.phases = []phase{{conc: 1, n: 20, next: next}, {conc: conc, n: measured, measured: true, next: next}}
			what = "a burst after 20 requests one at a time"
		}
		var pool []string
		for _, s := range servers {
			pool = append(pool, fmt.Sprintf("%s %d slots ×%v (first byte %v, %v/token)", s.name, s.parallel, s.speed, s.prompt, s.tokenGap))
		}
		w.note = fmt.Sprintf("%s, %d clients, %d%% long answers, long prompts %v; %s", what, conc, longShare, longPrompts, strings.Join(pool, ", "))
		out = append(out, w)
	}
	return out
}
