package ollamaflow

import (
	"cmp"
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
	// _ollama._tcp.ollama.ai.svc.cluster.local. Records are used as RFC
	// 2782 says: the targets of the lowest priority present serve
	// (together with the static backends and type a sources), and the
	// targets of a higher priority take requests only when no server of
	// a lower priority can serve one (unhealthy, drained, disabled, still
	// unprobed, without the model, or already tried by this request). A
	// record's weight, when above 0, is the server's weight, used by
	// every policy that honours weight; a weight of 0 leaves the block's
	// weight (default 1).
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
	// From the SRV record, for type srv: its priority (-1 for type a),
	// and its weight (0: the block's).
	priority int
	weight   int
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
	// Go orders the records by priority and shuffles equal priorities by
	// weight; a stable order keeps one view per server from one lookup to
	// the next. A server two records name keeps its lowest priority, and
	// the highest weight among those.
	slices.SortFunc(records, func(a, b *net.SRV) int {
		if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
			return c
		}
		if c := cmp.Compare(b.Weight, a.Weight); c != 0 {
			return c
		}
		if c := strings.Compare(a.Target, b.Target); c != 0 {
			return c
		}
		return cmp.Compare(a.Port, b.Port)
	})
	var out []endpoint
	seen := make(map[string]bool)
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
			ep := src.endpoint(name, ip, int(rec.Port))
			if seen[ep.base.Host] {
				continue
			}
			seen[ep.base.Host] = true
			ep.priority, ep.weight = int(rec.Priority), int(rec.Weight)
			out = append(out, ep)
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
	return endpoint{name: name, src: src, priority: -1,
		base: &url.URL{Scheme: "http", Host: net.JoinHostPort(ip.String(), strconv.Itoa(port))}}
}

func isNotFound(err error) bool {
	var dnsErr *net.DNSError
	return errors.As(err, &dnsErr) && dnsErr.IsNotFound
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
