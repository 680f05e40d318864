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
// conversations weigh least (within a tenth of a fresh one). It runs for
// every new conversation: a read lock, no allocation; the write lock only
// when conversations went idle since the last record.
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
	out := list[:0]
	for _, b := range list {
		if t.victimIdle(b, now) >= longest/2 && weight(b) < least+0.1 {
			out = append(out, b)
		}
	}
	return out
}

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
// of those its slots hold; nil when it holds fewer than it has slots.
// t.mu is held.
func (t *affinityTable) victim(b *backend, now time.Time) *convActivity {
	h := t.hosting[b.srv.key]
	if h == nil {
		return nil
	}
	slots, _ := b.cacheSlots()
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

// acquireConversation takes a slot for a completion with affinity in
// mind, and reports the route taken and the conversation's id (0: new).
//
// A follow-up turn goes to the server that served the conversation's
// previous turn (keepsConversation) when it has room and what it saves is
// worth it; otherwise the policy chooses (an overflow). A new conversation
// goes, among the servers about as fast as the best, to one where it
// evicts least (keepLeastHosting): Ollama's cache keeps one conversation
// per parallel slot (OLLAMA_NUM_PARALLEL, 1 by default), so conversations
// piled on one server evict each other. So does a follow-up whose cache
// its server has evicted since (evictedFrom): nothing of it is cached
// anywhere, and its old server is no better than any other.
func (h *Handler) acquireConversation(avail []*backend, conv conversation, j *job) (*backend, string, uint64) {
	if conv.none() || h.affinity == nil {
		return h.acquire(avail, j), routePolicy, 0
	}
	t := h.affinity
	now := time.Now()
	key, id, depth := t.lookup(conv, now)
	if key == "" {
		t.counter(h.Name, "miss").Inc()
		return h.spreadNew(avail, j, now), routePolicy, 0
	}
	home := h.backendByKey(avail, key)
	countedOut := home != nil && t.evictedFrom(home, id, now)
	if countedOut && !conv.followUp {
		// A first message seen before (unrelated clients, a retried
		// request): no saving to weigh the count's word against.
		t.counter(h.Name, "evicted").Inc()
		return h.spreadNew(avail, j, now), routeAffinityEvicted, id
	}
	class := classOf(countedOut, t.missedLast(id))
	if prev, saving := h.keepsConversation(avail, key, conv, depth, j, class); prev != nil && prev.tryAcquire() {
		t.counter(h.Name, "hit").Inc()
		if j != nil {
			j.cachedOn = &prev.srv.speed // its timing there is not its prompt rate
			j.cacheSaving, j.cacheClass = saving, class
		}
		return prev, routeAffinityHit, id
	}
	if countedOut {
		// As many other conversations as it has slots went there since,
		// and the odds that its cache is still there did not keep it:
		// placed as a new one, where it evicts no other's, its next
		// turns find it.
		t.counter(h.Name, "evicted").Inc()
		return h.spreadNew(avail, j, now), routeAffinityEvicted, id
	}
	t.counter(h.Name, "overflow").Inc()
	return h.acquire(avail, j), routeAffinityOverflow, id
}

// spreadNew takes a slot for a conversation nothing of which is cached
// anywhere: among the servers near the best (spreadFactor), one where it
// evicts no other conversation's cache, holding the fewest conversations.
//
// When every server near the best would evict a conversation's cache, a
// server further off that holds a free cache slot takes it instead if it
// costs no more than the eviction would: the evicted conversation's next
// turn evaluates its whole prompt again. So a server whose speed was
// learned a little slow (one sample under load) still takes a
// conversation rather than two evicting each other on one server.
func (h *Handler) spreadNew(avail []*backend, j *job, now time.Time) *backend {
	sc := scratchPool.Get().(*scratch)
	defer sc.put()
	spread := h.affinity.keepLeastHosting(h.nearBest(sc, avail, j, spreadFactor, spreadMargin), now)
	if cost, full := h.affinity.evictionSeconds(spread, j, now); full && cost > 0 {
		if b := h.roomyWithin(avail, j, cost, now); b != nil && b.tryAcquire() {
			return b
		}
	}
	if b := h.take(spread, j); b != nil {
		return b
	}
	return h.acquire(avail, j)
}

// evictionSeconds is what a new conversation on the cheapest of list
// costs the conversation it evicts there: its prompt evaluated again, at
// that server's learned prompt rate. full is false when one of list has a
// free cache slot (or list is empty).
func (t *affinityTable) evictionSeconds(list []*backend, j *job, now time.Time) (cost float64, full bool) {
	if len(list) == 0 {
		return 0, false
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	cost = math.Inf(1)
	for _, b := range list {
		v := t.victim(b, now)
		if v == nil {
			return 0, false
		}
		secPerTok, charsPerTok, ok := b.srv.speed.promptCost(j.model)
		if !ok {
			return 0, true
		}
		cost = min(cost, (float64(v.size.tokens)+float64(v.size.chars)/max(charsPerTok, 0.5))*secPerTok)
	}
	return cost, true
}

// roomyWithin is the free backend of avail (a sample above largePool) with
// a free cache slot and the least expected delay for j, if that delay is
// within the spreading band of the best plus extra seconds; nil if none.
func (h *Handler) roomyWithin(avail []*backend, j *job, extra float64, now time.Time) *backend {
	var buf [sampleSize]*backend
	list := h.sampled(buf[:0], avail, j, "")
	best, roomyBest := math.Inf(1), math.Inf(1)
	var pick *backend
	for _, b := range list {
		if !b.free() {
			continue
		}
		d, ok := h.expectedDelayOf(b, j)
		if !ok {
			continue
		}
		best = min(best, d)
		if d < roomyBest && h.affinity.hasFreeSlot(b, now) {
			roomyBest, pick = d, b
		}
	}
	if pick == nil || roomyBest > best*spreadFactor+spreadMargin+extra {
		return nil
	}
	return pick
}

// hasFreeSlot reports whether b holds fewer recent conversations than it
// has slots.
func (t *affinityTable) hasFreeSlot(b *backend, now time.Time) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.victim(b, now) == nil
}

// keepsConversation returns the backend of server key when the
// conversation's next turn should go there: it has room, and its expected
// delay less what its cache saves is no worse than the best free
// candidate's (within a tie). The saving is the prompt of the prefix it
// served (conv.sizes[depth]) at its learned prompt seconds per token for
// the model, at most its whole prompt time; a request with no earlier turn
// is credited nothing (identical first messages from unrelated clients are
// no conversation; that server keeps them on a tie only). Servers not
// observed yet: it stays when it is no busier than the least busy. nil:
// the policy chooses.
func (h *Handler) keepsConversation(all []*backend, key string, conv conversation, depth int, j *job, class cacheClass) (*backend, float64) {
	var buf [sampleSize + 1]*backend
	avail := h.sampled(buf[:0], all, j, key) // above largePool: key's server and a sample (largepool.go)
	noteWalk(avail)
	var prev *backend
	var prevDelay delay
	prevKnown := false
	best, minLoad := math.Inf(1), int64(math.MaxInt64)
	for _, b := range avail {
		if !b.free() {
			continue
		}
		d, ok := h.estimateOf(b, j)
		if ok {
			best = min(best, d.total())
		} else if b.srv.key != key && b.srv.inFlight.Load() == 0 {
			// An idle server not observed yet may be the fastest:
			// least_delay measures it with the next request it gets,
			// so only a saving larger than any delay keeps the
			// conversation from it (else a conversation, or one
			// repeated prompt, held on a slow server keeps the pool
			// from ever learning of a faster one).
			best = 0
		}
		minLoad = min(minLoad, b.srv.inFlight.Load())
		if b.srv.key == key {
			prev, prevDelay, prevKnown = b, d, ok
		}
	}
	if prev == nil {
		return nil, 0
	}
	if !prevKnown && prev.srv.inFlight.Load() >= int64(max(prev.cfg.MaxParallel, 1)) {
		// Its previous turn (or the same first message from another
		// client) is still running there, and nothing is known of its
		// speed: least_delay measures such a server one request at a
		// time, since a second one may wait behind a long first on a
		// single slot. Nothing is cached there yet either.
		return nil, 0
	}
	if !prevKnown || math.IsInf(best, 1) {
		if class&1 != 0 {
			return nil, 0 // counted out, no saving to weigh: placed as a new one
		}
		// A server not observed yet keeps it as the request that
		// measures it (claimProbe), as least_delay would send it: a
		// burst of one prompt arriving together would otherwise all
		// be kept there before the first of them took its slot.
		if prev.srv.inFlight.Load() <= minLoad && (prevKnown || prev.srv.speed.claimProbe(max(prev.cfg.MaxParallel, 1), &prev.srv.inFlight, time.Now())) {
			return prev, 0
		}
		return nil, 0
	}
	saving, expected := 0.0, 0.0
	if conv.followUp && depth >= 0 && depth < len(conv.sizes) {
		if secPerTok, charsPerTok, ok := prev.srv.speed.promptCost(j.model); ok {
			size := conv.sizes[depth]
			tokens := float64(size.tokens) + float64(size.chars)/max(charsPerTok, 0.5)
			saving = min(tokens*secPerTok, prevDelay.prompt)
			expected = saving * prev.srv.speed.cacheOdds(class)
		}
	}
	if prevDelay.total()-expected <= best*(1+affinityTie)+affinityTieMargin {
		return prev, saving
	}
	return nil, 0
}

// scratch is a request's working lists, pooled so that spreading a new
// conversation allocates nothing.
type scratch struct {
	list   []*backend
	delays []float64
	waits  []bool // the request would wait there for a slot
	atOnce []bool // it would start there at once, its model resident
	// freeCost is the delay there where it would start at once or take
	// a slot planned for but never seen in use (its model resident), else
	// NaN: what relievesQueue may weigh.
	freeCost []float64
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

// put clears the list (no backend kept alive by the pool) and returns it.
func (sc *scratch) put() {
	clear(sc.list[:cap(sc.list)])
	sc.list, sc.delays, sc.waits, sc.atOnce, sc.freeCost = sc.list[:0], sc.delays[:0], sc.waits[:0], sc.atOnce[:0], sc.freeCost[:0]
	scratchPool.Put(sc)
}

// nearBest keeps, in sc.list, the free backends of list where spreading a
// new conversation costs the request nothing it would not pay under the
// policy alone:
//
//   - an observed server where it would start at once (a free slot, its
//     model resident) and whose expected delay is within factor × the
//     best plus margin seconds: servers of one class whose learned speeds
//     differ by noise;
//   - an observed server whose expected delay, wait and load included, is
//     a tie with the best (affinityTie): where the policy might send it;
//     one where the request would wait for a slot only while no server
//     with a slot free is expected to end no later.
//
// A band wide enough for the noise of speeds (a quarter) also admits a
// whole request's wait: with every slot busy it sent requests to the
// server holding the fewest conversations, behind its queue, while
// another was about to free a slot (equal servers at capacity: p99 173
// against 96 ms without affinity). The conversation it gains is worth no
// wait either: it is a first turn, cached nowhere yet, and the next turn
// goes back wherever it went.
//
// A backend not observed yet (no delay to compare) is kept when the
// policy would measure it now: no busier than the least busy, with a slot
// for its measuring request not taken or claimed (least_delay sends one at
// a time; a second one offered alone would be taken, where the policy
// waits for the first answer), and its answers not mostly errors (it holds no conversation,
// each failed turn being recorded again where it is retried, so it would
// draw every new one; an observed one is priced by its error share).
// Where j's model is not resident, it is kept only as least_delay would
// measure it: while its expected load costs less than the best observed
// choice (on a pool where nothing is measured yet, always), and no load
// of the model is under way on another candidate (that load is the one to
// share: pickLeastDelay joins it, and a list without the loading server,
// busier than the idle ones, would have the policy start a second one). A
// cold server not measured yet holds no conversation, so without that
// rule it drew every new one and loaded the model there, evicting the one
// it held (3 models over servers of room 1, 2 and 3: 13-17 loads per
// 1,000 against 3). One whose /api/ps lists no model at all stays a peer
// (unless that load elsewhere is under way): a load there evicts nothing,
// happens once, and is what spreads the conversations of a pool started
// cold, where every server but the first to answer is such a one.
func (h *Handler) nearBest(sc *scratch, all []*backend, j *job, factor, margin float64) []*backend {
	var buf [sampleSize]*backend
	list := h.sampled(buf[:0], all, j, "") // above largePool: a sample (largepool.go)
	noteWalk(list)
	best, minLoad := math.Inf(1), int64(math.MaxInt64)
	sc.list, sc.delays, sc.waits, sc.atOnce, sc.freeCost = sc.list[:0], sc.delays[:0], sc.waits[:0], sc.atOnce[:0], sc.freeCost[:0]
	freeBest := math.Inf(1)    // the least delay among servers with a slot free
	bestWait, tail := 0.0, 0.0 // the best choice's wait for a slot; the longest delay expected in flight
	now := time.Now()
	loadingSomewhere := false
	for _, b := range list {
		if !b.free() {
			continue
		}
		est, ok := h.estimateOf(b, j)
		d := est.total()
		if !ok {
			d = math.NaN()
		} else {
			if d < best {
				best, bestWait = d, est.wait
			}
			tail = max(tail, b.srv.speed.longestDelay(b.cfg.MaxParallel, int(b.srv.inFlight.Load()), now))
			if est.wait == 0 {
				freeBest = min(freeBest, d)
			}
		}
		sc.list = append(sc.list, b)
		sc.delays = append(sc.delays, d)
		sc.waits = append(sc.waits, ok && est.wait > 0)
		sc.atOnce = append(sc.atOnce, ok && est.wait == 0 && est.load == 0)
		free := math.NaN()
		if ok && est.slotFree() && est.load == 0 {
			free = d
		}
		sc.freeCost = append(sc.freeCost, free)
		minLoad = min(minLoad, b.srv.inFlight.Load())
		if !loadingSomewhere {
			_, loadingSomewhere = b.srv.speed.pendingLoad(j.model, now)
		}
	}
	// While the best choice means waiting for a slot, an idle server
	// least_delay has not timed for a while (it looked slower than the
	// queue elsewhere) takes this request to re-measure it, as
	// pickLeastDelay does (claimRemeasure: one request per
	// remeasureAfter). Without this, single-turn traffic, all of it new
	// conversations spread here, never reached the policy's re-measuring
	// with that server among the candidates: a server that recovered
	// stayed unused for good (speedup: 0 of 300 requests after the
	// recovery, 87 with affinity off).
	if h.remeasures && bestWait > 0 {
		for i, b := range sc.list {
			if sc.atOnce[i] && b.srv.inFlight.Load() == 0 && b.srv.speed.claimRemeasure(now) {
				out := append(sc.list[:0], b)
				return out
			}
		}
	}
	out := sc.list[:0]
	for i, b := range sc.list {
		d := sc.delays[i]
		switch {
		case math.IsNaN(d):
			inFlight := b.srv.inFlight.Load()
			if inFlight > minLoad || b.srv.speed.probesTaken(max(b.cfg.MaxParallel, 1), &b.srv.inFlight, now) || b.srv.speed.mostlyErrors(now) {
				continue
			}
			if h.coldFor(b, j.model) && (loadingSomewhere || b.srv.speed.coldCost(j.model) >= best && !holdsNoModel(b)) {
				continue
			}
			out = append(out, b)
		case sc.waits[i] && freeBest <= d:
			// Never a server's queue when a server with a slot free is
			// expected to end no later: the wait is certain, the cache
			// the spread keeps is a bet on a next turn.
		case d <= best*(1+affinityTie)+affinityTieMargin, // a tie, waiting or not
			sc.atOnce[i] && d <= best*factor+margin,       // at once, about as fast
			relievesQueue(sc.freeCost[i], bestWait, tail): // as pickLeastDelay would take it (NaN: never)
			out = append(out, b)
		}
	}
	return out
}

// holdsNoModel reports whether the server's last /api/ps listed no model:
// a load there evicts nothing.
func holdsNoModel(b *backend) bool {
	m := b.srv.models.Load()
	return m.known && len(m.loaded) == 0
}

// expectedDelayOf is the cost model's estimate of j's delay on b, in
// seconds; ok is false while b has not been observed.
func (h *Handler) expectedDelayOf(b *backend, j *job) (float64, bool) {
	d, ok := h.estimateOf(b, j)
	return d.total(), ok
}

// estimateOf is cost.go's estimateDelay through the frontend's model
// index (a bit test per candidate).
func (h *Handler) estimateOf(b *backend, j *job) (delay, bool) {
	return b.srv.speed.estimate(j, b.cfg.MaxParallel, int(b.srv.inFlight.Load()), h.coldFor(b, j.model), time.Now())
}

// promptCost is what the server has learned of prompt evaluation for
// model (the server's over all models where model has no sample): the
// per-token part of its prompt fit in seconds (the fixed part of an
// evaluation is paid even when the prefix is cached) and characters per
// token (charsPerToken before a sample); ok is false before any prompt was
// timed. It is what each cached token saves there.
func (sp *speed) promptCost(model string) (secPerTok, charsPerTok float64, ok bool) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	r := &sp.all
	if mr := sp.models[model]; mr != nil && mr.promptN > 0 {
		r = mr
	}
	if r.promptN == 0 {
		return 0, 0, false
	}
	charsPerTok = charsPerToken
	if mr := sp.models[model]; mr != nil && mr.charsN > 0 {
		charsPerTok = mr.charsPerTok
	} else if sp.all.charsN > 0 {
		charsPerTok = sp.all.charsPerTok
	}
	return r.promptTok, charsPerTok, true
}
