package ollamaflow

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Defaults of backends_from.
const (
	defaultRefresh = 10 * time.Second
	// lookupTimeout bounds one lookup (an SRV lookup and the address
	// lookups of its targets together).
	lookupTimeout = 5 * time.Second
	// firstLookupTimeout bounds the lookup Provision waits for, so a config
	// with an unreachable resolver still loads (and retries every refresh).
	firstLookupTimeout = 3 * time.Second
)

// BackendSource is a DNS name whose records are backends of the frontend,
// looked up again every Refresh and applied without a reload: the
// addresses of a host (type a: A and AAAA records, such as a Kubernetes
// headless Service's, one port for all), or the targets of SRV records
// (type srv: each target's addresses on the record's port).
//
// A server found is named host:port (the address for type a, the SRV
// target for type srv), shares its live state with every frontend naming
// the same URL (http://address:port), is probed at once and enters
// rotation once a probe has passed. A server whose records disappear is
// drained: it takes no new request from this frontend, and leaves once the
// requests it is serving have finished. A failed lookup keeps the servers
// of the last good one; an answer that the name has no records (NXDOMAIN
// or no data) is a good answer, and empties the source.
type BackendSource struct {
	// Type is "a" (the addresses of Host, on Port) or "srv" (the SRV
	// records of Name). Required.
	Type string `json:"type,omitempty"`

	// Host is the name whose A and AAAA records are the backends, for
	// type a.
	Host string `json:"host,omitempty"`

	// Port is the port of every address found, for type a. Default: 11434.
	Port int `json:"port,omitempty"`

	// Name is the SRV name looked up, for type srv, such as
	// _ollama._tcp.ollama.ai.svc.cluster.local. SRV priorities and
	// weights are not used: every target is a backend with the block's
	// weight.
	Name string `json:"name,omitempty"`

	// Refresh is the time between two lookups. Default: 10s.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	// Resolvers are the DNS servers asked, as [udp/|tcp/]host[:port] (port
	// 53 by default), one picked at random per query as Caddy's own
	// dynamic upstreams do; a query the server truncates is asked again
	// over TCP. Default: the system's resolver (/etc/resolv.conf).
	Resolvers []string `json:"resolvers,omitempty"`

	// Backend holds the backend options applied to every server found
	// (labels, max_parallel, weight, pins, credentials, health checks...),
	// as in a backend block. Its name and url must be empty: DNS gives
	// them.
	Backend *Backend `json:"backend,omitempty"`
}

// String describes the source in logs and the admin API.
func (s *BackendSource) String() string {
	if strings.EqualFold(s.Type, "srv") {
		return "srv " + s.Name
	}
	return fmt.Sprintf("a %s %d", s.Host, s.Port)
}

// source is a provisioned BackendSource.
type source struct {
	cfg      *BackendSource
	label    string // String(), after defaults
	srv      bool
	name     string // Host or Name, lowercased
	port     int
	refresh  time.Duration
	resolver *net.Resolver
	servers  string      // the configured resolvers, for messages; "" for the system's
	tmpl     Backend     // the block's options, provisioned; Name and URL empty
	memory   *sourceMemo // the last good answer, shared with later configs
	memoKey  string

	// For the admin API; guarded by discovery.mu.
	lookups, failures int64
	lastLookup        time.Time
	lastErr           string
}

// sourceStatus is a source as GET /ollamaflow/frontends shows it.
type sourceStatus struct {
	Source     string    `json:"source"`
	Servers    int       `json:"servers"`
	Lookups    int64     `json:"lookups"`
	Failures   int64     `json:"failures"`
	LastLookup time.Time `json:"last_lookup,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
}

// endpoint is one server a lookup found.
type endpoint struct {
	name string // host:port
	base *url.URL
	src  *source
}

// sourceMemo keeps a source's last good answer across reloads, so a config
// loaded while DNS fails starts with the servers the previous one had.
type sourceMemo struct {
	mu    sync.Mutex
	found []endpoint // src is nil here: it belongs to the config that looked up
}

func (*sourceMemo) Destruct() error { return nil }

// sourceMemos holds one sourceMemo per distinct source (type, name, port,
// resolvers), for as long as a frontend uses the source.
var sourceMemos = caddy.NewUsagePool()

// provision validates the source and applies its defaults.
func (s *BackendSource) provision() (*source, error) {
	src := &source{cfg: s}
	switch strings.ToLower(s.Type) {
	case "a":
		if strings.TrimSpace(s.Host) == "" {
			return nil, errors.New("host: required for type a")
		}
		if s.Name != "" {
			return nil, errors.New("name: only for type srv; type a looks up host")
		}
		if s.Port == 0 {
			s.Port, _ = strconv.Atoi(defaultOllamaPort)
		}
		if s.Port < 1 || s.Port > 65535 {
			return nil, fmt.Errorf("port: want 1-65535, got %d", s.Port)
		}
		src.name, src.port = strings.ToLower(strings.TrimSpace(s.Host)), s.Port
	case "srv":
		if strings.TrimSpace(s.Name) == "" {
			return nil, errors.New("name: required for type srv")
		}
		if s.Host != "" || s.Port != 0 {
			return nil, errors.New("host and port: only for type a; SRV records give the targets and their ports")
		}
		src.srv, src.name = true, strings.ToLower(strings.TrimSpace(s.Name))
	default:
		return nil, fmt.Errorf("type: want a or srv, got %q", s.Type)
	}
	s.Type = strings.ToLower(s.Type)
	if s.Refresh < 0 {
		return nil, fmt.Errorf("refresh: must not be negative, got %s", time.Duration(s.Refresh))
	}
	if s.Refresh == 0 {
		s.Refresh = caddy.Duration(defaultRefresh)
	}
	src.refresh = time.Duration(s.Refresh)
	resolver, err := newResolver(s.Resolvers)
	if err != nil {
		return nil, fmt.Errorf("resolvers: %w", err)
	}
	src.resolver = resolver
	src.servers = strings.Join(s.Resolvers, ",")
	if s.Backend != nil {
		src.tmpl = *s.Backend
	}
	if src.tmpl.Name != "" || src.tmpl.URL != "" {
		return nil, errors.New("backend: name and url come from DNS; leave them out")
	}
	// Provision a copy named like a discovered server, so its checks and
	// defaults run once, with the messages of a backend block.
	src.tmpl.Name, src.tmpl.URL = "discovered", "127.0.0.1"
	if err := src.tmpl.provision(); err != nil {
		return nil, err
	}
	src.tmpl.Name, src.tmpl.URL = "", ""
	src.label = s.String()
	src.memoKey = src.label + "\x00" + strings.Join(s.Resolvers, ",")
	return src, nil
}

// newResolver returns a resolver that asks the given DNS servers, or the
// system's resolver when there are none. As in Caddy's A and SRV upstream
// sources, Go's own resolver dials a server picked at random; unlike them,
// it keeps the transport Go asks for (TCP after a truncated UDP answer) unless
// the address names one.
func newResolver(addrs []string) (*net.Resolver, error) {
	if len(addrs) == 0 {
		return net.DefaultResolver, nil
	}
	type target struct{ network, addr string }
	var targets []target
	for _, a := range addrs {
		na, err := caddy.ParseNetworkAddressWithDefaults(a, "udp", 53)
		if err != nil {
			return nil, fmt.Errorf("%q: %v", a, err)
		}
		if na.PortRangeSize() != 1 {
			return nil, fmt.Errorf("%q: want one port", a)
		}
		network := na.Network
		switch network {
		case "udp", "udp4", "udp6":
			network = "" // Go's choice
		case "tcp", "tcp4", "tcp6":
		default:
			return nil, fmt.Errorf("%q: want a udp or tcp address, got %s", a, na.Network)
		}
		if na.Host == "" {
			return nil, fmt.Errorf("%q: missing host", a)
		}
		targets = append(targets, target{network, na.JoinHostPort(0)})
	}
	dialer := &net.Dialer{Timeout: 2 * time.Second}
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			t := targets[rand.IntN(len(targets))]
			if t.network != "" {
				network = t.network
			}
			return dialer.DialContext(ctx, network, t.addr)
		},
	}, nil
}

// lookup asks DNS for the source's servers. An answer that the name does
// not exist or has no records is an empty set, not an error; an SRV target
// without addresses is skipped.
func (src *source) lookup(ctx context.Context) ([]endpoint, error) {
	found, err := src.lookupAll(ctx)
	var dnsErr *net.DNSError
	if src.servers != "" && errors.As(err, &dnsErr) {
		// Go names the system's nameserver, which a custom Dial replaced.
		e := *dnsErr
		e.Server = src.servers
		err = &e
	}
	return found, err
}

func (src *source) lookupAll(ctx context.Context) ([]endpoint, error) {
	if !src.srv {
		ips, err := src.addresses(ctx, src.name)
		if err != nil {
			return nil, err
		}
		out := make([]endpoint, 0, len(ips))
		for _, ip := range ips {
			out = append(out, src.endpoint(net.JoinHostPort(ip.String(), strconv.Itoa(src.port)), ip, src.port))
		}
		return out, nil
	}
	_, records, err := src.resolver.LookupSRV(ctx, "", "", src.name)
	if err != nil && !isNotFound(err) {
		return nil, err
	}
	var out []endpoint
	for _, rec := range records {
		target := strings.ToLower(strings.TrimSuffix(rec.Target, "."))
		if target == "" || rec.Port == 0 {
			continue // "." means the service is not available there
		}
		ips, err := src.addresses(ctx, target)
		if err != nil {
			return nil, fmt.Errorf("target %s: %w", target, err)
		}
		for _, ip := range ips {
			name := net.JoinHostPort(target, strconv.Itoa(int(rec.Port)))
			if len(ips) > 1 {
				name = net.JoinHostPort(ip.String(), strconv.Itoa(int(rec.Port)))
			}
			out = append(out, src.endpoint(name, ip, int(rec.Port)))
		}
	}
	return out, nil
}

// addresses looks up host's addresses; none is an answer, not an error.
func (src *source) addresses(ctx context.Context, host string) ([]netip.Addr, error) {
	ips, err := src.resolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, err
	}
	out := make([]netip.Addr, 0, len(ips))
	for _, ip := range ips {
		ip = ip.Unmap().WithZone("")
		if !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	return out, nil
}

func (src *source) endpoint(name string, ip netip.Addr, port int) endpoint {
	return endpoint{name: name, src: src, base: &url.URL{Scheme: "http", Host: net.JoinHostPort(ip.String(), strconv.Itoa(port))}}
}

func isNotFound(err error) bool {
	var dnsErr *net.DNSError
	return errors.As(err, &dnsErr) && dnsErr.IsNotFound
}

// memberSet is a frontend's backends at one moment: the handler swaps the
// whole set when DNS changes, and a request works on the set it read.
type memberSet struct {
	// backends are in rotation: the static ones in config order, then the
	// discovered ones by name.
	backends []*backend
	// leaving are discovered servers whose records disappeared, kept (for
	// the admin API) until the requests they serve have finished.
	leaving []*backend
}

// pool returns the frontend's backends in rotation now.
func (h *Handler) pool() []*backend {
	if m := h.members.Load(); m != nil {
		return m.backends
	}
	return h.backends // a view built by hand (tests)
}

// views returns every backend of the frontend, leaving ones included.
func (h *Handler) views() []*backend {
	m := h.members.Load()
	if m == nil {
		return h.backends
	}
	if len(m.leaving) == 0 {
		return m.backends
	}
	return append(slices.Clip(m.backends), m.leaving...)
}

// discovery runs a frontend's backends_from sources: a goroutine per source
// looks it up every refresh, and membership changes are applied one at a
// time under mu.
type discovery struct {
	h        *Handler
	ctx      caddy.Context // the config's, for the servers' settings
	logger   *zap.Logger
	sources  []*source
	required []requiredModel

	mu      sync.Mutex
	found   map[*source][]endpoint // the last good answer of each source
	byKey   map[string]*backend    // discovered servers in rotation
	leaving []*backend             // out of rotation, in-flight requests finishing
	started bool                   // the config runs: a server found adopts its settings at once
	stopped bool

	reap   chan struct{} // a leaving server may have finished its last request
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newDiscovery(h *Handler, ctx caddy.Context, sources []*source, required []requiredModel) *discovery {
	d := &discovery{
		h: h, ctx: ctx, logger: h.logger.Named("discovery"), sources: sources, required: required,
		found: make(map[*source][]endpoint), byKey: make(map[string]*backend),
		reap: make(chan struct{}, 1),
	}
	for _, src := range sources {
		v, _ := sourceMemos.LoadOrStore(src.memoKey, &sourceMemo{})
		src.memory = v.(*sourceMemo)
	}
	return d
}

// start looks every source up once, within firstLookupTimeout, so the
// config starts with its servers, then keeps them current in goroutines.
// A source that fails here starts with the last good answer another
// config had, if any.
func (d *discovery) start() {
	ctx, cancel := context.WithCancel(context.Background())
	d.cancel = cancel
	first, cancelFirst := context.WithTimeout(ctx, firstLookupTimeout)
	results := make([][]endpoint, len(d.sources))
	errs := make([]error, len(d.sources))
	var wg sync.WaitGroup
	for i, src := range d.sources {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if rec := recover(); rec != nil {
					errs[i] = fmt.Errorf("panic: %v", rec)
				}
			}()
			results[i], errs[i] = src.lookup(first)
		}()
	}
	wg.Wait()
	cancelFirst()
	for i, src := range d.sources {
		found, err := results[i], errs[i]
		d.noteLookup(src, err)
		if err != nil {
			d.logger.Warn("backends_from lookup failed; starting with the last known servers, if any",
				zap.String("source", src.label), zap.Error(err))
			found = src.remembered()
			if found == nil {
				continue
			}
		}
		d.update(src, found)
	}
	for _, src := range d.sources {
		d.goSafe("backends_from "+src.label, func() { d.refreshLoop(ctx, src) })
	}
	d.goSafe("backends_from reaper", func() { d.reapLoop(ctx) })
}

// goSafe runs fn in a goroutine that stop waits for, logging a panic
// instead of taking Caddy down.
func (d *discovery) goSafe(what string, fn func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() {
			if rec := recover(); rec != nil {
				d.logger.Error("panic in "+what, zap.Any("panic", rec), zap.Stack("stack"))
			}
		}()
		fn()
	}()
}

func (src *source) remembered() []endpoint {
	src.memory.mu.Lock()
	defer src.memory.mu.Unlock()
	if src.memory.found == nil {
		return nil
	}
	out := make([]endpoint, len(src.memory.found))
	for i, ep := range src.memory.found {
		ep.src = src
		out[i] = ep
	}
	return out
}

func (src *source) remember(found []endpoint) {
	kept := make([]endpoint, len(found))
	for i, ep := range found {
		ep.src = nil
		kept[i] = ep
	}
	src.memory.mu.Lock()
	src.memory.found = kept
	src.memory.mu.Unlock()
}

// refreshLoop looks src up every refresh until ctx ends. A failure keeps
// the servers of the last good answer, and is logged once until a lookup
// succeeds again.
func (d *discovery) refreshLoop(ctx context.Context, src *source) {
	failing := false
	timer := time.NewTimer(src.refresh)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
		found, err := src.lookup(lctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			d.update(src, found)
		}
		d.noteLookup(src, err)
		switch {
		case err != nil:
			if !failing {
				d.logger.Warn("backends_from lookup failed; keeping the last known servers",
					zap.String("source", src.label), zap.Error(err))
			}
			failing = true
		default:
			if failing {
				d.logger.Info("backends_from lookup succeeds again", zap.String("source", src.label))
			}
			failing = false
		}
		timer.Reset(src.refresh)
	}
}

// update applies a good answer of src: servers new to the frontend join,
// servers no source names any more leave.
func (d *discovery) update(src *source, found []endpoint) {
	src.remember(found)
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return
	}
	d.found[src] = found
	want := d.wanted()
	var joined, left []*backend
	for key, b := range d.byKey {
		if _, ok := want[key]; !ok {
			delete(d.byKey, key)
			left = append(left, b)
		}
	}
	for key, ep := range want {
		if _, ok := d.byKey[key]; !ok {
			b := d.join(ep)
			d.byKey[key] = b
			joined = append(joined, b)
		}
	}
	if len(joined) == 0 && len(left) == 0 {
		d.mu.Unlock()
		return
	}
	for _, b := range left {
		// Before the new set is published: a request holding the old set
		// sees the flag and takes no slot there (backend.tryAcquire).
		b.leaving.Store(true)
		d.leaving = append(d.leaving, b)
	}
	gone := d.takeIdleLocked()
	d.publishLocked()
	if q := d.h.queue; q != nil {
		q.membersChanged(joined, left)
	}
	for _, b := range left {
		b.srv.dropRequired(d.h)
		d.logger.Info("backend left: draining", zap.String("backend", b.cfg.Name), zap.String("source", b.source),
			zap.Int64("in_flight", b.held.Load()))
	}
	for _, b := range joined {
		d.logger.Info("backend found", zap.String("backend", b.cfg.Name), zap.String("url", b.srv.key), zap.String("source", b.source))
	}
	d.mu.Unlock()
	d.release(gone)
}

// noteLookup records the outcome of a lookup of src, after it was applied.
func (d *discovery) noteLookup(src *source, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	src.lookups++
	src.lastLookup = time.Now()
	src.lastErr = ""
	if err != nil {
		src.failures++
		src.lastErr = err.Error()
	}
}

// status reports each source for the admin API.
func (d *discovery) status() []sourceStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]sourceStatus, 0, len(d.sources))
	for _, src := range d.sources {
		out = append(out, sourceStatus{Source: src.label, Servers: len(d.found[src]), Lookups: src.lookups,
			Failures: src.failures, LastLookup: src.lastLookup, LastError: src.lastErr})
	}
	return out
}

// wanted is the union of the sources' last answers by server key, less the
// static backends' servers (the static view wins); the first source to
// name a server gives its options.
func (d *discovery) wanted() map[string]endpoint {
	static := make(map[string]bool, len(d.h.backends))
	for _, b := range d.h.backends {
		static[b.srv.key] = true
	}
	want := make(map[string]endpoint)
	for _, src := range d.sources {
		for _, ep := range d.found[src] {
			key := ep.base.String()
			if _, dup := want[key]; !dup && !static[key] {
				want[key] = ep
			}
		}
	}
	return want
}

// join builds the frontend's view of a server found and takes a reference
// to its live state; a server new to the process starts probing at once.
// d.mu must be held.
func (d *discovery) join(ep endpoint) *backend {
	h := d.h
	cfg := ep.src.tmpl
	cfg.Name, cfg.URL = ep.name, ep.base.String()
	b := newBackendView(&cfg, ep.base)
	b.discovered, b.source, b.owner = true, ep.src.label, d
	b.staged = b.settings(d.ctx, h.logger, h.events, time.Duration(h.DialTimeout))
	srv, _ := acquireServer(ep.base, b.staged) // cannot fail: the constructor does not
	b.srv = srv
	if d.started {
		srv.adopt(b.staged, h.events, h.Name+"\x00"+b.cfg.Name)
	}
	if !cfg.Disabled && len(d.required) > 0 {
		srv.setRequired(h, d.required)
	}
	return b
}

// publishLocked stores the frontend's new member set. d.mu must be held.
func (d *discovery) publishLocked() {
	found := make([]*backend, 0, len(d.byKey))
	for _, b := range d.byKey {
		found = append(found, b)
	}
	slices.SortFunc(found, func(a, b *backend) int { return strings.Compare(a.cfg.Name, b.cfg.Name) })
	set := &memberSet{
		backends: append(slices.Clip(d.h.backends), found...),
		leaving:  slices.Clone(d.leaving),
	}
	for i, b := range found {
		// A model index built over the previous set sees the new
		// positions disagree with its list and takes the slow path.
		b.pos.Store(int64(len(d.h.backends) + i))
	}
	d.h.members.Store(set)
}

// adopt gives every discovered server the settings of this frontend's
// config, now that it runs, and lets later ones adopt theirs at once.
func (d *discovery) adopt(config any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.started = true
	for _, b := range d.byKey {
		b.srv.adopt(b.staged, config, d.h.Name+"\x00"+b.cfg.Name)
	}
}

// idle tells the reaper that a leaving server finished a request.
func (d *discovery) idle() {
	select {
	case d.reap <- struct{}{}:
	default:
	}
}

func (d *discovery) reapLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.reap:
		}
		d.mu.Lock()
		gone := d.takeIdleLocked()
		if len(gone) > 0 {
			d.publishLocked()
		}
		d.mu.Unlock()
		d.release(gone)
	}
}

// takeIdleLocked removes the leaving servers that serve no request of this
// frontend any more. d.mu must be held. Each backend.tryAcquire counts its
// slot before it reads the leaving flag, and the flag is set before this
// reads the count: a request either sees the flag or is seen here.
func (d *discovery) takeIdleLocked() []*backend {
	var gone []*backend
	kept := d.leaving[:0]
	for _, b := range d.leaving {
		if b.held.Load() == 0 {
			gone = append(gone, b)
		} else {
			kept = append(kept, b)
		}
	}
	clear(d.leaving[len(kept):])
	d.leaving = kept
	return gone
}

// release gives back the references of servers that left, and the
// metric series of their names (a pool whose addresses change would
// otherwise grow them without bound).
func (d *discovery) release(gone []*backend) {
	for _, b := range gone {
		_, _ = servers.Delete(b.srv.key)
		d.logger.Info("backend gone", zap.String("backend", b.cfg.Name), zap.String("source", b.source))
		if !d.h.namesLive(b.cfg.Name) {
			forgetMetrics(d.h.Name, b.cfg.Name)
		}
	}
}

// stop ends the goroutines and gives back every reference the discovery
// holds (Cleanup).
func (d *discovery) stop() {
	if d.cancel != nil {
		d.cancel()
	}
	d.wg.Wait()
	d.mu.Lock()
	d.stopped = true
	all := slices.Clone(d.leaving)
	for _, b := range d.byKey {
		all = append(all, b)
	}
	d.byKey, d.leaving = map[string]*backend{}, nil
	d.mu.Unlock()
	for _, b := range all {
		b.srv.dropRequired(d.h)
		_, _ = servers.Delete(b.srv.key)
	}
	for _, src := range d.sources {
		_, _ = sourceMemos.Delete(src.memoKey)
	}
}

// namesLive reports whether a live frontend named like h has a backend
// named name in rotation.
func (h *Handler) namesLive(name string) bool {
	for _, o := range liveFrontends() {
		if o.Name != h.Name {
			continue
		}
		for _, b := range o.pool() {
			if b.cfg.Name == name {
				return true
			}
		}
	}
	return false
}

// forgetMetrics drops the series of a backend that left.
func forgetMetrics(frontend, backend string) {
	labels := prometheus.Labels{"frontend": frontend, "backend": backend}
	metrics.requests.DeletePartialMatch(labels)
	metrics.retries.DeletePartialMatch(labels)
	metrics.firstByte.DeletePartialMatch(labels)
	metrics.tokens.DeletePartialMatch(labels)
	metrics.coldLoads.DeletePartialMatch(labels)
	metrics.responsesCut.DeletePartialMatch(labels)
}

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	backends_from a <host> [<port>] | srv <name> {
//		refresh   <duration>
//		resolvers <address...>
//		# any backend option (see Backend.UnmarshalCaddyfile), applied
//		# to every server found
//	}
func (s *BackendSource) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume "backends_from"
	if !d.NextArg() {
		return d.Err("backends_from: want a <host> [<port>] or srv <name>")
	}
	typ := d.Val()
	s.Type = strings.ToLower(typ)
	args := d.RemainingArgs()
	switch s.Type {
	case "a":
		if len(args) < 1 || len(args) > 2 {
			return d.Errf("backends_from a: want <host> [<port>], got %d arguments", len(args))
		}
		s.Host = args[0]
		if len(args) == 2 {
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return d.Errf("backends_from a: invalid port '%s'", args[1])
			}
			s.Port = port
		}
	case "srv":
		if len(args) != 1 {
			return d.Errf("backends_from srv: want <name>, got %d arguments", len(args))
		}
		s.Name = args[0]
	default:
		return d.Errf("backends_from: unknown type '%s' (want a or srv)", typ)
	}

	b := new(Backend)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !repeatableBackendOptions[opt] && opt != "resolvers" {
			return d.Errf("duplicate backends_from option '%s'", opt)
		}
		seen[opt] = true
		var err error
		switch opt {
		case "refresh":
			s.Refresh, err = parseDuration(d)
		case "resolvers":
			var addrs []string
			if addrs, err = someArgs(d); err == nil {
				for _, a := range addrs {
					if _, perr := newResolver([]string{a}); perr != nil {
						return d.Errf("resolvers: %v", perr)
					}
				}
				s.Resolvers = append(s.Resolvers, addrs...)
			}
		default:
			err = b.unmarshalOption(d, opt)
		}
		if err != nil {
			return err
		}
	}
	if !onlyKeys(seen, "refresh", "resolvers") {
		s.Backend = b
	}
	return nil
}

// onlyKeys reports whether every key of seen is one of keys.
func onlyKeys(seen map[string]bool, keys ...string) bool {
	for k := range seen {
		if !slices.Contains(keys, k) {
			return false
		}
	}
	return true
}

// sourceNames lists the frontend's backends_from sources, for messages.
func (h *Handler) sourceNames() string {
	names := make([]string, 0, len(h.BackendsFrom))
	for _, s := range h.BackendsFrom {
		names = append(names, s.String())
	}
	return strings.Join(names, ", ")
}
