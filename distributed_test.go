package ollamaflow

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

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
	s, err := acquireTenantSync("pool-test", st)
	require.NoError(t, err)
	// It syncs at once: the record appears without waiting an interval.
	require.Eventually(t, func() bool { return storage.Exists(context.Background(), s.ownKey()) }, 10*time.Second, 5*time.Millisecond)
	again, err := acquireTenantSync("pool-test", st)
	require.NoError(t, err)
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
