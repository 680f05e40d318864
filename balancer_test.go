package ollamaflow

import (
	"net/url"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testBackend is a backend view over a detached server (no probe loop).
func testBackend(name string, mutate func(*Backend)) *backend {
	cfg := &Backend{Name: name, URL: "127.0.0.1:1"}
	if mutate != nil {
		mutate(cfg)
	}
	if err := cfg.provision(); err != nil {
		panic(err)
	}
	base, _ := url.Parse("http://" + name + ":11434")
	b := newBackendView(cfg, base)
	b.srv = &server{key: base.String(), base: base}
	b.srv.models.Store(&modelSnapshot{})
	return b
}

func names(list []*backend) []string {
	var out []string
	for _, b := range list {
		out = append(out, b.cfg.Name)
	}
	return out
}

func TestCandidatesFilterAndExplain(t *testing.T) {
	noEmbed := false
	gpu := testBackend("gpu", func(c *Backend) { c.Labels = []string{"GPU", "eu"} })
	cpu := testBackend("cpu", func(c *Backend) { c.Labels = []string{"cpu"}; c.AllowEmbeddings = &noEmbed })
	off := testBackend("off", func(c *Backend) { c.Disabled = true; c.Labels = []string{"gpu", "eu"} })
	h := &Handler{backends: []*backend{gpu, cpu, off}}

	got, why := h.candidates(kindCompletion, nil)
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu", "cpu"}, names(got), "disabled backends are never candidates")

	got, why = h.candidates(kindEmbedding, nil)
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu"}, names(got), "a backend that disallows embeddings is skipped")

	got, why = h.candidates(kindCompletion, []string{"gpu", "eu"})
	require.Nil(t, why)
	assert.Equal(t, []string{"gpu"}, names(got), "labels match exactly and case-insensitively")

	_, why = h.candidates(kindCompletion, []string{"europe"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "europe", "labels never match by substring")

	_, why = h.candidates(kindEmbedding, []string{"cpu"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "labels cpu")

	h2 := &Handler{backends: []*backend{cpu}}
	_, why = h2.candidates(kindEmbedding, nil)
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "embedding")

	gpu.srv.state.Store(int32(stateUnhealthy))
	_, why = h.candidates(kindCompletion, []string{"gpu"})
	require.NotNil(t, why)
	assert.Contains(t, why.msg, "no healthy backend")
}

func TestAcquireRespectsCaps(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 1 })
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 2 })
	h := &Handler{backends: []*backend{a, b}, policy: pickLeastConn}
	cands := []*backend{a, b}

	var got []string
	for i := 0; i < 3; i++ {
		picked := h.acquire(cands, "")
		require.NotNil(t, picked, "slot %d", i)
		got = append(got, picked.cfg.Name)
	}
	assert.ElementsMatch(t, []string{"a", "b", "b"}, got)
	assert.Nil(t, h.acquire(cands, ""), "every candidate is at its cap")
	assert.EqualValues(t, 1, a.srv.inFlight.Load())
	assert.EqualValues(t, 2, b.srv.inFlight.Load())

	b.srv.release()
	picked := h.acquire(cands, "")
	require.NotNil(t, picked)
	assert.Equal(t, "b", picked.cfg.Name, "a freed slot is taken at once")
}

func TestLeastConnPrefersLowestLoadRatio(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.MaxParallel = 4 })
	b := testBackend("b", func(c *Backend) { c.MaxParallel = 2 })
	a.srv.inFlight.Store(2) // 2/4
	b.srv.inFlight.Store(1) // 1/2: equal ratio, equal weight: round-robin
	h := &Handler{}
	seen := map[string]int{}
	for i := 0; i < 10; i++ {
		seen[pickLeastConn(h, []*backend{a, b}, "").cfg.Name]++
	}
	assert.Equal(t, 5, seen["a"])
	assert.Equal(t, 5, seen["b"])

	a.srv.inFlight.Store(1) // 1/4 beats 1/2
	assert.Equal(t, "a", pickLeastConn(h, []*backend{a, b}, "").cfg.Name)

	heavy := testBackend("heavy", func(c *Backend) { c.Weight = 3; c.MaxParallel = 2 })
	heavy.srv.inFlight.Store(1) // 1/2, ties with b but weighs more
	for i := 0; i < 4; i++ {
		assert.Equal(t, "heavy", pickLeastConn(h, []*backend{b, heavy}, "").cfg.Name)
	}
}

func TestWeightedPolicies(t *testing.T) {
	a := testBackend("a", func(c *Backend) { c.Weight = 3 })
	b := testBackend("b", nil)
	h := &Handler{}
	rr := map[string]int{}
	for i := 0; i < 400; i++ {
		rr[pickRoundRobin(h, []*backend{a, b}, "").cfg.Name]++
	}
	assert.Equal(t, map[string]int{"a": 300, "b": 100}, rr)

	rnd := map[string]int{}
	for i := 0; i < 4000; i++ {
		rnd[pickRandom(h, []*backend{a, b}, "").cfg.Name]++
	}
	assert.InDelta(t, 3000, rnd["a"], 200)
	assert.InDelta(t, 1000, rnd["b"], 200)

	for i := 0; i < 5; i++ {
		assert.Equal(t, "b", pickFirst(h, []*backend{b, a}, "").cfg.Name)
	}
}

func TestLeastConnAvoidsFailingBackends(t *testing.T) {
	fast := testBackend("fast-failer", nil)
	ok := testBackend("ok", nil)
	ok.srv.inFlight.Store(5) // busier, but answering
	fast.srv.failStreak.Store(2)
	h := &Handler{}
	for i := 0; i < 5; i++ {
		assert.Equal(t, "ok", pickLeastConn(h, []*backend{fast, ok}, "").cfg.Name)
	}
	fast.srv.failStreak.Store(0)
	assert.Equal(t, "fast-failer", pickLeastConn(h, []*backend{fast, ok}, "").cfg.Name, "recovered: the least loaded again")
}
