package ollamaflow

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// fakeCounters stand in for a tenant's counters: what the instance
// consumed and has not yet handed over, and what it was charged for
// others.
type fakeCounters struct {
	mu                 sync.Mutex
	pendingR, pendingT int64
	chargedR, chargedT int64
}

func (f *fakeCounters) consume(r, t int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pendingR += r
	f.pendingT += t
}

func (f *fakeCounters) charged() (int64, int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.chargedR, f.chargedT
}

func (f *fakeCounters) tenant(name string) syncedTenant {
	return syncedTenant{
		name: name,
		delta: func() (int64, int64) {
			f.mu.Lock()
			defer f.mu.Unlock()
			r, t := f.pendingR, f.pendingT
			f.pendingR, f.pendingT = 0, 0
			return r, t
		},
		charge: func(r, t int64, _ time.Time) {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.chargedR += r
			f.chargedT += t
		},
	}
}

// syncPair is two instances of frontend "llm" sharing a file-system
// storage, on one fake clock, each with a tenant "team".
func syncPair(t *testing.T) (a, b *tenantSync, ca, cb *fakeCounters, storage certmagic.Storage, clk *fakeClock) {
	storage = &certmagic.FileStorage{Path: t.TempDir()}
	clk = newFakeClock()
	ca, cb = &fakeCounters{}, &fakeCounters{}
	a = newTenantSync("llm", "instance-a", clk)
	a.settings.Store(&syncSettings{storage: storage, interval: time.Second, tenants: []syncedTenant{ca.tenant("team")}, logger: zap.NewNop()})
	b = newTenantSync("llm", "instance-b", clk)
	b.settings.Store(&syncSettings{storage: storage, interval: time.Second, tenants: []syncedTenant{cb.tenant("team")}, logger: zap.NewNop()})
	return
}

func TestTenantSyncChargesWhatOthersConsumedOnce(t *testing.T) {
	a, b, ca, cb, _, clk := syncPair(t)
	ctx := context.Background()

	ca.consume(5, 100)
	require.NoError(t, a.sync(ctx))
	require.NoError(t, b.sync(ctx))
	r, k := cb.charged()
	assert.Equal(t, [2]int64{5, 100}, [2]int64{r, k}, "b charged what a consumed")

	// Reading again, or a writing again with nothing new, charges nothing.
	require.NoError(t, b.sync(ctx))
	clk.advance(time.Second)
	require.NoError(t, a.sync(ctx))
	require.NoError(t, b.sync(ctx))
	r, k = cb.charged()
	assert.Equal(t, [2]int64{5, 100}, [2]int64{r, k})

	// Growth since the last read is charged, however many writes it took.
	ca.consume(2, 10)
	clk.advance(time.Second)
	require.NoError(t, a.sync(ctx))
	ca.consume(1, 1)
	clk.advance(time.Second)
	require.NoError(t, a.sync(ctx))
	require.NoError(t, b.sync(ctx))
	r, k = cb.charged()
	assert.Equal(t, [2]int64{8, 111}, [2]int64{r, k})

	// The other way round, and an instance is never charged its own.
	cb.consume(4, 0)
	require.NoError(t, b.sync(ctx))
	require.NoError(t, a.sync(ctx))
	r, k = ca.charged()
	assert.Equal(t, [2]int64{4, 0}, [2]int64{r, k})
	r, k = cb.charged()
	assert.Equal(t, [2]int64{8, 111}, [2]int64{r, k})
}

func TestTenantSyncFirstSightAndInstancesGone(t *testing.T) {
	a, b, ca, cb, storage, clk := syncPair(t)
	ctx := context.Background()

	// a consumed a lot long ago and a little lately; b, just started,
	// is charged only a's last minute: the rest has refilled.
	ca.consume(50, 5000)
	require.NoError(t, a.sync(ctx))
	clk.advance(50 * time.Second)
	ca.consume(3, 30)
	require.NoError(t, a.sync(ctx))
	clk.advance(20 * time.Second)
	require.NoError(t, a.sync(ctx))
	require.NoError(t, b.sync(ctx))
	r, k := cb.charged()
	assert.Equal(t, [2]int64{3, 30}, [2]int64{r, k})

	// a stops writing: a minute later it is gone, nothing more is charged.
	clk.advance(61 * time.Second)
	require.NoError(t, b.sync(ctx))
	b.mu.Lock()
	assert.NotContains(t, b.seen, "instance-a")
	b.mu.Unlock()
	r, _ = cb.charged()
	assert.EqualValues(t, 3, r)

	// After a day its record is deleted.
	clk.advance(syncForget)
	require.NoError(t, b.sync(ctx))
	assert.False(t, storage.Exists(ctx, a.ownKey()), "a's record was left behind")
	assert.True(t, storage.Exists(ctx, b.ownKey()))
}

func TestTenantSyncRecordHoldsOnlyNamesAndCounts(t *testing.T) {
	a, _, ca, _, storage, _ := syncPair(t)
	ctx := context.Background()
	ca.consume(2, 20)
	require.NoError(t, a.sync(ctx))
	assert.Equal(t, "ollamaflow/tenants/llm/instance-a.json", a.ownKey())
	raw, err := storage.Load(ctx, a.ownKey())
	require.NoError(t, err)
	var rec map[string]any
	require.NoError(t, json.Unmarshal(raw, &rec))
	assert.ElementsMatch(t, []string{"instance", "updated", "tenants"}, keysOf(rec))
	assert.Equal(t, map[string]any{"team": map[string]any{"requests": 2.0, "tokens": 20.0, "recent_requests": 2.0, "recent_tokens": 20.0}}, rec["tenants"])

	// A record that does not decode is skipped, not fatal.
	require.NoError(t, storage.Store(ctx, "ollamaflow/tenants/llm/garbage.json", []byte("{not json")))
	_, b, _, cb, _, _ := syncPair(t)
	b.settings.Load().storage = storage
	require.NoError(t, b.sync(ctx))
	r, _ := cb.charged()
	assert.EqualValues(t, 2, r)
}

func keysOf(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestTenantSyncKeyPart(t *testing.T) {
	assert.Equal(t, "llm", syncKeyPart("llm"))
	for _, bad := range []string{"..", ".", "a/b", "", "ä"} {
		part := syncKeyPart(bad)
		assert.Regexp(t, `^x[0-9a-f]{16}$`, part, bad)
	}
}

func TestTenantSyncPooledRunsAndStops(t *testing.T) {
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	c := &fakeCounters{}
	c.consume(1, 0)
	st := &syncSettings{storage: storage, interval: time.Hour, tenants: []syncedTenant{c.tenant("team")}, logger: zap.NewNop()}
	s := acquireTenantSync("pool-test", st)
	// It syncs at once: the record appears without waiting an interval.
	require.Eventually(t, func() bool { return storage.Exists(context.Background(), s.ownKey()) }, 10*time.Second, 5*time.Millisecond)
	again := acquireTenantSync("pool-test", st)
	assert.Same(t, s, again, "one sync per frontend name")
	releaseTenantSync("pool-test")
	select {
	case <-s.done:
		t.Fatal("stopped while a user remained")
	default:
	}
	releaseTenantSync("pool-test")
	<-s.done // the goroutine ended with its last user
}

func TestDistributedOption(t *testing.T) {
	var h Handler
	require.NoError(t, h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n\ttenants {\n\t\tdistributed 2s\n\t\ttenant a {\n\t\t\tkey k\n\t\t}\n\t}\n\tbackend a localhost\n}")))
	require.NotNil(t, h.Tenants.Distributed)
	assert.Equal(t, caddy.Duration(2*time.Second), h.Tenants.Distributed.Interval)

	h = Handler{}
	require.NoError(t, h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n\ttenants {\n\t\tdistributed\n\t\ttenant a {\n\t\t\tkey k\n\t\t}\n\t}\n\tbackend a localhost\n}")))
	require.NotNil(t, h.Tenants.Distributed, "on, with the default interval")
	require.NoError(t, h.Tenants.Distributed.provision())
	assert.Equal(t, caddy.Duration(defaultSyncInterval), h.Tenants.Distributed.Interval)

	for in, want := range map[string]string{
		"distributed soon":         "distributed: invalid interval 'soon'",
		"distributed 10ms":         "distributed: interval must be at least 100ms, got 10ms",
		"distributed 1s 2s":        "distributed: want at most one argument",
		"distributed\ndistributed": "duplicate tenants option 'distributed'",
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n\ttenants {\n" + in + "\n\t\ttenant a {\n\t\t\tkey k\n\t\t}\n\t}\n\tbackend a localhost\n}"))
		if assert.Error(t, err, in) {
			assert.Contains(t, err.Error(), want)
		}
	}
	_, err := provisionJSON(t, `{"tenants":{"distributed":{"interval":"1ms"},"list":[{"name":"x","keys":["k"]}]},"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]}`)
	assert.ErrorContains(t, err, "distributed: interval must be at least 100ms")
}

func TestDistributedProvisionSharesTheTenantsCounters(t *testing.T) {
	// Outside a loaded config the sync uses Caddy's default storage: a
	// directory of the test's, not the user's data directory.
	dir := t.TempDir()
	saved := caddy.DefaultStorage
	caddy.DefaultStorage = &certmagic.FileStorage{Path: dir}
	t.Cleanup(func() { caddy.DefaultStorage = saved })

	h, err := provisionJSON(t, `{"name":"dist-provision","tenants":{"distributed":{"interval":"1h"},"list":[{"name":"team","keys":["k"],"requests_per_minute":10}]},"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]}`)
	require.NoError(t, err)
	require.NotNil(t, h.tenantSync)
	st := h.tenantSync.settings.Load()
	require.Len(t, st.tenants, 1)
	assert.Equal(t, time.Hour, st.interval)
	storage := &certmagic.FileStorage{Path: dir}
	require.Eventually(t, func() bool { return storage.Exists(context.Background(), h.tenantSync.ownKey()) }, 10*time.Second, 5*time.Millisecond,
		"the sync runs at once, into the config's storage")

	// The closures reach the tenant's pooled counters: what it admitted is
	// its delta, and a charge from elsewhere uses up its bucket.
	team := h.Tenants.List[0]
	now := time.Now()
	reason, _ := team.state.admit(team, now)
	require.Empty(t, reason)
	team.state.finish(team, true, 200, "m", 3, 4, now)
	h.tenantSync.mu.Lock() // no sync of the goroutine's in between
	r, k := st.tenants[0].delta()
	h.tenantSync.mu.Unlock()
	assert.EqualValues(t, 1, r)
	assert.EqualValues(t, 7, k)
	st.tenants[0].charge(9, 0, now)
	reason, _ = team.state.admit(team, now)
	assert.Equal(t, rejectRequests, reason, "1 here and 9 elsewhere of 10")

	// Its last user gone, the sync stops.
	s := h.tenantSync
	require.NoError(t, h.Cleanup())
	<-s.done
}

// TestDistributedLimitHoldsAcrossTwoInstances: one tenant limited to 60
// requests a minute, two instances (each with its own counters, as two
// processes have) sharing a file-system storage, syncing every second on
// a fake clock, each offered 5 requests a second for three minutes. Shared,
// they admit about what one instance alone would (the 60 of the full
// bucket, then 60 a minute); apart, twice that.
func TestDistributedLimitHoldsAcrossTwoInstances(t *testing.T) {
	const rpm, minutes = 60, 3
	run := func(shared bool) (perMinute [minutes]int) {
		storage := &certmagic.FileStorage{Path: t.TempDir()}
		clk := newFakeClock()
		type instance struct {
			tenant *Tenant
			state  *tenantState
			sync   *tenantSync
		}
		var insts []instance
		for _, id := range []string{"one", "two"} {
			in := instance{tenant: &Tenant{Name: "team", RequestsPerMinute: rpm}, state: &tenantState{}}
			in.sync = newTenantSync("llm", id, clk)
			ten, state := in.tenant, in.state
			in.sync.settings.Store(&syncSettings{storage: storage, interval: time.Second, logger: zap.NewNop(), tenants: []syncedTenant{{
				name: "team", delta: state.localDelta,
				charge: func(r, k int64, now time.Time) { state.addRemote(ten, r, k, now) },
			}}})
			insts = append(insts, in)
		}
		start := clk.Now()
		for step := 0; step < minutes*60*5; step++ { // 200 ms steps
			now := clk.Now()
			for _, in := range insts {
				if reason, _ := in.state.admit(in.tenant, now); reason == "" {
					in.state.finish(in.tenant, true, 200, "", 0, 0, now)
					perMinute[int(now.Sub(start)/time.Minute)]++
				}
			}
			if shared && step%5 == 4 {
				for _, in := range insts {
					require.NoError(t, in.sync.sync(context.Background()))
				}
			}
			clk.advance(200 * time.Millisecond)
		}
		return perMinute
	}
	shared, apart := run(true), run(false)
	t.Logf("limit %d/min on two instances, admitted per minute: shared %v, apart %v", rpm, shared, apart)
	// One instance alone: 60 + 60 in the first minute (full bucket, then
	// its refill), 60 a minute after. Shared, the two may overshoot by
	// what they admit before they see each other: at most two sync
	// intervals' refill (2 × 1 s × 1/s) each.
	assert.InDelta(t, 2*rpm, shared[0], 6, "first minute")
	for m := 1; m < minutes; m++ {
		assert.InDelta(t, rpm, shared[m], 6, "minute %d", m+1)
		assert.InDelta(t, 2*rpm, apart[m], 2, "apart, each instance grants its own %d", rpm)
	}
}
