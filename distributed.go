package ollamaflow

// Distributed tenant counters (issue 12, `distributed [interval]` in a
// tenants block): Caddy instances that share a storage (Caddy's configured
// storage: the file system, or a Redis, Consul or Postgres storage module)
// share each tenant's consumption, so N instances enforce one limit per
// tenant instead of N.
//
// Like caddy-ratelimit's distributed mode, each instance writes a record of
// its own under a key of its own and reads the others', on an interval;
// nothing is locked and nothing is exact, it is eventually consistent. What
// is shared differs: the tenant limits are token buckets (tenantusage.go),
// so an instance publishes what it consumed, as running totals since it
// started (plus what it consumed in the last minute), and each reader
// charges its own buckets with the growth of every other instance's totals
// since it last read them. Totals, not deltas, make a read idempotent: an
// instance that reads twice, or misses a write, charges each request once.
// An instance seen for the first time is charged its last minute only (its
// older consumption has refilled); a record not rewritten for a minute is
// an instance gone, ignored, and deleted after a day.
//
// Usage on one instance reaches the others within two intervals (one until
// it is written, one until it is read), so across instances a tenant can
// exceed its limit by at most what it consumes in that time.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// defaultSyncInterval is how often counters are shared when distributed
// names no interval.
const defaultSyncInterval = 5 * time.Second

// syncWindow is the period the tenant limits count over: consumption
// older than that has refilled, and an instance silent for that long is
// gone.
const syncWindow = time.Minute

// syncForget is how old a record of an instance gone must be before a
// reader deletes it from the storage.
const syncForget = 24 * time.Hour

// processInstance identifies this process in the storage: random, so two
// processes never share a record (caddy's instance.uuid lives in the data
// directory, which two processes on one machine may share).
var processInstance = sync.OnceValue(func() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
})

// DistributedCounters shares a frontend's tenant counters through Caddy's
// storage.
type DistributedCounters struct {
	// Interval is how often this instance writes its consumption to the
	// storage and reads the other instances'. Shorter is more exact and
	// costs more storage I/O. Default: 5s; at least 100ms.
	Interval caddy.Duration `json:"interval,omitempty"`
}

// minSyncInterval keeps a misconfigured interval from hammering a remote
// storage.
const minSyncInterval = 100 * time.Millisecond

// provision applies the default interval and checks it; nil is off.
func (dc *DistributedCounters) provision() error {
	if dc == nil {
		return nil
	}
	if dc.Interval == 0 {
		dc.Interval = caddy.Duration(defaultSyncInterval)
	}
	if time.Duration(dc.Interval) < minSyncInterval {
		return fmt.Errorf("distributed: interval must be at least %s, got %s", minSyncInterval, time.Duration(dc.Interval))
	}
	return nil
}

// parseDistributed parses "distributed [<interval>]".
func parseDistributed(d *caddyfile.Dispenser) (*DistributedCounters, error) {
	dc := new(DistributedCounters)
	if !d.NextArg() {
		return dc, nil
	}
	iv, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return nil, d.Errf("distributed: invalid interval '%s'", d.Val())
	}
	if iv < minSyncInterval {
		return nil, d.Errf("distributed: interval must be at least %s, got %s", minSyncInterval, iv)
	}
	dc.Interval = caddy.Duration(iv)
	if d.NextArg() {
		return nil, d.Errf("distributed: want at most one argument (the interval)")
	}
	return dc, nil
}

// acquireTenantSync joins the frontend's counter sync when its tenants are
// distributed. The sync keeps the settings of the config that runs until
// this one has started (adoptSettings).
func (h *Handler) acquireTenantSync(ctx caddy.Context) {
	if h.Tenants == nil || h.Tenants.Distributed == nil {
		return
	}
	st := &syncSettings{
		storage:  contextStorage(ctx),
		interval: time.Duration(h.Tenants.Distributed.Interval),
		logger:   h.logger.Named("tenants"),
	}
	for _, t := range h.Tenants.List {
		st.tenants = append(st.tenants, syncedTenant{
			name:  t.Name,
			delta: t.state.localDelta,
			charge: func(requests, tokens int64, now time.Time) {
				t.state.addRemote(t, requests, tokens, now)
			},
		})
	}
	h.syncStaged = st
	h.tenantSync = acquireTenantSync(h.Name, st)
}

// contextStorage is the storage of ctx's config, Caddy's default (the
// file system under its data directory) for a context outside a config.
func contextStorage(ctx caddy.Context) (st certmagic.Storage) {
	defer func() {
		if recover() != nil { // no config behind ctx
			st = nil
		}
		if st == nil {
			st = caddy.DefaultStorage
		}
	}()
	return ctx.Storage()
}

func (h *Handler) releaseTenantSync() {
	if h.tenantSync != nil {
		releaseTenantSync(h.Name)
		h.tenantSync = nil
	}
}

// syncedTenant is what the sync needs of one tenant's counters: what this
// instance consumed since the last call, and a way to charge what others
// consumed.
type syncedTenant struct {
	name   string
	delta  func() (requests, tokens int64)
	charge func(requests, tokens int64, now time.Time)
}

// syncRecord is one instance's record in the storage.
type syncRecord struct {
	Instance string                `json:"instance"`
	Updated  time.Time             `json:"updated"`
	Tenants  map[string]syncCounts `json:"tenants"`
}

// syncCounts are one tenant's consumption on one instance: totals since it
// started, and the part of them in the last minute.
type syncCounts struct {
	Requests       int64 `json:"requests"`
	Tokens         int64 `json:"tokens"`
	RecentRequests int64 `json:"recent_requests,omitempty"`
	RecentTokens   int64 `json:"recent_tokens,omitempty"`
}

// stamped is what was consumed between two syncs, for the last minute's sum.
type stamped struct {
	at               time.Time
	requests, tokens int64
}

// syncSettings are what the newest config asks of a frontend's sync.
type syncSettings struct {
	storage  certmagic.Storage
	interval time.Duration
	tenants  []syncedTenant
	logger   *zap.Logger
}

// tenantSync shares one frontend's tenant counters through the storage.
// Pooled by frontend name, so a reload keeps its totals and what it has
// seen of the others; it adopts the newest config's settings.
type tenantSync struct {
	prefix   string // the frontend's folder in the storage
	instance string
	clk      clock
	settings atomic.Pointer[syncSettings]

	mu     sync.Mutex // one sync at a time; guards the fields below
	totals map[string]syncCounts
	recent map[string][]stamped
	seen   map[string]syncRecord // the last record read of each other instance

	cancel context.CancelFunc
	done   chan struct{}
}

var tenantSyncs = caddy.NewUsagePool()

// syncKeyPart makes a frontend name safe as one segment of a storage key.
func syncKeyPart(name string) string {
	if validName(name) && name != "." && name != ".." {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return "x" + hex.EncodeToString(sum[:8])
}

func newTenantSync(frontend, instance string, clk clock) *tenantSync {
	return &tenantSync{
		prefix:   path.Join("ollamaflow", "tenants", syncKeyPart(frontend)),
		instance: instance,
		clk:      clk,
		totals:   make(map[string]syncCounts),
		recent:   make(map[string][]stamped),
		seen:     make(map[string]syncRecord),
	}
}

// acquireTenantSync returns the frontend's running sync, starting it with
// st if it is the first user; the caller adopts st once its config runs.
func acquireTenantSync(frontend string, st *syncSettings) *tenantSync {
	v, _, _ := tenantSyncs.LoadOrNew(frontend, func() (caddy.Destructor, error) {
		s := newTenantSync(frontend, processInstance(), realClock{})
		s.settings.Store(st)
		s.start()
		return s, nil
	})
	return v.(*tenantSync)
}

func releaseTenantSync(frontend string) {
	_, _ = tenantSyncs.Delete(frontend)
}

func (s *tenantSync) ownKey() string { return path.Join(s.prefix, s.instance+".json") }

// start runs the sync at once (a restarted instance learns the others'
// last minute before it admits much) and then every interval, until
// Destruct.
func (s *tenantSync) start() {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		for {
			s.syncSafely(ctx)
			timer := time.NewTimer(s.settings.Load().interval)
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-timer.C:
			}
		}
	}()
}

func (s *tenantSync) syncSafely(ctx context.Context) {
	defer func() {
		if rec := recover(); rec != nil {
			s.settings.Load().logger.Error("panic in tenant counter sync", zap.Any("panic", rec), zap.Stack("stack"))
		}
	}()
	if err := s.sync(ctx); err != nil && ctx.Err() == nil {
		s.settings.Load().logger.Warn("sharing tenant counters through the storage", zap.Error(err))
	}
}

// Destruct stops the sync; its record stays until it is a day old.
func (s *tenantSync) Destruct() error {
	if s.cancel != nil {
		s.cancel()
		<-s.done
	}
	return nil
}

// sync publishes this instance's consumption and charges the others'.
func (s *tenantSync) sync(ctx context.Context) error {
	st := s.settings.Load()
	now := s.clk.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.collectLocked(st, now)
	rec := syncRecord{Instance: s.instance, Updated: now, Tenants: make(map[string]syncCounts, len(s.totals))}
	for name, c := range s.totals {
		for _, d := range s.recent[name] {
			c.RecentRequests += d.requests
			c.RecentTokens += d.tokens
		}
		rec.Tenants[name] = c
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := st.storage.Store(ctx, s.ownKey(), data); err != nil {
		return err
	}
	keys, err := st.storage.List(ctx, s.prefix, false)
	if err != nil {
		return err
	}
	byName := make(map[string]*syncedTenant, len(st.tenants))
	for i := range st.tenants {
		byName[st.tenants[i].name] = &st.tenants[i]
	}
	listed := make(map[string]bool, len(keys))
	for _, key := range keys {
		if key == s.ownKey() || path.Ext(key) != ".json" {
			continue
		}
		other, ok := s.load(ctx, st, key)
		if !ok || other.Instance == s.instance {
			continue
		}
		listed[other.Instance] = true
		age := now.Sub(other.Updated)
		if age > syncWindow {
			delete(s.seen, other.Instance) // gone: its consumption has refilled
			if age > syncForget {
				_ = st.storage.Delete(ctx, key)
			}
			continue
		}
		s.chargeLocked(byName, other, now)
	}
	for inst := range s.seen {
		if !listed[inst] {
			delete(s.seen, inst)
		}
	}
	return nil
}

func (s *tenantSync) load(ctx context.Context, st *syncSettings, key string) (syncRecord, bool) {
	var rec syncRecord
	data, err := st.storage.Load(ctx, key)
	if err != nil {
		return rec, false // deleted meanwhile, or unreadable: next time
	}
	if err := json.Unmarshal(data, &rec); err != nil || rec.Instance == "" {
		st.logger.Debug("ignoring a tenant counter record that does not decode", zap.String("key", key))
		return rec, false
	}
	return rec, true
}

// collectLocked adds what this instance consumed since the last sync to
// its totals and drops the last minute's entries that are older.
func (s *tenantSync) collectLocked(st *syncSettings, now time.Time) {
	for _, t := range st.tenants {
		r, k := t.delta()
		if r == 0 && k == 0 {
			continue
		}
		c := s.totals[t.name]
		c.Requests += r
		c.Tokens += k
		s.totals[t.name] = c
		s.recent[t.name] = append(s.recent[t.name], stamped{at: now, requests: r, tokens: k})
	}
	cutoff := now.Add(-syncWindow)
	for name, list := range s.recent {
		i := 0
		for i < len(list) && !list[i].at.After(cutoff) {
			i++
		}
		if i == len(list) {
			delete(s.recent, name)
		} else if i > 0 {
			s.recent[name] = append(list[:0], list[i:]...)
		}
	}
}

// chargeLocked charges this instance's tenants with what other consumed
// since its record was last read.
func (s *tenantSync) chargeLocked(byName map[string]*syncedTenant, other syncRecord, now time.Time) {
	prev, known := s.seen[other.Instance]
	if known && !other.Updated.After(prev.Updated) {
		return // nothing new
	}
	s.seen[other.Instance] = other
	for name, c := range other.Tenants {
		t := byName[name]
		if t == nil {
			continue // a tenant this config does not have
		}
		var r, k int64
		p, had := prev.Tenants[name]
		switch {
		case !known:
			r, k = c.RecentRequests, c.RecentTokens // first sight: its last minute
		case !had:
			r, k = c.Requests, c.Tokens // new since the last read
		case c.Requests >= p.Requests && c.Tokens >= p.Tokens:
			r, k = c.Requests-p.Requests, c.Tokens-p.Tokens
		default:
			r, k = c.RecentRequests, c.RecentTokens // totals went back: not the same run
		}
		if r > 0 || k > 0 {
			t.charge(r, k, now)
		}
	}
}
