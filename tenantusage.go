package ollamaflow

// Tenant limits and usage (issue 12): the counters behind
// requests_per_minute, tokens_per_minute and max_parallel, the
// x-ratelimit-* headers, and what GET /ollamaflow/usage reports.
//
// Both per-minute limits are the generic cell rate algorithm, which is a
// token bucket kept as one timestamp: a bucket holds up to the limit and
// refills continuously at the limit per minute. A request takes one
// request from its bucket, or is refused with the wait until one is back;
// so N requests at once pass while N <= requests_per_minute, and then one
// more passes every minute/requests_per_minute. Tokens are only known when
// an answer ends: they are charged then, and may overdraw the bucket; a
// request is admitted while at least one token is left. The state is
// pooled by frontend and tenant name, so a reload keeps it.

import (
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// window is the period the per-minute limits refill over.
const window = int64(time.Minute)

// maxDebt bounds how far charged tokens can push a bucket into the future,
// so a wild count from a backend cannot overflow the arithmetic.
const maxDebt = int64(24 * time.Hour)

// bucket is a GCRA limiter: tat is the moment (Unix ns) its bucket is
// full again. Its limit is passed in, from the config that serves the
// request.
type bucket struct{ tat int64 }

func interval(limit int) int64 { return window / int64(limit) }

// level is the used part of the bucket, as the time it takes to refill.
func (b *bucket) level(now int64) int64 { return max(0, b.tat-now) }

// remaining is the whole units left in the bucket.
func (b *bucket) remaining(now int64, limit int) int64 {
	return min(max(0, (window-b.level(now))/interval(limit)), int64(limit))
}

// take takes n units if they fit, else reports how long until they do.
func (b *bucket) take(now int64, n int64, limit int) (time.Duration, bool) {
	wait, ok := b.fits(now, n, limit)
	if ok {
		b.tat = now + b.level(now) + n*interval(limit)
	}
	return wait, ok
}

// fits reports whether n units are left, else how long until they are.
func (b *bucket) fits(now int64, n int64, limit int) (time.Duration, bool) {
	need := b.level(now) + n*interval(limit)
	if need > window {
		return time.Duration(need - window), false
	}
	return 0, true
}

// charge takes n units whether they fit or not: tokens counted after an
// answer, or used on other instances.
func (b *bucket) charge(now int64, n int64, limit int) {
	if n <= 0 {
		return
	}
	iv := interval(limit)
	add := maxDebt
	if n < maxDebt/iv {
		add = n * iv
	}
	b.tat = now + min(b.level(now)+add, maxDebt)
}

// tenantState is one tenant's live counters on one frontend: its buckets,
// requests in flight, and usage. Pooled by frontend and tenant name; the
// frontend's own entry (tenant "") counts the requests that named no
// tenant.
type tenantState struct {
	mu       sync.Mutex
	requests bucket
	tokens   bucket
	inFlight int
	since    time.Time
	total    usageCounts
	minute   usageCounts
	// minuteStart is the Unix minute the minute counts are for.
	minuteStart int64
	// Consumption not yet handed to localDelta (distributed counters).
	unsyncedRequests, unsyncedTokens int64
}

// usageCounts is what a tenant did over a period.
type usageCounts struct {
	requests   map[int]int64          // by status code
	tokens     map[string]*tokenCount // by model
	rejections map[string]int64       // by reason
}

type tokenCount struct {
	Prompt     int64 `json:"prompt"`
	Completion int64 `json:"completion"`
}

// Reasons a tenant's request was refused, the keys of usage rejections.
const (
	rejectUnauthorized = "unauthorized" // counted per frontend: no tenant is known
	rejectRequests     = "requests_per_minute"
	rejectTokens       = "tokens_per_minute"
	rejectParallel     = "max_parallel"
	rejectModel        = "model"
	rejectRequestType  = "request_type"
)

func (c *usageCounts) addRequest(status int) {
	if c.requests == nil {
		c.requests = make(map[int]int64)
	}
	c.requests[status]++
}

func (c *usageCounts) addTokens(model string, prompt, completion int64) {
	if c.tokens == nil {
		c.tokens = make(map[string]*tokenCount)
	}
	tc := c.tokens[model]
	if tc == nil {
		tc = new(tokenCount)
		c.tokens[model] = tc
	}
	tc.Prompt += prompt
	tc.Completion += completion
}

func (c *usageCounts) addRejection(reason string) {
	if c.rejections == nil {
		c.rejections = make(map[string]int64)
	}
	c.rejections[reason]++
}

// roll starts a new minute's counts when the clock has moved past the
// current one. Called with mu held.
func (s *tenantState) roll(now time.Time) {
	if m := now.Unix() / 60; m != s.minuteStart {
		s.minuteStart, s.minute = m, usageCounts{}
	}
}

// admit decides whether the tenant may start a request now: its
// max_parallel, then its tokens, then its requests (the only one that
// takes something). It returns "" and counts the request in flight, or
// the reason it is refused and how long to wait.
func (s *tenantState) admit(t *Tenant, now time.Time) (string, time.Duration) {
	ns := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	reason, wait := "", time.Duration(0)
	if t.MaxParallel > 0 && s.inFlight >= t.MaxParallel {
		reason, wait = rejectParallel, time.Second
	} else if w, ok := s.tokensFit(t, ns); !ok {
		reason, wait = rejectTokens, w
	} else if t.RequestsPerMinute > 0 {
		if w, ok := s.requests.take(ns, 1, t.RequestsPerMinute); !ok {
			reason, wait = rejectRequests, w
		}
	}
	if reason != "" {
		s.roll(now)
		s.total.addRejection(reason)
		s.minute.addRejection(reason)
		return reason, wait
	}
	s.inFlight++
	s.unsyncedRequests++
	return "", 0
}

func (s *tenantState) tokensFit(t *Tenant, ns int64) (time.Duration, bool) {
	if t.TokensPerMinute == 0 {
		return 0, true
	}
	return s.tokens.fits(ns, 1, t.TokensPerMinute)
}

// rateHeaders sets OpenAI's x-ratelimit-* headers for the limits the
// tenant has, as they stand now.
func (s *tenantState) rateHeaders(t *Tenant, hdr http.Header, now time.Time) {
	ns := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.RequestsPerMinute > 0 {
		hdr.Set("X-Ratelimit-Limit-Requests", strconv.Itoa(t.RequestsPerMinute))
		hdr.Set("X-Ratelimit-Remaining-Requests", strconv.FormatInt(s.requests.remaining(ns, t.RequestsPerMinute), 10))
		hdr.Set("X-Ratelimit-Reset-Requests", resetString(s.requests.level(ns)))
	}
	if t.TokensPerMinute > 0 {
		hdr.Set("X-Ratelimit-Limit-Tokens", strconv.Itoa(t.TokensPerMinute))
		hdr.Set("X-Ratelimit-Remaining-Tokens", strconv.FormatInt(s.tokens.remaining(ns, t.TokensPerMinute), 10))
		hdr.Set("X-Ratelimit-Reset-Tokens", resetString(s.tokens.level(ns)))
	}
}

// resetString is a time until reset as OpenAI writes it (6m0s, 1.5s,
// 20ms), rounded up to the millisecond.
func resetString(ns int64) string {
	d := time.Duration(ns)
	if r := d % time.Millisecond; r != 0 {
		d += time.Millisecond - r
	}
	return d.String()
}

// finish records the end of a request: in flight no more (if admitted),
// its status, and the tokens its answer counted, charged to the tokens
// bucket.
func (s *tenantState) finish(t *Tenant, admitted bool, status int, model string, prompt, completion int64, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if admitted {
		s.inFlight--
	}
	s.roll(now)
	s.total.addRequest(status)
	s.minute.addRequest(status)
	if prompt+completion > 0 && model != "" {
		s.total.addTokens(model, prompt, completion)
		s.minute.addTokens(model, prompt, completion)
		s.unsyncedTokens += prompt + completion
		if t.TokensPerMinute > 0 {
			s.tokens.charge(now.UnixNano(), prompt+completion, t.TokensPerMinute)
		}
	}
}

// reject counts a refusal decided outside admit: a model or request type
// the tenant may not use, or (on the frontend's entry) a request without
// a tenant.
func (s *tenantState) reject(reason string, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.roll(now)
	s.total.addRejection(reason)
	s.minute.addRejection(reason)
}

// localDelta returns the requests and tokens this instance admitted and
// charged since the last call: what a distributed sync publishes.
func (s *tenantState) localDelta() (requests, tokens int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	requests, tokens = s.unsyncedRequests, s.unsyncedTokens
	s.unsyncedRequests, s.unsyncedTokens = 0, 0
	return requests, tokens
}

// addRemote charges the buckets with what other instances used since the
// last sync, so that N instances enforce one limit per tenant.
func (s *tenantState) addRemote(t *Tenant, requests, tokens int64, now time.Time) {
	ns := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.RequestsPerMinute > 0 {
		s.requests.charge(ns, requests, t.RequestsPerMinute)
	}
	if t.TokensPerMinute > 0 {
		s.tokens.charge(ns, tokens, t.TokensPerMinute)
	}
}

// tenantPool holds each frontend's and tenant's state, keyed by
// tenantPoolKey, shared by the old and the new config across a reload.
var tenantPool = caddy.NewUsagePool()

type pooledTenant struct{ *tenantState }

func (pooledTenant) Destruct() error { return nil }

func tenantPoolKey(frontend, tenant string) string { return frontend + "\x00" + tenant }

func acquireTenantState(key string) *tenantState {
	v, _, _ := tenantPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return pooledTenant{&tenantState{since: time.Now()}}, nil
	})
	return v.(pooledTenant).tenantState
}

// acquireTenants takes the pooled state of the frontend and of each
// tenant; releaseTenants gives it back.
func (h *Handler) acquireTenants() {
	if h.Tenants == nil {
		return
	}
	key := tenantPoolKey(h.Name, "")
	h.tenantsState = acquireTenantState(key)
	h.tenantKeys = append(h.tenantKeys, key)
	for _, t := range h.Tenants.List {
		key := tenantPoolKey(h.Name, t.Name)
		t.state = acquireTenantState(key)
		h.tenantKeys = append(h.tenantKeys, key)
	}
}

func (h *Handler) releaseTenants() {
	for _, k := range h.tenantKeys {
		_, _ = tenantPool.Delete(k)
	}
	h.tenantKeys = nil
}

// admitTenant finds the request's tenant and applies its limits. It
// answers 401 (no tenant) or 429 (over a limit) itself and then returns
// false. Every answer of a tenant with limits carries the x-ratelimit-*
// headers.
func (h *Handler) admitTenant(w http.ResponseWriter, r *http.Request, api apiFormat, info *requestInfo) (*Tenant, bool) {
	t, err := h.Tenants.identify(r)
	now := time.Now()
	if t == nil {
		if err == nil {
			err = errUnknownKey
		}
		h.tenantsState.reject(rejectUnauthorized, now)
		w.Header().Set("WWW-Authenticate", "Bearer")
		_ = h.failCode(w, api, http.StatusUnauthorized, "invalid_api_key", err.Error())
		return nil, false
	}
	info.tenant = t
	setPlaceholder(r, placeholderTenant, t.Name)
	reason, wait := t.state.admit(t, now)
	t.state.rateHeaders(t, w.Header(), now)
	if reason == "" {
		info.admitted = true
		return t, true
	}
	secs := int64((wait + time.Second - 1) / time.Second)
	w.Header().Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
	var msg string
	switch reason {
	case rejectParallel:
		msg = "tenant " + strconv.Quote(t.Name) + " already has " + strconv.Itoa(t.MaxParallel) + " requests in flight (max_parallel); retry when one finishes"
	case rejectTokens:
		msg = "tenant " + strconv.Quote(t.Name) + " has used its " + strconv.Itoa(t.TokensPerMinute) + " tokens per minute (tokens_per_minute); retry in " + resetString(int64(wait))
	default:
		msg = "tenant " + strconv.Quote(t.Name) + " has made its " + strconv.Itoa(t.RequestsPerMinute) + " requests per minute (requests_per_minute); retry in " + resetString(int64(wait))
	}
	_ = h.failCode(w, api, http.StatusTooManyRequests, "rate_limit_exceeded", msg)
	return nil, false
}

// rejectTenant answers 403 for a tenant's policy and counts the refusal.
func (h *Handler) rejectTenant(w http.ResponseWriter, api apiFormat, info *requestInfo, reason, msg string) error {
	info.tenant.state.reject(reason, time.Now())
	return h.fail(w, api, http.StatusForbidden, msg)
}

// finishTenant records a tenant's request once it is answered: status,
// tokens, and the slot of max_parallel.
func (h *Handler) finishTenant(w *statusWriter, info *requestInfo) {
	t := info.tenant
	if t == nil {
		return
	}
	status := w.status
	if status == 0 {
		status = 499 // the client went away before anything was written
	}
	prompt, completion := max(info.inputTokens, 0), max(info.outputTokens, 0)
	model := info.model
	if prompt+completion == 0 {
		model = ""
	}
	t.state.finish(t, info.admitted, status, model, prompt, completion, time.Now())
	metrics.tenantRequests.WithLabelValues(h.Name, t.Name, strconv.Itoa(status)).Inc()
	if model != "" {
		// info.model carries tokens only from an answer a backend served:
		// a model it has, never a name a client made up.
		if prompt > 0 {
			metrics.tenantTokens.WithLabelValues(h.Name, t.Name, model, "prompt").Add(float64(prompt))
		}
		if completion > 0 {
			metrics.tenantTokens.WithLabelValues(h.Name, t.Name, model, "completion").Add(float64(completion))
		}
	}
}

// Usage report of GET /ollamaflow/usage.
type (
	usageReport struct {
		Frontends []frontendUsage `json:"frontends"`
	}
	frontendUsage struct {
		Frontend string `json:"frontend"`
		// Unauthorized counts requests that named no tenant (401).
		Unauthorized struct {
			Total  int64 `json:"total"`
			Minute int64 `json:"minute"`
		} `json:"unauthorized"`
		Tenants []tenantUsage `json:"tenants"`
	}
	tenantUsage struct {
		Tenant    string       `json:"tenant"`
		Since     time.Time    `json:"since"`
		Limits    tenantLimits `json:"limits"`
		InFlight  int          `json:"in_flight"`
		Remaining tenantRemain `json:"remaining"`
		Total     usagePeriod  `json:"total"`
		Minute    usagePeriod  `json:"minute"`
		Share     int          `json:"share"`
		Priority  int          `json:"priority"`
		Models    []string     `json:"models,omitempty"`
		Labels    []string     `json:"labels,omitempty"`
	}
	tenantLimits struct {
		RequestsPerMinute int `json:"requests_per_minute"`
		TokensPerMinute   int `json:"tokens_per_minute"`
		MaxParallel       int `json:"max_parallel"`
	}
	// tenantRemain is what is left of each per-minute limit now; absent
	// for a limit the tenant does not have.
	tenantRemain struct {
		Requests *int64 `json:"requests,omitempty"`
		Tokens   *int64 `json:"tokens,omitempty"`
	}
	usagePeriod struct {
		Start            time.Time             `json:"start"`
		Requests         int64                 `json:"requests"`
		ByStatus         map[string]int64      `json:"by_status"`
		PromptTokens     int64                 `json:"prompt_tokens"`
		CompletionTokens int64                 `json:"completion_tokens"`
		ByModel          map[string]tokenCount `json:"by_model"`
		Rejections       map[string]int64      `json:"rejections"`
	}
)

func (c *usageCounts) report(start time.Time) usagePeriod {
	p := usagePeriod{Start: start, ByStatus: map[string]int64{}, ByModel: map[string]tokenCount{}, Rejections: map[string]int64{}}
	for code, n := range c.requests {
		p.ByStatus[strconv.Itoa(code)] = n
		p.Requests += n
	}
	for m, tc := range c.tokens {
		p.ByModel[m] = *tc
		p.PromptTokens += tc.Prompt
		p.CompletionTokens += tc.Completion
	}
	for r, n := range c.rejections {
		p.Rejections[r] = n
	}
	return p
}

// usage reports a tenant's state now.
func (s *tenantState) usage(t *Tenant, now time.Time) tenantUsage {
	ns := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.roll(now)
	u := tenantUsage{
		Tenant:   t.Name,
		Since:    s.since,
		Limits:   tenantLimits{RequestsPerMinute: t.RequestsPerMinute, TokensPerMinute: t.TokensPerMinute, MaxParallel: t.MaxParallel},
		InFlight: s.inFlight,
		Total:    s.total.report(s.since),
		Minute:   s.minute.report(time.Unix(s.minuteStart*60, 0).UTC()),
		Share:    t.share,
		Priority: t.Priority,
		Labels:   t.labels,
	}
	for m := range t.models {
		u.Models = append(u.Models, m)
	}
	sort.Strings(u.Models)
	if t.RequestsPerMinute > 0 {
		n := s.requests.remaining(ns, t.RequestsPerMinute)
		u.Remaining.Requests = &n
	}
	if t.TokensPerMinute > 0 {
		n := s.tokens.remaining(ns, t.TokensPerMinute)
		u.Remaining.Tokens = &n
	}
	return u
}

// usageStatus is the usage of every live frontend with tenants, the
// newest config's view of each frontend name.
func usageStatus() usageReport {
	now := time.Now()
	newest := map[string]*Handler{}
	var names []string
	for _, h := range liveFrontends() { // sorted by name, newest last
		if h.Tenants == nil || h.tenantsState == nil {
			continue
		}
		if newest[h.Name] == nil {
			names = append(names, h.Name)
		}
		newest[h.Name] = h
	}
	rep := usageReport{Frontends: []frontendUsage{}}
	for _, name := range names {
		h := newest[name]
		fu := frontendUsage{Frontend: name, Tenants: []tenantUsage{}}
		s := h.tenantsState
		s.mu.Lock()
		s.roll(now)
		fu.Unauthorized.Total = s.total.rejections[rejectUnauthorized]
		fu.Unauthorized.Minute = s.minute.rejections[rejectUnauthorized]
		s.mu.Unlock()
		for _, t := range h.Tenants.List {
			fu.Tenants = append(fu.Tenants, t.state.usage(t, now))
		}
		rep.Frontends = append(rep.Frontends, fu)
	}
	return rep
}
