// Command workloads is the routing suite of issue 13: named workloads, each run against fresh fake
// Ollama servers (internal/fakeollama: parallel slots with a queue inside, prompt time, time per
// generated token, model load time with room for a limited number of resident models, a speed
// change mid-run) through an in-process Caddy, once per policy: ollamaflow's least_delay,
// least_conn and round_robin, Caddy's own reverse_proxy (least_conn), and an oracle that routes
// from the client side knowing every server's true slots, speed, resident models and work in
// flight (a greedy earliest-completion router; the ideal to compare with). For each it prints
// requests/s, p50 and p99 latency of the measured phase, model loads per 1,000 requests (the
// fakes' own counters), the prompt cache hit rate where the fakes keep one, and, where a server
// slows down mid-run, the share of requests it received after the change:
//
//	go run ./bench/workloads                                 # every workload, every policy (a few minutes)
//	go run ./bench/workloads -workloads quiet-then-burst -policies least_delay,least_conn
//
// Workloads:
//
//	fresh-burst       fast (4 slots, 100 ms) + 2 slow (1 slot, 400 ms), 8 clients at once
//	quiet-then-burst  the same pool: 30 requests at concurrency 1, then the burst (measured)
//	mixed             fast (4 slots) + 2 slow (1 slot), 80% short answers, 20% long ones (16×)
//	two-models        3 servers with room for one model (1 s load), requests for two models
//	slowdown          3 equal servers (2 slots, 100 ms); one turns 4× slower a third of the way
//
// and the conversational workloads of conversations.go (multi-turn chats whose history a
// server's prompt cache holds, one of them slowing down under them; a burst of the same
// one-message chat),
// and the robustness workloads of robustness.go (speed classes, many models, long and short
// prompts, a server that gets faster, seen in its answers or in its prompt time alone, a cold
// start, a failing server, both APIs), and the generalization workloads of generalization.go
// (an 8-server pool, equal servers at and over capacity, long streamed answers, a shared
// system prompt, models over servers of different room, a 2× slowdown, a server unloaded
// mid-run, open-loop arrivals, a few long answers, three speed classes after a quiet start, a
// slowdown seen in the prompt time alone), and
// the workloads of shapes.go, where servers differ in what they are fast at or in slots
// (prefill-decode, slots-unequal), and those of placement.go, where servers start with nothing
// loaded and room for one model (two-models-empty, three-models-four).
// -random N adds N workloads drawn at random (random.go: pools, client counts and request
// mixes nobody tuned the policies on), to check a change beyond the workloads above;
// -random-models N adds N drawn with several models, servers of limited room and load times
// of their own (randmodels.go), for the placement rules.
// A phase with a rate is open-loop: requests arrive at that rate whatever the answers.
// -affinity=false turns conversation affinity off, to see the cost model alone; -trace prints a
// line per measured request (when it was sent, its client, prompt tokens and cap, the server,
// its latency and the load it waited for) to stderr, to see which requests make a tail.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/bench/benchkit"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-ollamaflow/ollamaflow"
	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

const ms = time.Millisecond

var affinity = true

// traceTo, when set (-trace), receives a line per measured request: when it was sent (seconds
// into the phase), its client, prompt tokens and answer cap, the server that answered and its
// latency, to see which requests make a tail.
var traceTo io.Writer

// spec is one fake server.
type spec struct {
	name       string
	parallel   int
	prompt     time.Duration // FirstByteDelay
	promptCost time.Duration // PromptTokenCost: per prompt token not found in the cache
	tokenGap   time.Duration
	tokens     int // answer length when a request sets no num_predict / max_tokens (default 1)
	loadDelay  time.Duration
	maxLoaded  int
	loaded     []string
	speed      float64 // SetSpeed at the start (0: 1)
}

// request is one request a client sends: its model, path (default /api/chat), body and, for
// the oracle, its size.
type request struct {
	model        string
	path         string
	body         []byte
	tokens       int // answer length (num_predict), for the oracle; 0: the server's default
	promptTokens int // prompt tokens, for the oracle (where the fakes charge them)
	convo, turn  int
	seen         *seenInfo // filled by post while tracing
}

// seenInfo is what -trace prints of an answer beyond its server: why the proxy chose it
// (X-OllamaFlow-Route) and the prompt evaluation the fake reported (short where its cache
// held the prefix).
type seenInfo struct {
	route      string
	promptEval time.Duration
	load       time.Duration // load_duration: the answer waited for its model to load
}

// phase is a stretch of a workload: conc clients send n requests made by next (or, at a rate,
// n requests arrive on their own).
type phase struct {
	conc, n int
	// rate, when set, makes the phase open-loop: n requests sent at rate per second whatever
	// the answers (conc is then unused), as independent users arrive, instead of conc clients
	// that each wait for their answer.
	rate     float64
	measured bool
	before   func(fakes map[string]*fakeollama.Server) // e.g. slow a server down
	// during runs alongside the phase (e.g. a server failing for a while); down tells the
	// oracle a server is failing, as it knows everything else.
	during func(fakes map[string]*fakeollama.Server, down func(name string, failing bool))
	next   func(client, i int, rng *rand.Rand) request
	// think is how long a closed-loop client waits after an answer before its next request
	// (a user reading it and typing); 0: at once.
	think time.Duration
}

type workload struct {
	name    string
	servers []spec
	models  []string
	phases  []phase
	slowed  string // the server that changes speed, for its share after the change
	note    string
}

var models1 = []string{"tiny-llama"}

func chat(model string, tokens int, msgs ...string) request {
	type message struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	}
	var list []message
	for i, m := range msgs {
		role := "user"
		if i%2 == 1 {
			role = "assistant"
		}
		list = append(list, message{role, m})
	}
	body, _ := json.Marshal(map[string]any{"model": model, "messages": list, "stream": false, "options": map[string]any{"num_predict": tokens}})
	return request{model: model, body: body, tokens: tokens}
}

func fastSlow(tokenGap time.Duration, prompt, slowPrompt time.Duration) []spec {
	return []spec{
		{name: "fast", parallel: 4, prompt: prompt, tokenGap: tokenGap, loaded: models1},
		{name: "slow1", parallel: 1, prompt: slowPrompt, tokenGap: 4 * tokenGap, loaded: models1},
		{name: "slow2", parallel: 1, prompt: slowPrompt, tokenGap: 4 * tokenGap, loaded: models1},
	}
}

func simple(client, i int, _ *rand.Rand) request {
	return chat("tiny-llama", 1, "Why is the sky blue?")
}

func workloads() []workload {
	return append([]workload{
		{name: "fresh-burst", servers: fastSlow(0, 100*ms, 400*ms), models: models1,
			phases: []phase{{conc: 8, n: 300, measured: true, next: simple}},
			note:   "ideal: everything on fast, 8 at once on 4 slots: 40 req/s, p99 ~0.2 s"},
		{name: "quiet-then-burst", servers: fastSlow(0, 100*ms, 400*ms), models: models1,
			phases: []phase{{conc: 1, n: 30, next: simple}, {conc: 8, n: 300, measured: true, next: simple}},
			note:   "the burst after a quiet history must look like the fresh burst"},
		{name: "mixed", servers: fastSlow(5*ms, 20*ms, 80*ms), models: models1,
			phases: []phase{{conc: 8, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				if rng.IntN(5) == 0 {
					return chat("tiny-llama", 80, "Write a long story.")
				}
				return chat("tiny-llama", 5, "Say hi.")
			}}}},
		{name: "two-models", servers: []spec{
			{name: "s1", parallel: 2, prompt: 100 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: []string{"model-a"}},
			{name: "s2", parallel: 2, prompt: 100 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: []string{"model-a"}},
			{name: "s3", parallel: 2, prompt: 100 * ms, loadDelay: time.Second, maxLoaded: 1, loaded: []string{"model-a"}}},
			models: []string{"model-a", "model-b"},
			phases: []phase{{conc: 6, n: 300, measured: true, next: func(client, i int, rng *rand.Rand) request {
				if rng.IntN(3) == 0 {
					return chat("model-b", 1, "Why is the sky blue?")
				}
				return chat("model-a", 1, "Why is the sky blue?")
			}}}},
		{name: "slowdown", servers: []spec{
			{name: "s1", parallel: 2, prompt: 100 * ms, loaded: models1},
			{name: "s2", parallel: 2, prompt: 100 * ms, loaded: models1},
			{name: "s3", parallel: 2, prompt: 100 * ms, loaded: models1}}, models: models1, slowed: "s1",
			phases: []phase{
				{conc: 6, n: 150, next: simple},
				{conc: 6, n: 300, measured: true, next: simple,
					before: func(f map[string]*fakeollama.Server) { f["s1"].SetSpeed(4) }},
			}},
	}, append(append(append(conversationWorkloads(), robustnessWorkloads()...), generalizationWorkloads()...), append(append(spreadWorkloads(), shapeWorkloads()...), placementWorkloads()...)...)...)
}

// result is one policy's run of one workload.
type result struct {
	policy         string
	n, errs        int
	elapsed        time.Duration
	lat            []time.Duration
	loads          int
	queued         int // requests that waited inside a server for a slot (the fakes' count)
	cacheHits      string
	slowShare      float64 // share of the measured phase's requests on the slowed server; -1 if none
	share          map[string]int
	sameServerTurn float64 // follow-up turns on the server of the previous turn; -1 if none
}

func (r result) rps() float64 { return float64(r.n) / r.elapsed.Seconds() }

func main() {
	only := flag.String("workloads", "", "comma-separated workloads to run (default all)")
	pols := flag.String("policies", "least_delay,least_conn,round_robin,reverse_proxy,oracle", "comma-separated: ollamaflow policies, reverse_proxy (Caddy's least_conn) and oracle")
	seed := flag.Uint64("seed", 1, "seed of the request mix")
	flag.BoolVar(&affinity, "affinity", true, "conversation affinity (ollamaflow policies)")
	random := flag.Int("random", 0, "add this many random workloads (random.go), random-01 onwards")
	randomModels := flag.Int("random-models", 0, "add this many random workloads with several models (randmodels.go), models-01 onwards")
	trace := flag.Bool("trace", false, "print a line per request to stderr: sent at, client, prompt tokens, cap, server, latency (the phases before the measured one under policy/warm)")
	list := flag.Bool("list", false, "print each selected workload's name and note, and run nothing")
	flag.Parse()
	if *trace {
		traceTo = os.Stderr
	}
	port := benchkit.FreePort()
	var tables []string
	for _, w := range append(append(workloads(), randomWorkloads(*random)...), randomModelWorkloads(*randomModels)...) {
		if *only != "" && !slices.Contains(strings.Split(*only, ","), w.name) {
			continue
		}
		if *list {
			fmt.Printf("%s\t%s\n", w.name, w.note)
			continue
		}
		var rows []result
		for _, p := range strings.Split(*pols, ",") {
			r := run(w, strings.TrimSpace(p), port, *seed)
			fmt.Fprintf(os.Stderr, "%-17s %-14s %6.1f req/s p50 %-7v p99 %-7v loads/1k %-5d queued %-4d errors %d received %v\n",
				w.name, p, r.rps(), benchkit.Pct(r.lat, 0.5), benchkit.Pct(r.lat, 0.99), perK(r.loads, r.n+r.errs), r.queued, r.errs, r.share)
			rows = append(rows, r)
		}
		tables = append(tables, table(w, rows))
	}
	_ = caddy.Stop()
	fmt.Println(strings.Join(tables, "\n"))
}

func perK(loads, n int) int { return (1000*loads + n/2) / max(n, 1) }

// run starts fresh fakes, routes through policy and drives the workload's phases.
func run(w workload, policy string, port int, seed uint64) result {
	fakes := map[string]*fakeollama.Server{}
	var addrs []string
	for _, s := range w.servers {
		f := fakeollama.New(fakeollama.Config{Models: w.models, Loaded: s.loaded, Parallel: s.parallel, FirstByteDelay: s.prompt,
			PromptTokenCost: s.promptCost, TokenGap: s.tokenGap, LoadDelay: s.loadDelay, MaxLoaded: s.maxLoaded, Tokens: max(s.tokens, 1)})
		defer f.Close()
		if s.speed != 0 {
			f.SetSpeed(s.speed)
		}
		fakes[s.name] = f
		addrs = append(addrs, f.HostPort())
	}
	var send func(req request) (string, error)
	client := benchkit.Client(64)
	defer client.CloseIdleConnections()
	var downs sync.Map // server name -> failing, for the oracle
	down := func(name string, failing bool) { downs.Store(name, failing) }
	if policy == "oracle" {
		o := newOracle(w, fakes)
		o.down = func(name string) bool { v, _ := downs.Load(name); return v == true }
		send = func(req request) (string, error) { return o.send(client, req) }
	} else {
		// A frontend of its own per run: the conversation table is kept
		// per frontend name across reloads (a user's live state), and a
		// run must not find an earlier workload's prompts pointing at
		// servers that are gone.
		extra := []string{fmt.Sprintf("name %s-%s", w.name, policy)}
		var names []string
		if !affinity {
			extra = append(extra, "conversation_affinity off")
		}
		for _, s := range w.servers {
			names = append(names, s.name)
		}
		base := benchkit.Serve(port, benchkit.Site(policy, names, addrs, extra...))
		send = func(req request) (string, error) { return post(client, base, req) }
	}

	res := result{policy: policy, slowShare: -1, sameServerTurn: -1, share: map[string]int{}}
	rng := rand.New(rand.NewPCG(seed, 7))
	var rngMu sync.Mutex
	var lastServer sync.Map // convo -> server of its previous turn
	var follow, followSame atomic.Int64
	for _, ph := range w.phases {
		if ph.before != nil {
			ph.before(fakes)
		}
		if ph.measured {
			for _, f := range fakes {
				f.ResetStats()
			}
		}
		var sent atomic.Int64
		var mu sync.Mutex
		var wg sync.WaitGroup
		start := time.Now()
		phaseDone := make(chan struct{})
		if ph.during != nil {
			wg.Go(func() {
				ph.during(fakes, down)
				<-phaseDone
			})
		}
		one := func(c, i int) {
			rngMu.Lock()
			req := ph.next(c, i, rng)
			rngMu.Unlock()
			if traceTo != nil {
				req.seen = &seenInfo{}
			}
			t0 := time.Now()
			server, err := send(req)
			d := time.Since(t0)
			if req.turn > 0 && ph.measured {
				follow.Add(1)
				if prev, ok := lastServer.Load(req.convo); ok && prev == server {
					followSame.Add(1)
				}
			}
			lastServer.Store(req.convo, server)
			mu.Lock()
			if traceTo != nil {
				label := policy
				if !ph.measured {
					label += "/warm" // the phases before the measured one, traced apart
				}
				fmt.Fprintf(traceTo, "trace %s %s at %.3f model %s client %d convo %d turn %d prompt %d cap %d server %s route %s prompt_eval %.3f took %.3f err %v load %.3f\n",
					w.name, label, t0.Sub(start).Seconds(), req.model, c, req.convo, req.turn, req.promptTokens, req.tokens, server,
					req.seen.route, req.seen.promptEval.Seconds(), d.Seconds(), err, req.seen.load.Seconds())
			}
			if !ph.measured {
				mu.Unlock()
				return
			}
			if err != nil {
				res.errs++
			} else {
				res.lat = append(res.lat, d)
			}
			mu.Unlock()
		}
		var clients sync.WaitGroup
		if ph.rate > 0 {
			// Open loop: request i leaves at start + i/rate, each from its own client.
			for i := range ph.n {
				time.Sleep(time.Until(start.Add(time.Duration(float64(i) / ph.rate * float64(time.Second)))))
				clients.Go(func() { one(i, 0) })
			}
		} else {
			for c := range ph.conc {
				clients.Go(func() {
					for i := 0; sent.Add(1) <= int64(ph.n); i++ {
						one(c, i)
						time.Sleep(ph.think)
					}
				})
			}
		}
		clients.Wait()
		if ph.measured {
			res.elapsed = time.Since(start)
		}
		close(phaseDone)
		wg.Wait()
	}
	res.n = len(res.lat)
	total := 0
	for _, s := range w.servers {
		f := fakes[s.name]
		res.share[s.name] = f.Count("/api/chat") + f.Count("/v1/chat/completions")
		total += res.share[s.name]
		res.loads += f.ColdLoads()
		res.queued += f.Queued()
	}
	if w.slowed != "" {
		res.slowShare = float64(res.share[w.slowed]) / float64(max(total, 1))
	}
	if n := follow.Load(); n > 0 {
		res.sameServerTurn = float64(followSame.Load()) / float64(n)
	}
	res.cacheHits = cacheHitRate(fakes)
	return res
}

// post sends one chat to base (the proxy, or a fake for the oracle) and names the server that
// answered (X-OllamaFlow-Backend; "" through reverse_proxy). An answer counts when it is
// complete in its API's format: Ollama's final object (streamed or not), OpenAI's finish_reason
// or its stream's [DONE].
func post(client *http.Client, base string, r request) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	path := r.path
	if path == "" {
		path = "/api/chat"
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(r.body))
	req.Header.Set("Content-Type", "application/json")
	res, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("transport error")
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	switch {
	case err != nil:
		return "", fmt.Errorf("body cut")
	case res.StatusCode != http.StatusOK:
		return "", fmt.Errorf("status %d", res.StatusCode)
	case strings.HasPrefix(path, "/v1/") && !bytes.Contains(b, []byte(`data: [DONE]`)) && !bytes.Contains(b, []byte(`"finish_reason":"`)),
		!strings.HasPrefix(path, "/v1/") && !bytes.Contains(b, []byte(`"done":true`)):
		return "", fmt.Errorf("incomplete body")
	}
	if r.seen != nil {
		r.seen.route = res.Header.Get("X-OllamaFlow-Route")
		var final struct {
			PromptEval int64 `json:"prompt_eval_duration"`
			Load       int64 `json:"load_duration"`
		}
		if json.Unmarshal(b, &final) == nil {
			r.seen.promptEval, r.seen.load = time.Duration(final.PromptEval), time.Duration(final.Load)
		}
	}
	return res.Header.Get("X-OllamaFlow-Backend"), nil
}

// oracle routes from the client side with what no proxy can know: each server's true slots,
// speed (including a change the workload makes), resident models and every request in flight
// with its true remaining time. It sends a request where it would end first, counting for a
// load the reload of the model it evicts when no other server holds that model.
type oracle struct {
	mu      sync.Mutex
	servers []*oserver
	down    func(name string) bool // a server the workload makes fail
	cached  map[int]oracleCache    // by conversation: where its last turn is cached
}

type oserver struct {
	spec   spec
	fake   *fakeollama.Server
	url    string
	flight map[uint64]ojob // requests in flight
	slow   float64
}

// ojob is a request in flight on a server, for the oracle: when it was sent and its true
// service time.
type ojob struct {
	sent    time.Time
	service time.Duration
}

var oracleID atomic.Uint64

func newOracle(w workload, fakes map[string]*fakeollama.Server) *oracle {
	o := &oracle{}
	for _, s := range w.servers {
		o.servers = append(o.servers, &oserver{spec: s, fake: fakes[s.name], url: fakes[s.name].URL, flight: map[uint64]ojob{}, slow: 1})
	}
	return o
}

func (o *oracle) send(client *http.Client, req request) (string, error) {
	o.mu.Lock()
	now := time.Now()
	var best *oserver
	var bestEnd time.Time
	var bestService time.Duration
	for _, s := range o.servers {
		if o.down != nil && o.down(s.spec.name) {
			continue
		}
		s.slow = s.fake.Speed() // the workload's own change: known to the oracle
		tokens := req.tokens
		if tokens == 0 {
			tokens = max(s.spec.tokens, 1)
		}
		evaluated := req.promptTokens - o.cachedTokens(s, req)
		service := time.Duration(float64(s.spec.prompt+time.Duration(evaluated)*s.spec.promptCost+time.Duration(tokens)*s.spec.tokenGap) * s.slow)
		// The fake serves first come, first served: replay the requests in flight in the
		// order they were sent, each on the first free slot; one past its end (the machine's
		// own overhead) still has a tenth of its time left, and those behind it start no
		// earlier than now.
		var jobs []ojob
		for _, f := range s.flight {
			jobs = append(jobs, f)
		}
		sort.Slice(jobs, func(i, j int) bool { return jobs[i].sent.Before(jobs[j].sent) })
		free := make([]time.Time, max(s.spec.parallel, 1))
		for _, j := range jobs {
			k := slices.IndexFunc(free, func(t time.Time) bool { return !t.After(slices.MinFunc(free, time.Time.Compare)) })
			start := free[k]
			if j.sent.After(start) {
				start = j.sent
			}
			end := start.Add(j.service)
			if floor := now.Add(j.service / 10); end.Before(floor) {
				end = floor
			}
			free[k] = end
		}
		wait := max(slices.MinFunc(free, time.Time.Compare).Sub(now), 0)
		end := now.Add(wait + service)
		if req.model != "" && !slices.Contains(s.fake.Loaded(), req.model+":latest") {
			end = end.Add(s.spec.loadDelay)
			if victims := s.fake.Loaded(); s.spec.maxLoaded > 0 && len(victims) >= s.spec.maxLoaded && !o.elsewhere(s, victims[0]) {
				end = end.Add(s.spec.loadDelay)
			}
		}
		if best == nil || end.Before(bestEnd) {
			best, bestEnd, bestService = s, end, end.Sub(now)-wait
		}
	}
	if best == nil { // every server failing: any will do
		best, bestEnd = o.servers[0], now
	}
	o.noteCached(best, req)
	id := oracleID.Add(1)
	best.flight[id] = ojob{now, bestService}
	o.mu.Unlock()
	_, err := post(client, best.url, req)
	o.mu.Lock()
	delete(best.flight, id)
	o.mu.Unlock()
	return best.spec.name, err
}

func (o *oracle) elsewhere(s *oserver, model string) bool {
	for _, t := range o.servers {
		if t != s && slices.Contains(t.fake.Loaded(), model) {
			return true
		}
	}
	return false
}

func table(w workload, rows []result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "### %s\n", w.name)
	if w.note != "" {
		fmt.Fprintf(&b, "%s\n", w.note)
	}
	head := []string{"policy", "req/s", "p50", "p99", "loads/1k", "cache hits", "same server next turn", "changed server's share", "received"}
	out := [][]string{head}
	for _, r := range rows {
		name := r.policy
		if name == "reverse_proxy" {
			name = "Caddy reverse_proxy least_conn"
		}
		frac := func(x float64) string {
			if x < 0 {
				return "-"
			}
			return fmt.Sprintf("%.0f%%", 100*x)
		}
		var parts []string
		for _, s := range w.servers {
			parts = append(parts, fmt.Sprintf("%s %d", s.name, r.share[s.name]))
		}
		out = append(out, []string{name, fmt.Sprintf("%.1f", r.rps()), benchkit.Pct(r.lat, 0.5).String(), benchkit.Pct(r.lat, 0.99).String(),
			fmt.Sprint(perK(r.loads, r.n+r.errs)), r.cacheHits, frac(r.sameServerTurn), frac(r.slowShare), strings.Join(parts, ", ")})
		if r.errs > 0 {
			out[len(out)-1][0] += fmt.Sprintf(" (%d errors)", r.errs)
		}
	}
	b.WriteString(benchkit.Table(out, false))
	return b.String()
}
