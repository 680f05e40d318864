package ollamaflow

// Tenants (SPEC §8, issue 12): who is asking, and what they may do.
//
// A tenants block turns tenancy on for a frontend: every request must then
// name a tenant, by an API key (Authorization: Bearer, X-Api-Key, or the
// configured key_header) or by a placeholder an earlier authentication
// handler set (identity). The tenant is found once, in ServeHTTP after the
// route is classified and CORS answered, before any body is read; it can
// only narrow what the frontend allows. Limits and usage live in
// tenantusage.go.
//
// Keys are held as SHA-256 digests only, from provision on: a key written in
// clear (from {env.X}) is hashed and the clear value dropped, so nothing the
// admin API, a log line or an error shows can carry one. A presented key is
// hashed and compared with every configured digest in constant time, with
// no early exit, so timing tells neither whether nor which key matched.

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
)

// maxRate bounds requests_per_minute and tokens_per_minute, so that the
// limiter's arithmetic in nanoseconds stays exact enough and cannot
// overflow.
const maxRate = 1_000_000_000

// Tenants turns tenancy on for a frontend: every request must name one of
// its tenants, by API key or by an identity an earlier handler set.
type Tenants struct {
	// KeyHeader is the request header that carries a tenant's API key. For
	// Authorization the value is read as "Bearer <key>"; any other header
	// holds the key itself. Default: Authorization (Bearer), then X-Api-Key,
	// as OpenAI and Ollama clients send keys.
	KeyHeader string `json:"key_header,omitempty"`

	// Identity is a placeholder that an earlier handler sets to the name of
	// the tenant, such as {http.auth.user.id} from basic_auth, forward_auth
	// or a JWT module; a request whose placeholder names a tenant needs no
	// key. It must come from an authentication handler: a placeholder the
	// client controls (a request header) would let it pick any tenant.
	// When the placeholder is empty, keys are tried. Default: none.
	Identity string `json:"identity,omitempty"`

	// Distributed, when set, shares the tenants' counters with the other
	// Caddy instances that use the same storage (Caddy's configured
	// storage), so that they enforce one limit per tenant together; see
	// distributed.go. Default: off, each instance counts alone.
	Distributed *DistributedCounters `json:"distributed,omitempty"`

	// List are the tenants. Names must be unique.
	List []*Tenant `json:"list,omitempty"`

	keyHeader string // KeyHeader, canonical; "" for the default pair
	byName    map[string]*Tenant
	digests   []keyDigest // every tenant's keys
}

// Tenant is one client of a frontend (a team, an app, a batch job): its
// keys, what it may use of the frontend, and its limits.
type Tenant struct {
	// Name identifies the tenant in usage, metrics, logs and the
	// {http.ollamaflow.tenant} placeholder, and is what identity matches.
	// Letters, digits, '.', '_' and '-'.
	Name string `json:"name,omitempty"`

	// Keys are the tenant's API keys: each either in clear, usually from the
	// environment ({env.TEAM_A_KEY}, replaced at provision; an unset
	// variable is an error), or as sha256:<64 hex digits>, the SHA-256 of
	// the key, so the config holds no secret. A key belongs to one tenant.
	Keys []string `json:"keys,omitempty"`

	// Models, if set, narrows the frontend's models for this tenant; other
	// models get 403 and are left out of its model lists. Default: all the
	// frontend allows.
	Models []string `json:"models,omitempty"`

	// Labels are required of every backend that serves this tenant, in
	// addition to the frontend's and the request's. Default: none.
	Labels []string `json:"labels,omitempty"`

	// AllowCompletions set to false forbids this tenant generate and chat
	// requests (403). It cannot allow what the frontend forbids.
	// Default: true.
	AllowCompletions *bool `json:"allow_completions,omitempty"`

	// AllowEmbeddings set to false forbids this tenant embedding requests
	// (403). It cannot allow what the frontend forbids. Default: true.
	AllowEmbeddings *bool `json:"allow_embeddings,omitempty"`

	// PinCompletions is merged into this tenant's completion requests like
	// the frontend's pin_completions, after the client's body and before
	// the frontend's and the backend's pins, which win over it.
	// Default: none.
	PinCompletions json.RawMessage `json:"pin_completions,omitempty"`

	// PinEmbeddings is PinCompletions for embedding requests. Default: none.
	PinEmbeddings json.RawMessage `json:"pin_embeddings,omitempty"`

	// RequestsPerMinute limits the tenant's requests: a bucket of this many
	// that refills continuously at this rate per minute; an empty bucket
	// answers 429. 0 means no limit. Default: 0.
	RequestsPerMinute int `json:"requests_per_minute,omitempty"`

	// TokensPerMinute limits the tenant's prompt plus completion tokens,
	// charged when each answer ends; a request is refused (429) while the
	// tokens already used leave less than one. 0 means no limit.
	// Default: 0.
	TokensPerMinute int `json:"tokens_per_minute,omitempty"`

	// MaxParallel limits the tenant's requests in flight at once on this
	// frontend; beyond it, 429. 0 means no limit. Default: 0.
	MaxParallel int `json:"max_parallel,omitempty"`

	// Share is the tenant's weight in the fair share of queued backend
	// slots. Default: 1.
	Share int `json:"share,omitempty"`

	// Priority is the tenant's class for queued backend slots: a higher
	// class is served first. Default: 0.
	Priority int `json:"priority,omitempty"`

	models     map[string]struct{} // nil: any the frontend allows
	labels     []string
	allowCompl bool
	allowEmbed bool
	pinCompl   pinTrees
	pinEmbed   pinTrees
	share      int
	state      *tenantState // pooled by frontend and tenant name (tenantusage.go)
}

// keyDigest is one configured key, as its SHA-256.
type keyDigest struct {
	sum    [sha256.Size]byte
	tenant *Tenant
}

// provision validates the tenants, applies their defaults and hashes
// their keys. It takes no pooled state: acquire does, once the whole
// handler is valid.
func (ts *Tenants) provision(h *Handler) error {
	if ts.KeyHeader != "" {
		if !validHeaderName(ts.KeyHeader) {
			return fmt.Errorf("key_header: invalid header name %q", ts.KeyHeader)
		}
		ts.keyHeader = http.CanonicalHeaderKey(ts.KeyHeader)
	}
	if ts.Identity != "" && !placeholderRE.MatchString(ts.Identity) {
		return fmt.Errorf("identity: %q is not a placeholder; name one an authentication handler sets, such as {http.auth.user.id}", ts.Identity)
	}
	if len(ts.List) == 0 {
		return errors.New("tenants: name at least one tenant")
	}
	if err := ts.Distributed.provision(); err != nil {
		return err
	}
	ts.byName = make(map[string]*Tenant, len(ts.List))
	owner := make(map[[sha256.Size]byte]string)
	for i, t := range ts.List {
		if t == nil {
			return fmt.Errorf("tenants: list[%d]: empty tenant", i)
		}
		if !validName(t.Name) {
			return fmt.Errorf("tenant %q: name must be letters, digits, '.', '_' or '-'", t.Name)
		}
		if ts.byName[t.Name] != nil {
			return fmt.Errorf("tenant %q: duplicate tenant name", t.Name)
		}
		ts.byName[t.Name] = t
		if err := t.provision(h); err != nil {
			return fmt.Errorf("tenant %q: %w", t.Name, err)
		}
		if len(t.Keys) == 0 && ts.Identity == "" {
			return fmt.Errorf("tenant %q: no key, and the tenants block has no identity: nobody could be this tenant", t.Name)
		}
		for k, raw := range t.Keys {
			sum, err := keySum(raw)
			if err != nil {
				return fmt.Errorf("tenant %q: key %d: %w", t.Name, k+1, err)
			}
			if other, dup := owner[sum]; dup {
				// Never the key itself: the error may end up in a log.
				return fmt.Errorf("tenant %q: key %d is also a key of tenant %q; a key names one tenant", t.Name, k+1, other)
			}
			owner[sum] = t.Name
			if !strings.HasPrefix(raw, "sha256:") && !placeholderRE.MatchString(raw) {
				h.logger.Warn("tenant key written in clear in the config, where the admin API shows it; use a placeholder ({env.NAME}) or sha256:<hex>",
					zap.String("frontend", h.Name), zap.String("tenant", t.Name), zap.Int("key", k+1))
			}
			ts.digests = append(ts.digests, keyDigest{sum: sum, tenant: t})
		}
	}
	return nil
}

// keySum is the SHA-256 of a configured key: sha256:<hex> as given, or a
// key in clear (placeholders replaced) hashed.
func keySum(raw string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	if hexSum, ok := strings.CutPrefix(raw, "sha256:"); ok {
		b, err := hex.DecodeString(hexSum)
		if err != nil || len(b) != sha256.Size {
			return sum, errors.New("sha256: want 64 hex digits, the SHA-256 of the key (printf %s KEY | sha256sum)")
		}
		copy(sum[:], b)
		return sum, nil
	}
	key, err := resolvePlaceholders("key", raw)
	if err != nil {
		return sum, err
	}
	if key == "" {
		return sum, errors.New("empty key")
	}
	return sha256.Sum256([]byte(key)), nil
}

// provision applies a tenant's defaults and compiles its policy.
func (t *Tenant) provision(h *Handler) error {
	for opt, n := range map[string]int{"requests_per_minute": t.RequestsPerMinute, "tokens_per_minute": t.TokensPerMinute, "max_parallel": t.MaxParallel} {
		if n < 0 {
			return fmt.Errorf("%s: must not be negative, got %d", opt, n)
		}
		if n > maxRate {
			return fmt.Errorf("%s: must be at most %d, got %d", opt, maxRate, n)
		}
	}
	if t.Share < 0 {
		return fmt.Errorf("share: must not be negative, got %d", t.Share)
	}
	t.share = t.Share
	if t.share == 0 {
		t.share = 1
	}
	if len(t.Models) > 0 {
		t.models = make(map[string]struct{}, len(t.Models))
		for _, m := range t.Models {
			if strings.TrimSpace(m) == "" {
				return errors.New("models: empty model name")
			}
			key := normalizeModel(m)
			if !h.modelAllowed(key) {
				return fmt.Errorf("models: %q is not among the frontend's models; a tenant can only narrow them", m)
			}
			t.models[key] = struct{}{}
		}
	}
	t.labels = normalizeLabels(t.Labels)
	t.allowCompl = t.AllowCompletions == nil || *t.AllowCompletions
	t.allowEmbed = t.AllowEmbeddings == nil || *t.AllowEmbeddings
	var err error
	var warns, more []string
	if t.pinCompl, warns, err = compilePins(t.PinCompletions, "pin_completions", kindCompletion); err != nil {
		return err
	}
	if t.pinEmbed, more, err = compilePins(t.PinEmbeddings, "pin_embeddings", kindEmbedding); err != nil {
		return err
	}
	for _, w := range append(warns, more...) {
		h.logger.Warn("pin does not apply on every API", zap.String("frontend", h.Name), zap.String("tenant", t.Name), zap.String("pin", w))
	}
	return nil
}

// modelAllowed reports whether the tenant may use the normalised model.
// A nil tenant (tenancy off) may use any.
func (t *Tenant) modelAllowed(key string) bool {
	if t == nil || t.models == nil {
		return true
	}
	_, ok := t.models[key]
	return ok
}

// pinsFor returns the tenant's pins for requests of kind in vocabulary v;
// a nil tenant has none.
func (t *Tenant) pinsFor(kind routeKind, v vocab) *pins {
	if t == nil {
		return nil
	}
	return choosePins(kind, v, &t.pinCompl, &t.pinEmbed)
}

// allows reports whether the tenant may make requests of kind.
func (t *Tenant) allows(kind routeKind) bool {
	switch {
	case t == nil:
		return true
	case kind == kindCompletion:
		return t.allowCompl
	case kind == kindEmbedding:
		return t.allowEmbed
	}
	return true
}

// tenantKey is the request context key of the request's *Tenant.
type tenantKey struct{}

// tenantOf is the tenant a request was found to be, nil when the frontend
// has no tenants. The queue reads it for fair share.
func tenantOf(ctx context.Context) *Tenant {
	t, _ := ctx.Value(tenantKey{}).(*Tenant)
	return t
}

// Why a request names no tenant; each is answered 401.
var (
	errNoKey          = errors.New("missing API key: send it as Authorization: Bearer <key> or in the X-Api-Key header")
	errUnknownKey     = errors.New("invalid API key: no tenant of this frontend has it; check the key you were given")
	errUnknownIdenity = errors.New("the authenticated user is not a tenant of this frontend")
)

// identify finds the tenant a request names, by identity placeholder,
// then key. The headers that carried a key are deleted from the request
// whatever the outcome, so that neither a backend nor a later handler
// sees them. (Caddy's access log logs a copy of the headers taken before
// any handler runs: it redacts Authorization, and X-Api-Key needs the
// README's log filter.)
func (ts *Tenants) identify(r *http.Request) (*Tenant, error) {
	key, present := ts.presentedKey(r)
	ts.dropKeyHeaders(r)
	if ts.Identity != "" {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			if name := repl.ReplaceKnown(ts.Identity, ""); name != "" {
				if t := ts.byName[name]; t != nil {
					return t, nil
				}
				return nil, errUnknownIdenity
			}
		}
	}
	if !present {
		return nil, errNoKey
	}
	return ts.byKey(key), nil
}

// byKey finds the tenant whose key is key, or nil. Every digest is
// compared, in constant time, and the match is selected without a branch.
func (ts *Tenants) byKey(key string) *Tenant {
	sum := sha256.Sum256([]byte(key))
	match := -1
	for i := range ts.digests {
		eq := subtle.ConstantTimeCompare(sum[:], ts.digests[i].sum[:])
		match = subtle.ConstantTimeSelect(eq, i, match)
	}
	if match < 0 {
		return nil
	}
	return ts.digests[match].tenant
}

// presentedKey is the key a request carries: in key_header if set, else
// a Bearer Authorization (Basic credentials are basic_auth's, not a key),
// else X-Api-Key.
func (ts *Tenants) presentedKey(r *http.Request) (string, bool) {
	if ts.keyHeader != "" && ts.keyHeader != "Authorization" {
		k := strings.TrimSpace(r.Header.Get(ts.keyHeader))
		return k, k != ""
	}
	if k, ok := bearer(r.Header.Get("Authorization")); ok {
		return k, true
	}
	if ts.keyHeader == "Authorization" {
		return "", false
	}
	k := strings.TrimSpace(r.Header.Get("X-Api-Key"))
	return k, k != ""
}

func bearer(v string) (string, bool) {
	const prefix = "bearer "
	if len(v) <= len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", false
	}
	k := strings.TrimSpace(v[len(prefix):])
	return k, k != ""
}

// keyHeaders are the request headers keys are read from.
func (ts *Tenants) keyHeaders() []string {
	if ts.keyHeader != "" {
		return []string{ts.keyHeader}
	}
	return []string{"Authorization", "X-Api-Key"}
}

func (ts *Tenants) dropKeyHeaders(r *http.Request) {
	for _, k := range ts.keyHeaders() {
		r.Header.Del(k)
	}
}

// Options that may repeat in a tenant block; their values accumulate.
var repeatableTenantOptions = map[string]bool{"key": true, "models": true, "labels": true}

// UnmarshalCaddyfile sets up the tenants block from Caddyfile tokens.
// Syntax:
//
//	tenants {
//		key_header <header>
//		identity   <placeholder>
//		distributed [<interval>]
//		tenant <name> {
//			# see Tenant.UnmarshalCaddyfile
//		}
//	}
//
// tenant may repeat; key_header, identity and distributed may be given
// once.
func (ts *Tenants) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume "tenants"
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	names := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && opt != "tenant" {
			return d.Errf("duplicate tenants option '%s'", opt)
		}
		seen[opt] = true
		var err error
		switch opt {
		case "key_header":
			ts.KeyHeader, err = oneArg(d)
			if err == nil && !validHeaderName(ts.KeyHeader) {
				err = d.Errf("key_header: invalid header name '%s'", ts.KeyHeader)
			}
		case "identity":
			ts.Identity, err = oneArg(d)
			if err == nil && !placeholderRE.MatchString(ts.Identity) {
				err = d.Errf("identity: '%s' is not a placeholder; name one an authentication handler sets, such as {http.auth.user.id}", ts.Identity)
			}
		case "distributed":
			ts.Distributed, err = parseDistributed(d)
		case "tenant":
			var t *Tenant
			t, err = parseTenantSegment(d, names)
			if t != nil {
				ts.List = append(ts.List, t)
			}
		default:
			return unrecognized(d, "tenants")
		}
		if err != nil {
			return err
		}
	}
	if len(ts.List) == 0 {
		d.Reset()
		d.Next()
		return d.Err("tenants: name at least one tenant (tenant <name> { key <key> })")
	}
	return nil
}

// parseTenantSegment parses the tenant line (and its block) under the
// cursor, rejecting a name already used in this block.
func parseTenantSegment(d *caddyfile.Dispenser, names map[string]bool) (*Tenant, error) {
	sub := caddyfile.NewDispenser(d.NextSegment())
	t := new(Tenant)
	if err := t.UnmarshalCaddyfile(sub); err != nil {
		if t.Name != "" {
			return nil, fmt.Errorf("tenant '%s': %w", t.Name, err)
		}
		return nil, err
	}
	if names[t.Name] {
		sub.Reset()
		sub.Next()
		sub.NextArg()
		return nil, sub.Errf("duplicate tenant name '%s'", t.Name)
	}
	names[t.Name] = true
	return t, nil
}

// UnmarshalCaddyfile sets up a tenant from Caddyfile tokens. Syntax:
//
//	tenant <name> {
//		key                 <key>|sha256:<hex>
//		models              <model...>
//		labels              <label...>
//		allow_completions   [true|false]
//		allow_embeddings    [true|false]
//		pin_completions     <json-object> | { <path> <value> ... }
//		pin_embeddings      <json-object> | { <path> <value> ... }
//		requests_per_minute <count>
//		tokens_per_minute   <count>
//		max_parallel        <count>
//		share               <weight>
//		priority            <class>
//	}
//
// key, models and labels may repeat; every other option may be given
// once. A key in clear should come from a placeholder ({env.TEAM_A_KEY})
// so the Caddyfile and the JSON config hold no secret; sha256:<hex> is the
// key's SHA-256. The limits take 0 for none; share is at least 1.
func (t *Tenant) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume "tenant"
	if !d.Args(&t.Name) {
		return d.ArgErr()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	if !validName(t.Name) {
		return d.Errf("tenant name '%s': use letters, digits, '.', '_' or '-'", t.Name)
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && !repeatableTenantOptions[opt] {
			return d.Errf("duplicate tenant option '%s'", opt)
		}
		seen[opt] = true
		var err error
		switch opt {
		case "key":
			var k string
			if k, err = oneArg(d); err == nil {
				if strings.HasPrefix(k, "sha256:") {
					if _, kerr := keySum(k); kerr != nil {
						err = d.Errf("key: %v", kerr)
					}
				}
				t.Keys = append(t.Keys, k)
			}
		case "models":
			var models []string
			models, err = someArgs(d)
			t.Models = append(t.Models, models...)
		case "labels":
			var labels []string
			labels, err = someArgs(d)
			t.Labels = append(t.Labels, labels...)
		case "allow_completions":
			t.AllowCompletions, err = parseFlagPtr(d)
		case "allow_embeddings":
			t.AllowEmbeddings, err = parseFlagPtr(d)
		case "pin_completions":
			t.PinCompletions, err = parsePinOption(d)
		case "pin_embeddings":
			t.PinEmbeddings, err = parsePinOption(d)
		case "requests_per_minute":
			t.RequestsPerMinute, err = parseInt(d, 0)
		case "tokens_per_minute":
			t.TokensPerMinute, err = parseInt(d, 0)
		case "max_parallel":
			t.MaxParallel, err = parseInt(d, 0)
		case "share":
			t.Share, err = parseInt(d, 1)
		case "priority":
			t.Priority, err = parseInt(d, math.MinInt32)
		default:
			return unrecognized(d, "tenant")
		}
		if err != nil {
			return err
		}
	}
	return nil
}
