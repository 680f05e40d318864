package ollamaflow

// Conversation affinity: the next turn of a conversation goes back to the
// server that answered the previous one, where Ollama still holds the
// conversation's prompt in a cache slot and evaluates only the new
// messages, with no session header from the client.
//
// A completion's conversation is read from its body the way Ollama decodes
// it and hashed at boundaries: on /api/chat and /v1/chat/completions after
// each message (the model, and the tools, are hashed first), on
// /api/generate and /v1/completions every affinityContextChunk tokens of
// context and every affinityPromptChunk bytes of the system prompt and
// prompt. The hash of a prefix is the same whatever the spelling: keys
// match as encoding/json matches them, escapes are decoded, the last
// duplicate wins, and values that are not strings are compared in
// canonical JSON. After a backend is chosen, the hash of the whole request
// is recorded for that server, with those of the boundaries a longer
// request would share: the message before the last (an edited question),
// the last full chunk of context and of prompt. A later request looks its
// boundaries up, longest first: turn N+1 holds turn N's messages, the
// answer and a new question, so the hash of turn N's messages is one of
// its prefixes. On /api/generate a follow-up's context holds the previous
// context, so from the third turn on its chunks match.
//
// The table is bounded (affinityMaxEntries, least recently recorded out
// first, entries older than affinityTTL ignored) and pooled by frontend
// name, so a reload keeps it. A wrong or stale entry costs a cache miss,
// never correctness: affinity only says which server to prefer.

import (
	"container/list"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	// affinityMaxEntries bounds each frontend's table: up to three entries
	// per request, about 100 bytes each, and as many conversations.
	affinityMaxEntries = 16384
	// affinityTTL is how long a recorded conversation is remembered;
	// Ollama unloads an idle model (its cache with it) after 5 minutes by
	// default (keep_alive).
	affinityTTL = 15 * time.Minute
	// A conversation's server keeps its next turn while its expected delay
	// less what its cache saves is no worse than the best candidate's
	// within a tie: affinityTie of the best plus affinityTieMargin seconds
	// (noise in the learned speeds, as least_delay's near ties).
	affinityTie       = 0.02
	affinityTieMargin = 0.005
	// A new conversation is spread over the servers where it would start
	// at once and whose expected delay is at most spreadFactor × the best
	// candidate's plus spreadMargin seconds (and those tied with the best:
	// see nearBest), to the one holding the fewest recent conversations. The
	// band covers servers of one class whose learned speeds differ by
	// noise (a rack of equal GPUs), so conversations do not all start on
	// the one measured marginally fastest and evict each other from its
	// cache slots; a server of a slower class (twice as slow, or issue
	// 7's four times) is not in it, so single-turn traffic, the bulk of
	// most, pays at most a quarter more for the spreading (1.5 × cost
	// speed-classes 36.5 against 45.2 req/s; a tie alone put both
	// conversations of the e2e suite on one of three equal servers).
	spreadFactor = 1.25
	spreadMargin = 0.025
	// activeWindow is how long a conversation counts as held by the server
	// of its last turn, for spreading new ones: Ollama unloads an idle
	// model, and its cache, after 5 minutes by default.
	activeWindow = 5 * time.Minute
	// recentHalfLife weighs the conversations a server holds by how
	// recently their last turn went there.
	recentHalfLife = time.Minute
	// Boundaries of /api/generate and /v1/completions: context tokens and
	// prompt bytes between two of them.
	affinityContextChunk = 64
	affinityPromptChunk  = 256
	// affinityMaxProbes bounds the lookups of one request, longest prefix
	// first.
	affinityMaxProbes = 64
)

// Values of the X-OllamaFlow-Route response header: why the first attempt
// went where it went.
const (
	routeStickyHit        = "sticky-hit"        // the session's server (sticky)
	routeStickyOverflow   = "sticky-overflow"   // the session's server was busy: the policy chose
	routeAffinityHit      = "affinity-hit"      // the conversation's server
	routeAffinityOverflow = "affinity-overflow" // the conversation's server was busy or much slower: the policy chose
	routeAffinityEvicted  = "affinity-evicted"  // the conversation's cache was evicted there: placed as a new one
	routePolicy           = "policy"            // nothing known about the request: the policy chose
)

// affinityTable maps conversation prefixes to the server (its key) that
// last served them and to the conversation they belong to: at most max
// entries, each valid for ttl. It also knows how many conversations each
// server holds: those whose last turn went there within activeWindow.
type affinityTable struct {
	mu      sync.RWMutex
	max     int
	ttl     time.Duration
	entries map[uint64]*list.Element
	lru     list.List // of *affinityEntry, most recently recorded first

	convs   map[uint64]*list.Element
	active  list.List // of *convActivity, most recent turn first
	hosting map[string]*hosted

	counters atomic.Pointer[affinityCounters]
	// follow is followShare's average, as float64 bits; turns counts the
	// completions it has seen.
	follow atomic.Uint64
	turns  atomic.Int64
}

// followWeight is the weight of one completion in followShare's moving
// average: a completion 64 back weighs about a third of the latest.
const followWeight = 1.0 / 64

// noteTurn counts a completion with conversation affinity in
// followShare: followUp when it carries an earlier turn.
func (t *affinityTable) noteTurn(followUp bool) {
	x := 0.0
	if followUp {
		x = 1
	}
	t.turns.Add(1)
	for {
		old := t.follow.Load()
		r := math.Float64frombits(old)
		if t.follow.CompareAndSwap(old, math.Float64bits(r+(x-r)*followWeight)) {
			return
		}
	}
}

// followShare is the share of recent completions that carried an earlier
// turn (a moving average): 0 for single-turn traffic, 0.8 for
// conversations of five turns.
func (t *affinityTable) followShare() float64 {
	return math.Float64frombits(t.follow.Load())
}

// singleTurn reports whether the traffic is known to be single-turn: the
// share of follow-ups is below followMin over at least the average's window
// of completions (a fresh pool's first conversations are all first turns).
func (t *affinityTable) singleTurn() bool {
	return t.turns.Load() >= int64(1/followWeight) && t.followShare() < followMin
}

// affinityCounters are ollamaflow_affinity_total's counters of one
// frontend, looked up once: a label lookup per request allocates.
type affinityCounters struct {
	frontend                     string
	hit, miss, overflow, evicted prometheus.Counter
}

// counter is the frontend's ollamaflow_affinity_total for outcome.
func (t *affinityTable) counter(frontend, outcome string) prometheus.Counter {
	c := t.counters.Load()
	if c == nil || c.frontend != frontend {
		c = &affinityCounters{frontend: frontend,
			hit:      metrics.affinity.WithLabelValues(frontend, "hit"),
			miss:     metrics.affinity.WithLabelValues(frontend, "miss"),
			overflow: metrics.affinity.WithLabelValues(frontend, "overflow"),
			evicted:  metrics.affinity.WithLabelValues(frontend, "evicted")}
		t.counters.Store(c)
	}
	switch outcome {
	case "hit":
		return c.hit
	case "miss":
		return c.miss
	case "evicted":
		return c.evicted
	}
	return c.overflow
}

// hosted is what a server holds: conversations whose last turn went there
// within activeWindow, most recent turn first, and their weight, each
// one's halving every recentHalfLife since its last turn (the
// conversations most likely to send their next turn soon weigh most).
//
// Their order is what Ollama's cache still holds: a server keeps one
// conversation per parallel slot (OLLAMA_NUM_PARALLEL, 1 by default), and
// a turn whose conversation is not in a slot takes a slot from another.
// So a conversation is cached there while fewer other conversations than
// the server has slots were sent there since its last turn (exact when
// Ollama evicts the least recently used slot, as with
// OLLAMA_MULTIUSER_CACHE; by default it takes the free slot sharing the
// longest prefix, which evicts no more often).
type hosted struct {
	recent list.List // of *convActivity, most recent turn first
	w      float64   // the weight as of when
	when   time.Time
}

func (h *hosted) weight(now time.Time) float64 {
	return h.w * decay(now.Sub(h.when))
}

func decay(age time.Duration) float64 {
	return math.Exp2(-age.Seconds() / recentHalfLife.Seconds())
}

type affinityEntry struct {
	key    uint64
	server string
	conv   uint64 // the conversation's id: the hash of its first request
}

// convActivity is where a conversation's last turn went, and when, with
// its place in that server's hosted.recent and the prompt it sent (what
// its next turn re-evaluates if its cache is evicted).
type convActivity struct {
	id     uint64
	server string
	at     time.Time
	hostEl *list.Element
	size   prefixSize
	// found is whether its last turn found its cache there (turnFound,
	// turnMissed; cacheodds.go), written when that turn's answer ends.
	found atomic.Int32
	// answered is when its last turn's answer ended (unix nanoseconds, 0
	// before), and pause the longest its client took from an answer to
	// the next turn, pauseSeen once one was seen (abandoned).
	answered  atomic.Int64
	pause     time.Duration
	pauseSeen bool
}

// prefixEntry is affinityEntry with its time.
type prefixEntry = struct {
	affinityEntry
	at time.Time
}

func newAffinityTable(maxEntries int, ttl time.Duration) *affinityTable {
	return &affinityTable{
		max: maxEntries, ttl: ttl,
		entries: make(map[uint64]*list.Element),
		convs:   make(map[uint64]*list.Element),
		hosting: make(map[string]*hosted),
	}
}

// lookup returns the server of the longest recorded prefix of c, probing
// at most affinityMaxProbes of them, the conversation it belongs to and
// its index in c.prefixes ("", 0, -1 when none is known).
func (t *affinityTable) lookup(c conversation, now time.Time) (server string, id uint64, depth int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := c.prefixes
	for i, probes := len(p)-1, 0; i >= 0 && probes < affinityMaxProbes; i, probes = i-1, probes+1 {
		el, ok := t.entries[p[i]]
		if !ok {
			continue
		}
		e := el.Value.(*prefixEntry)
		if now.Sub(e.at) > t.ttl {
			t.lru.Remove(el)
			delete(t.entries, e.key)
			continue
		}
		return e.server, e.conv, i
	}
	return "", 0, -1
}

// record notes that server serves c, a turn of conversation id (0: a new
// conversation, which takes the id of its first request): the whole
// request and the boundaries a longer one would share.
func (t *affinityTable) record(c conversation, server string, id uint64, now time.Time) *convActivity {
	if len(c.keep) == 0 {
		return nil
	}
	if id == 0 {
		id = c.keep[len(c.keep)-1] | 1 // never 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range c.keep {
		t.put(affinityEntry{key: k, server: server, conv: id}, now)
	}
	var size prefixSize
	if n := len(c.sizes); n > 0 {
		size = c.sizes[n-1]
	}
	return t.touch(id, server, size, now)
}

func (t *affinityTable) put(e affinityEntry, now time.Time) {
	if el, ok := t.entries[e.key]; ok {
		el.Value = &prefixEntry{e, now}
		t.lru.MoveToFront(el)
		return
	}
	for t.lru.Len() >= t.max {
		oldest := t.lru.Back()
		t.lru.Remove(oldest)
		delete(t.entries, oldest.Value.(*prefixEntry).key)
	}
	t.entries[e.key] = t.lru.PushFront(&prefixEntry{e, now})
}

// touch moves conversation id to server as of now, and forgets the
// conversations idle for longer than activeWindow (or beyond max).
func (t *affinityTable) touch(id uint64, server string, size prefixSize, now time.Time) *convActivity {
	var a *convActivity
	if el, ok := t.convs[id]; ok {
		a = el.Value.(*convActivity)
		t.unhost(a, now)
		if ans := a.answered.Load(); ans >= a.at.UnixNano() {
			a.pause, a.pauseSeen = max(a.pause, now.Sub(time.Unix(0, ans))), true
		}
		a.server, a.at, a.size = server, now, size
		t.active.MoveToFront(el)
	} else {
		a = &convActivity{id: id, server: server, at: now, size: size}
		t.convs[id] = t.active.PushFront(a)
	}
	h := t.hosting[server]
	if h == nil {
		h = &hosted{}
		t.hosting[server] = h
	}
	a.hostEl = h.recent.PushFront(a)
	h.w, h.when = h.weight(now)+1, now
	a.found.Store(turnUnknown) // until this turn's answer tells
	t.expire(now)
	return a
}

// stale reports whether expire has work to do.
func (t *affinityTable) stale(now time.Time) bool {
	el := t.active.Back()
	return el != nil && (now.Sub(el.Value.(*convActivity).at) > activeWindow || t.active.Len() > t.max)
}

func (t *affinityTable) expire(now time.Time) {
	for el := t.active.Back(); el != nil; el = t.active.Back() {
		a := el.Value.(*convActivity)
		if now.Sub(a.at) <= activeWindow && t.active.Len() <= t.max {
			return
		}
		t.active.Remove(el)
		delete(t.convs, a.id)
		t.unhost(a, now)
	}
}

// unhost takes conversation a off its server; a server with none leaves
// the map, which so holds only servers with conversations.
func (t *affinityTable) unhost(a *convActivity, now time.Time) {
	h := t.hosting[a.server]
	if h == nil || a.hostEl == nil {
		return
	}
	h.recent.Remove(a.hostEl)
	a.hostEl = nil
	if h.recent.Len() == 0 {
		delete(t.hosting, a.server)
		return
	}
	h.w, h.when = max(h.weight(now)-decay(now.Sub(a.at)), 0), now
}

// keepLeastHosting keeps, in place (list's array is reused), the backends
// where a new conversation evicts the least: those holding fewer
// conversations than they have slots (it evicts none), else those where
// the conversation it would evict has been idle longest (at least half as
// long as the longest: one idle for long has most likely ended, one whose
// user is reading the last answer has not); and of those the ones whose
// conversations weigh least (within a tenth of a fresh one). When every
// slot holds a conversation still going (none idle for abandonedAfter),
// the servers where a conversation already misses its cache come first
// (thrashing), and of those the ones holding the most live conversations
// over their slots (mostCrowded: the overflow gathers instead of
// spreading). It runs for every new conversation: a read lock, no
// allocation; the write lock only when conversations went idle since the
// last record.
func (t *affinityTable) keepLeastHosting(list []*backend, now time.Time) []*backend {
	t.mu.RLock()
	if t.stale(now) {
		t.mu.RUnlock()
		t.mu.Lock()
		t.expire(now)
		t.mu.Unlock()
		t.mu.RLock()
	}
	defer t.mu.RUnlock()
	weight := func(b *backend) float64 {
		if h := t.hosting[b.srv.key]; h != nil {
			return h.weight(now)
		}
		return 0
	}
	longest := 0.0
	for _, b := range list {
		longest = max(longest, t.victimIdle(b, now))
	}
	least := math.Inf(1)
	for _, b := range list {
		if t.victimIdle(b, now) >= longest/2 {
			least = min(least, weight(b))
		}
	}
	out := list[:0] // filtered in place: list's front is overwritten only by what is kept
	if longest < abandonedAfter.Seconds() {
		// Every slot holds a live conversation: the new one evicts a
		// cache that is to be used again wherever it goes.
		if out = t.mostCrowded(list, now); len(out) > 0 {
			return out
		}
	}
	for _, b := range list {
		if t.victimIdle(b, now) >= longest/2 && weight(b) < least+0.1 {
			out = append(out, b)
		}
	}
	return out
}

// thrashing reports whether a conversation that b hosts, not idle for
// abandonedAfter, missed its cache there on its last turn: b holds more
// live conversations than it has slots, and some of them take turns in
// one slot, each evicting the other (Ollama's default takes the lowest
// free slot, so the others keep theirs). A new conversation placed there
// evicts most likely one of those, whose cache was lost anyway; placed
// where every conversation finds its cache, it starts such a cycle there
// too. On a pool holding more conversations than slots, the conversations
// that miss are then those on the fewest servers: with two crowded
// servers where one would do, a hosted conversation on each missed every
// turn (random-266: 27–33% of turns found their cache, 34–35% this way;
// least_conn 37%). A server holding more live conversations than its
// known slots thrashes too, a miss seen or not (crowded), while the
// traffic is conversational (followShare at least followMin). Only the
// thrashWalk most recent are read: it runs for every new conversation on
// a crowded pool. t.mu is held.
func (t *affinityTable) thrashing(b *backend, now time.Time) bool {
	h := t.hosting[b.srv.key]
	if h == nil {
		return false
	}
	if t.followShare() >= followMin && t.crowded(b, now) {
		return true // single-turn traffic crowds no cache: each request is a conversation of one turn
	}
	i := 0
	for e := h.recent.Front(); e != nil && i < thrashWalk; e, i = e.Next(), i+1 {
		a := e.Value.(*convActivity)
		if now.Sub(a.at) > abandonedAfter {
			return false // most recent first: the rest idle longer
		}
		if a.found.Load() == turnMissed {
			return true
		}
	}
	return false
}

// thrashWalk bounds the conversations thrashing reads on one server.
const thrashWalk = 64

// victimIdle is how long, in seconds, the conversation a new one would
// evict on b has been idle: the least recent of the conversations its
// slots hold (see hosted); +Inf when it holds fewer than it has slots.
// t.mu is held.
func (t *affinityTable) victimIdle(b *backend, now time.Time) float64 {
	v := t.victim(b, now)
	if v == nil {
		return math.Inf(1)
	}
	return now.Sub(v.at).Seconds()
}

// victim is the conversation a new one would evict on b: the least recent
// of those its slots hold; nil when it holds fewer than it has slots (one
// more than seen in use while more are not ruled out, as least_delay
// plans them).
// t.mu is held.
func (t *affinityTable) victim(b *backend, now time.Time) *convActivity {
	h := t.hosting[b.srv.key]
	if h == nil {
		return nil
	}
	slots, bounded := b.cacheSlots()
	if !bounded {
		slots++ // a slot more is not ruled out: least_delay plans with it too
	}
	if h.recent.Len() < slots {
		return nil
	}
	e := h.recent.Front()
	for i := 1; i < slots; i++ {
		e = e.Next()
	}
	return e.Value.(*convActivity)
}

// missedLast reports whether conversation id's last turn missed its cache
// on the server it went to (cacheodds.go).
func (t *affinityTable) missedLast(id uint64) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	el, ok := t.convs[id]
	return ok && el.Value.(*convActivity).found.Load() == turnMissed
}

// evictedFrom reports whether conversation id's cache is known to be gone
// from b: its last turn went there and since then at least as many other
// conversations as b can have slots were sent there (see hosted). A
// conversation not followed any more (idle beyond activeWindow, or moved
// on), or a server whose slots are not bounded yet, is not known evicted.
func (t *affinityTable) evictedFrom(b *backend, id uint64, now time.Time) bool {
	slots, bounded := b.cacheSlots()
	if !bounded {
		return false
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	el, ok := t.convs[id]
	if !ok {
		return false
	}
	a := el.Value.(*convActivity)
	if a.server != b.srv.key || now.Sub(a.at) > activeWindow {
		return false
	}
	i := 0
	for e := t.hosting[a.server].recent.Front(); e != nil && i < slots; e, i = e.Next(), i+1 {
		if e.Value == a {
			return false
		}
	}
	return true
}

// cacheSlots is how many conversations the backend's server keeps cached
// (Ollama: one per parallel slot): max_parallel when set, else the most
// slots it can have (a request was seen waiting with that many in
// flight), else the slots seen in use at once (at least one). bounded
// says n is an upper bound: only then may more conversations than n since
// a turn be taken for its eviction; a count learned from a history that
// never filled the server is too low for that (a conversation would be
// moved away from its cache), but is the safe count for placing new
// conversations (Ollama's default is one slot, and a server believed
// fuller than it is only makes the spread wider).
func (b *backend) cacheSlots() (n int, bounded bool) {
	if b.cfg.MaxParallel > 0 {
		return b.cfg.MaxParallel, true
	}
	sp := &b.srv.speed
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.slotsHi > 0 {
		return max(sp.slotsHi, sp.slotsLo, 1), true
	}
	return max(sp.slotsLo, 1), false
}

// withSureSlot keeps, of list, the backends with fewer requests in flight
// than the slots they surely have (cacheSlots: max_parallel, the most
// they can have, else the most seen in use at once), when any has; else
// list as it is. A conversation placed where every sure slot is busy
// shares a slot with another for as long as both last: each turn waits
// behind the other's and finds its cache evicted by it. The cost model
// prices only the turn at hand, where a fast server's queue can look
// cheaper than a free slot a little slower; every later turn of both
// conversations pays it again (random-51: a fast server of two slots held
// three or four conversations throughout, their turns evaluating the
// whole history again, 0.32 s of prompt where a cached turn took 0.10 s,
// while the other servers had a slot free). A slot planned for but never
// seen in use is no sure room: it is only not ruled out. found is false when
// none has one.
func withSureSlot(list []*backend) (out []*backend, found bool) {
	out = list[:0] // filtered in place: list's front is overwritten only by what is kept
	for _, b := range list {
		if hasSureSlot(b) {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return list, false // none has one: nothing was overwritten
	}
	return out, true
}

// hasSureSlot reports whether b has fewer requests in flight than the slots
// it surely has (cacheSlots).
func hasSureSlot(b *backend) bool {
	n, _ := b.cacheSlots()
	return b.srv.inFlight.Load() < int64(n)
}

// backendByKey is the backend of avail whose server is key, nil when none
// (above largePool through the list's index, as sampled finds it).
func (h *Handler) backendByKey(avail []*backend, key string) *backend {
	if len(avail) > largePool {
		return h.infoOf(h.firstTierKept(avail)).byKey(key)
	}
	for _, b := range avail {
		if b.srv.key == key {
			return b
		}
	}
	return nil
}

func (t *affinityTable) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.lru.Len()
}

// affinityPool holds each frontend name's table, shared by the old and
// new config across a reload.
var affinityPool = caddy.NewUsagePool()

type pooledAffinity struct{ *affinityTable }

func (pooledAffinity) Destruct() error { return nil }

func acquireAffinity(name string) *affinityTable {
	v, _, _ := affinityPool.LoadOrNew(name, func() (caddy.Destructor, error) {
		return pooledAffinity{newAffinityTable(affinityMaxEntries, affinityTTL)}, nil
	})
	return v.(pooledAffinity).affinityTable
}
