package ollamaflow

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

func sumHex(key string) string {
	s := sha256.Sum256([]byte(key))
	return hex.EncodeToString(s[:])
}

// A bucket of 3 a minute: three at once, then one every 20s; the
// remaining count and the reset follow.
func TestBucketRequestsPerMinute(t *testing.T) {
	var b bucket
	now := time.Unix(1000, 0).UnixNano()
	const limit = 3
	assert.EqualValues(t, 3, b.remaining(now, limit))
	for i := 0; i < 3; i++ {
		_, ok := b.take(now, 1, limit)
		require.True(t, ok, "request %d of a full bucket", i+1)
		assert.EqualValues(t, 2-i, b.remaining(now, limit))
	}
	assert.Equal(t, time.Minute, time.Duration(b.level(now)), "empty: a whole minute to full")
	wait, ok := b.take(now, 1, limit)
	assert.False(t, ok)
	assert.Equal(t, 20*time.Second, wait, "the next one is back in a minute/3")
	_, ok = b.take(now+int64(20*time.Second)-1, 1, limit)
	assert.False(t, ok, "not a nanosecond early")
	_, ok = b.take(now+int64(20*time.Second), 1, limit)
	assert.True(t, ok)
	assert.EqualValues(t, 3, b.remaining(now+int64(2*time.Minute), limit), "never more than the limit")
}

// Limits that do not divide a minute still allow the whole burst.
func TestBucketUnevenLimit(t *testing.T) {
	for _, limit := range []int{7, 13, 999_983, maxRate} {
		var b bucket
		now := int64(5e18)
		n := 0
		for ; n <= limit && n < 2_000_000; n++ {
			if _, ok := b.take(now, 1, limit); !ok {
				break
			}
		}
		if limit <= 2_000_000 {
			assert.Equal(t, limit, n, "a full bucket of %d", limit)
		}
	}
}

// Tokens are charged after the fact and may overdraw the bucket; a request
// fits again once one token is back. A huge count is capped.
func TestBucketChargeOverdraws(t *testing.T) {
	var b bucket
	now := int64(0)
	const limit = 60 // one a second
	b.charge(now, 90, limit)
	assert.EqualValues(t, 0, b.remaining(now, limit))
	wait, ok := b.fits(now, 1, limit)
	assert.False(t, ok)
	assert.Equal(t, 31*time.Second, wait, "30 tokens over, plus one to fit")
	_, ok = b.fits(now+int64(31*time.Second), 1, limit)
	assert.True(t, ok)
	b.charge(now, 1<<62, limit)
	assert.Equal(t, maxDebt, b.level(now), "capped, no overflow")
	b.charge(now, 0, limit)
	b.charge(now, -5, limit)
	assert.Equal(t, maxDebt, b.level(now), "nothing charged for no tokens")
}

func TestResetString(t *testing.T) {
	assert.Equal(t, "0s", resetString(0))
	assert.Equal(t, "1ms", resetString(1))
	assert.Equal(t, "20s", resetString(int64(20*time.Second)))
	assert.Equal(t, "1m0.001s", resetString(int64(time.Minute)+1))
}

// The counts a distributed sync reads and adds.
func TestTenantStateDeltasAndRemote(t *testing.T) {
	s := &tenantState{}
	ten := &Tenant{Name: "x", RequestsPerMinute: 10, TokensPerMinute: 100}
	now := time.Unix(1_000_000, 0)
	for i := 0; i < 3; i++ {
		reason, _ := s.admit(ten, now)
		require.Empty(t, reason)
	}
	s.finish(ten, true, 200, "m:latest", 7, 5, now)
	reqs, toks := s.localDelta()
	assert.EqualValues(t, 3, reqs)
	assert.EqualValues(t, 12, toks)
	reqs, toks = s.localDelta()
	assert.Zero(t, reqs+toks, "a delta is handed out once")

	s.addRemote(ten, 6, 88, now)
	assert.EqualValues(t, 1, s.requests.remaining(now.UnixNano(), 10), "3 here and 6 elsewhere of 10")
	assert.EqualValues(t, 0, s.tokens.remaining(now.UnixNano(), 100))
	reason, _ := s.admit(ten, now)
	assert.Equal(t, rejectTokens, reason, "12 here and 88 elsewhere use up 100")
	assert.Equal(t, 2, s.inFlight, "three admitted, one finished")
	u := s.usage(ten, now)
	assert.EqualValues(t, 1, u.Total.Rejections[rejectTokens])
	assert.EqualValues(t, 7, u.Total.ByModel["m:latest"].Prompt)
	assert.EqualValues(t, 1, u.Total.ByStatus["200"])
	assert.EqualValues(t, 7, u.Minute.PromptTokens)

	// A new minute starts the minute's counts afresh; the totals stay.
	u = s.usage(ten, now.Add(time.Minute))
	assert.Zero(t, u.Minute.Requests)
	assert.EqualValues(t, 1, u.Total.Requests)
}

func TestTenantMaxParallel(t *testing.T) {
	s := &tenantState{}
	ten := &Tenant{Name: "x", MaxParallel: 2}
	now := time.Now()
	r1, _ := s.admit(ten, now)
	r2, _ := s.admit(ten, now)
	r3, wait := s.admit(ten, now)
	assert.Empty(t, r1+r2)
	assert.Equal(t, rejectParallel, r3)
	assert.Equal(t, time.Second, wait)
	s.finish(ten, true, 200, "", 0, 0, now)
	r4, _ := s.admit(ten, now)
	assert.Empty(t, r4, "a finished request gives its place back")
	s.finish(ten, false, 429, "", 0, 0, now)
	assert.Equal(t, 2, s.inFlight, "a refused request held no place")
}

func TestPresentedKey(t *testing.T) {
	cases := []struct {
		keyHeader string
		hdr       []string
		want      string
		ok        bool
	}{
		{"", []string{"Authorization", "Bearer k1"}, "k1", true},
		{"", []string{"Authorization", "bearer   k1  "}, "k1", true},
		{"", []string{"Authorization", "BEARER k1"}, "k1", true},
		{"", []string{"Authorization", "Bearer "}, "", false},
		{"", []string{"Authorization", "Bearerk1"}, "", false},
		{"", []string{"Authorization", "Basic abc", "X-Api-Key", "k2"}, "k2", true},
		{"", []string{"Authorization", "Bearer k1", "X-Api-Key", "k2"}, "k1", true},
		{"", []string{"X-Api-Key", " k2 "}, "k2", true},
		{"", nil, "", false},
		{"X-Team-Key", []string{"X-Team-Key", "k3", "Authorization", "Bearer k1"}, "k3", true},
		{"X-Team-Key", []string{"Authorization", "Bearer k1"}, "", false},
		{"Authorization", []string{"X-Api-Key", "k2"}, "", false},
		{"authorization", []string{"Authorization", "Bearer k1"}, "k1", true},
	}
	for _, tc := range cases {
		ts := &Tenants{KeyHeader: tc.keyHeader}
		if tc.keyHeader != "" {
			ts.keyHeader = http.CanonicalHeaderKey(tc.keyHeader)
		}
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		for i := 0; i+1 < len(tc.hdr); i += 2 {
			r.Header.Set(tc.hdr[i], tc.hdr[i+1])
		}
		got, ok := ts.presentedKey(r)
		assert.Equal(t, tc.ok, ok, "%v %v", tc.keyHeader, tc.hdr)
		assert.Equal(t, tc.want, got, "%v %v", tc.keyHeader, tc.hdr)
		ts.dropKeyHeaders(r)
		for _, k := range ts.keyHeaders() {
			assert.Empty(t, r.Header.Values(k), "%s is dropped", k)
		}
	}
}

func TestTenantsProvisionAndLookup(t *testing.T) {
	t.Setenv("OF_TEST_TENANT_KEY", "key-from-env")
	h, err := provisionJSON(t, fmt.Sprintf(`{"name":"tp","models":["a","b"],"tenants":{"list":[
		{"name":"one","keys":["{env.OF_TEST_TENANT_KEY}","sha256:%s"],"models":["a"],"labels":["GPU"],"allow_embeddings":false},
		{"name":"two","keys":["sha256:%s"],"share":3,"priority":-1}
	]},"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]}`, sumHex("second-key"), strings.ToUpper(sumHex("two-key"))))
	require.NoError(t, err)
	ts := h.Tenants
	one, two := ts.List[0], ts.List[1]
	assert.Same(t, one, ts.byKey("key-from-env"))
	assert.Same(t, one, ts.byKey("second-key"))
	assert.Same(t, two, ts.byKey("two-key"))
	assert.Nil(t, ts.byKey("key-from-env "), "exact keys only")
	assert.Nil(t, ts.byKey(""))
	assert.Nil(t, ts.byKey("{env.OF_TEST_TENANT_KEY}"), "the placeholder is not the key")
	assert.Equal(t, 1, one.share, "default share")
	assert.Equal(t, 3, two.share)
	assert.Equal(t, []string{"gpu"}, one.labels)
	assert.True(t, one.modelAllowed("a:latest"))
	assert.False(t, one.modelAllowed("b:latest"))
	assert.True(t, two.modelAllowed("b:latest"), "no list: what the frontend allows")
	assert.False(t, one.allows(kindEmbedding))
	assert.True(t, one.allows(kindCompletion))
	var none *Tenant
	assert.True(t, none.allows(kindEmbedding) && none.modelAllowed("x"), "tenancy off")
	assert.Nil(t, none.pinsFor(kindCompletion, vocabNative))
	assert.Len(t, ts.digests, 3)
	assert.NotContains(t, fmt.Sprintf("%+v", ts.digests), "key-from-env", "only digests are kept")
	require.NotNil(t, one.state, "pooled state taken")
	assert.Contains(t, h.corsRequestHeaders(), "X-Api-Key")
}

func TestTenantsProvisionErrors(t *testing.T) {
	const backends = `"backends":[{"name":"a","url":"127.0.0.1:9","health_interval":"1h"}]`
	cases := map[string]string{
		`{"tenants":{},` + backends + `}`:                                                                           "name at least one tenant",
		`{"tenants":{"list":[{"name":"a b","keys":["k"]}]},` + backends + `}`:                                       "name must be letters",
		`{"tenants":{"list":[{"name":"x","keys":["k"]},{"name":"x","keys":["j"]}]},` + backends + `}`:               "duplicate tenant name",
		`{"tenants":{"list":[{"name":"x","keys":["sekrit-1"]},{"name":"y","keys":["sekrit-1"]}]},` + backends + `}`: `key 1 is also a key of tenant "x"`,
		`{"tenants":{"list":[{"name":"x","keys":["sha256:abc"]}]},` + backends + `}`:                                "want 64 hex digits",
		`{"tenants":{"list":[{"name":"x","keys":["{env.OF_TEST_UNSET_KEY_VAR}"]}]},` + backends + `}`:               "OF_TEST_UNSET_KEY_VAR is unset or empty",
		`{"tenants":{"list":[{"name":"x"}]},` + backends + `}`:                                                      "no key, and the tenants block has no identity",
		`{"tenants":{"identity":"user","list":[{"name":"x"}]},` + backends + `}`:                                    "is not a placeholder",
		`{"tenants":{"key_header":"X Key","list":[{"name":"x","keys":["k"]}]},` + backends + `}`:                    "key_header: invalid header name",
		`{"models":["a"],"tenants":{"list":[{"name":"x","keys":["k"],"models":["b"]}]},` + backends + `}`:           `"b" is not among the frontend's models`,
		`{"tenants":{"list":[{"name":"x","keys":["k"],"requests_per_minute":-1}]},` + backends + `}`:                "requests_per_minute: must not be negative",
		`{"tenants":{"list":[{"name":"x","keys":["k"],"tokens_per_minute":2000000000}]},` + backends + `}`:          "tokens_per_minute: must be at most",
		`{"tenants":{"list":[{"name":"x","keys":["k"],"share":-1}]},` + backends + `}`:                              "share: must not be negative",
		`{"tenants":{"list":[{"name":"x","keys":["k"],"pin_completions":[1]}]},` + backends + `}`:                   "pin_completions: must be a JSON object",
		`{"tenants":{"list":[{"name":"x","keys":["k"]},null]},` + backends + `}`:                                    "empty tenant",
	}
	for raw, want := range cases {
		_, err := provisionJSON(t, raw)
		require.Error(t, err, raw)
		assert.Contains(t, err.Error(), want, raw)
		assert.NotContains(t, err.Error(), "sekrit", "an error never shows a key")
	}
}

func TestTenantsCaddyfileErrors(t *testing.T) {
	cases := []struct{ in, want string }{
		{"tenants {\n}\n", "name at least one tenant"},
		{"tenants x {\n}\n", "wrong argument count"},
		{"tenants {\nfoo\n}\n", "unrecognized tenants option 'foo'"},
		{"tenants {\nkey_header\ntenant a {\nkey k\n}\n}\n", "key_header: want exactly one argument"},
		{"tenants {\nkey_header X\nkey_header Y\ntenant a {\nkey k\n}\n}\n", "duplicate tenants option 'key_header'"},
		{"tenants {\nidentity user\ntenant a\n}\n", "identity: 'user' is not a placeholder"},
		{"tenants {\ntenant\n}\n", "wrong argument count"},
		{"tenants {\ntenant a b\n}\n", "wrong argument count"},
		{"tenants {\ntenant a/b {\nkey k\n}\n}\n", "tenant name 'a/b'"},
		{"tenants {\ntenant a {\nkey k\n}\ntenant a {\nkey j\n}\n}\n", "duplicate tenant name 'a'"},
		{"tenants {\ntenant a {\nkey sha256:zz\n}\n}\n", "want 64 hex digits"},
		{"tenants {\ntenant a {\nkey\n}\n}\n", "key: want exactly one argument"},
		{"tenants {\ntenant a {\nbudget 5\n}\n}\n", "unrecognized tenant option 'budget'"},
		{"tenants {\ntenant a {\nrequests_per_minute -1\n}\n}\n", "requests_per_minute: must not be negative"},
		{"tenants {\ntenant a {\nshare 0\n}\n}\n", "share: must be at least 1"},
		{"tenants {\ntenant a {\npriority high\n}\n}\n", "priority: want an integer"},
		{"tenants {\ntenant a {\nmax_parallel 1\nmax_parallel 2\n}\n}\n", "duplicate tenant option 'max_parallel'"},
		{"tenants {\ntenant a {\nallow_embeddings maybe\n}\n}\n", "allow_embeddings: want true or false"},
		{"tenants {\ntenant a {\npin_completions {\n}\n}\n}\n", "pin_completions: want one JSON object"},
	}
	for _, tc := range cases {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("ollamaflow {\n" + tc.in + "\tbackend a localhost\n}"))
		if assert.Error(t, err, tc.in) {
			assert.Contains(t, err.Error(), tc.want, tc.in)
		}
	}
}

// FuzzTenantKey: whatever a client sends as its key headers, identify
// neither panics nor names a tenant whose key was not sent, and it drops
// the headers it read.
func FuzzTenantKey(f *testing.F) {
	f.Add("Bearer alpha-key", "")
	f.Add("bearer\talpha-key", "beta-key")
	f.Add("Basic YWxhZGRpbjpvcGVuc2VzYW1l", "beta-key ")
	f.Add("", "\x00")
	ts := &Tenants{List: []*Tenant{{Name: "alpha", Keys: []string{"alpha-key"}}, {Name: "beta", Keys: []string{"beta-key"}}}}
	h := &Handler{logger: zap.NewNop()}
	require.NoError(f, ts.provision(h))
	f.Fuzz(func(t *testing.T, auth, apiKey string) {
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		r.Header["Authorization"] = []string{auth}
		r.Header["X-Api-Key"] = []string{apiKey}
		ten, err := ts.identify(r)
		assert.Empty(t, r.Header.Values("Authorization"))
		assert.Empty(t, r.Header.Values("X-Api-Key"))
		if ten == nil {
			return
		}
		assert.NoError(t, err)
		sent := strings.Contains(auth, ten.Name+"-key") || strings.TrimSpace(apiKey) == ten.Name+"-key"
		assert.True(t, sent, "%q/%q named %s", auth, apiKey, ten.Name)
	})
}

// BenchmarkTenantIdentify: the cost of finding a tenant by key, which
// compares with every configured key.
func BenchmarkTenantIdentify(b *testing.B) {
	for _, n := range []int{2, 100, 1000} {
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) {
			ts := &Tenants{}
			for i := 0; i < n; i++ {
				ts.List = append(ts.List, &Tenant{Name: fmt.Sprintf("t%d", i), Keys: []string{fmt.Sprintf("key-%d", i)}})
			}
			require.NoError(b, ts.provision(&Handler{logger: zap.NewNop()}))
			r, _ := http.NewRequest(http.MethodPost, "http://x/v1/chat/completions", nil)
			want := ts.List[n/2]
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				r.Header["Authorization"] = []string{fmt.Sprintf("Bearer key-%d", n/2)}
				if got, _ := ts.identify(r); got != want {
					b.Fatal("wrong tenant")
				}
			}
		})
	}
}
