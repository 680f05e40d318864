package main

// Random workloads with several models, for the placement rules what
// random.go is for speed and conversations: -random-models N adds N of them,
// named models-01, models-02 and so on, each drawn from its own seed (a
// stream apart from random.go's, so adding these changes none of those).
// Not run by default.

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// randomModelWorkloads draws n workloads: 2 to 5 servers of 1 to 4 slots,
// each 1× to 3× slower than the base, with room for 1 to 3 models and a load
// time of 0.3 s to 2 s; 2 to 5 models asked with uneven shares (some twice
// or five times another's); each server starting with nothing loaded or with
// a model drawn at random; clients from half to twice the pool's slots; and
// one of three shapes: a burst, a burst after 20 requests one at a time, or
// a warm-up of half the burst after which the shares turn around (the most
// asked model becomes the least asked), the rest measured.
func randomModelWorkloads(n int) []workload {
	var out []workload
	for seed := uint64(1); seed <= uint64(n); seed++ {
		r := rand.New(rand.NewPCG(seed, 11))
		nm := 2 + r.IntN(4)
		var models []string
		var shares []int
		for i := range nm {
			models = append(models, fmt.Sprintf("model-%c", 'a'+i))
			shares = append(shares, []int{1, 1, 2, 3, 5, 8}[r.IntN(6)])
		}
		var servers []spec
		slots := 0
		for i := range 2 + r.IntN(4) {
			s := spec{name: fmt.Sprintf("m%d", i+1), parallel: 1 + r.IntN(4),
				prompt: time.Duration(20+r.IntN(80)) * ms, tokenGap: time.Duration(1+r.IntN(8)) * ms,
				maxLoaded: 1 + r.IntN(3), loadDelay: time.Duration(300+r.IntN(1700)) * ms,
				speed: []float64{1, 1, 1, 1.5, 2, 3}[r.IntN(6)]}
			if r.IntN(2) == 0 {
				s.loaded = []string{models[r.IntN(nm)]}
			}
			servers = append(servers, s)
			slots += s.parallel
		}
		conc := max(2, slots*(50+r.IntN(150))/100)
		longShare := r.IntN(30)
		pick := func(shares []int) func(client, i int, rng *rand.Rand) request {
			total := 0
			for _, s := range shares {
				total += s
			}
			return func(client, i int, rng *rand.Rand) request {
				x, m := rng.IntN(total), 0
				for x >= shares[m] {
					x -= shares[m]
					m++
				}
				tokens := 1 + rng.IntN(10)
				if rng.IntN(100) < longShare {
					tokens = 30 + rng.IntN(60)
				}
				return ask(models[m], "/api/chat", false, tokens, question(client, i))
			}
		}
		measured := 25 * conc
		w := workload{name: fmt.Sprintf("models-%02d", seed), models: models, servers: servers}
		var what string
		switch r.IntN(3) {
		case 0:
			w.phases = []phase{{conc: conc, n: measured, measured: true, next: pick(shares)}}
			what = "a burst"
		case 1:
			w.phases = []phase{{conc: 1, n: 20, next: pick(shares)}, {conc: conc, n: measured, measured: true, next: pick(shares)}}
			what = "a burst after 20 requests one at a time"
		default:
			turned := make([]int, nm)
			for i := range shares {
				turned[i] = shares[nm-1-i]
			}
			w.phases = []phase{{conc: conc, n: measured / 2, next: pick(shares)},
				{conc: conc, n: measured, measured: true, next: pick(turned)}}
			what = fmt.Sprintf("shares turned from %v to %v after a warm-up", shares, turned)
		}
		var pool []string
		for _, s := range servers {
			pool = append(pool, fmt.Sprintf("%s %d slots ×%v room %d load %v loaded %v", s.name, s.parallel, s.speed, s.maxLoaded, s.loadDelay, s.loaded))
		}
		w.note = fmt.Sprintf("%s, models %v asked %v, %d clients, %d%% long answers; %s", what, models, shares, conc, longShare, strings.Join(pool, ", "))
		out = append(out, w)
	}
	return out
}
