package ollamaflow

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
)

// A thousand servers' phases cover the interval evenly: no tenth of it
// holds more than 15% of them (10% expected), for addresses as alike as a
// subnet's and as a host's consecutive ports.
func TestProbePhasesSpreadOverTheInterval(t *testing.T) {
	const n, bins = 1000, 10
	interval := 5 * time.Second
	pools := map[string]func(i int) string{
		"subnet": func(i int) string { return fmt.Sprintf("http://10.0.%d.%d:11434", i/250, i%250+1) },
		"ports":  func(i int) string { return fmt.Sprintf("http://127.0.0.1:%d", 20000+i) },
	}
	for name, key := range pools {
		var counts [bins]int
		for i := range n {
			d := probePhase(key(i), interval)
			require.Greater(t, d, time.Duration(0), "%s: a phase is never zero", key(i))
			require.LessOrEqual(t, d, interval, "%s: a phase is within the interval", key(i))
			counts[min(int(d*bins/interval), bins-1)]++
		}
		for b, c := range counts {
			assert.LessOrEqual(t, c, n*15/100, "%s: tenth %d of the interval holds %d of %d phases: %v", name, b, c, n, counts)
		}
	}
	assert.Equal(t, probePhase("http://10.0.0.1:11434", interval), probePhase("http://10.0.0.1:11434", interval), "a server keeps its phase")
}

// A thousand servers started together are probed at once, then spread: on a fake
// clock that starts at their first probes, the second ones fall evenly
// over the interval, no tenth of it holding more than 15% (10% expected;
// without phases all would come one interval later, at the same instant).
func TestProbesOfAPoolStartedTogetherSpreadOut(t *testing.T) {
	const n, tenths = 1000, 10
	interval := time.Minute
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte(`{"models":[]}`))
	}))
	defer target.Close()

	var mu sync.Mutex
	second := make(map[string]time.Duration) // server -> when its second probe starts
	hook := func(key string, wait time.Duration) {
		if strings.HasPrefix(key, target.URL+"/s") { // not a server of another test
			mu.Lock()
			if _, seen := second[key]; !seen {
				second[key] = wait
			}
			mu.Unlock()
		}
	}
	probeWaitHook.Store(&hook)
	defer probeWaitHook.Store(nil)

	st := testSettings(zap.NewNop())
	st.interval = interval
	for i := range n {
		base, err := url.Parse(fmt.Sprintf("%s/s%d", target.URL, i))
		require.NoError(t, err)
		s := newServer(base, st)
		defer s.Destruct()
	}
	started := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(second)
	}
	require.Eventually(t, func() bool { return started() == n }, 120*time.Second, 10*time.Millisecond, // 1,000 probes on a loaded machine
		"every server's probe loop reaches its second probe")

	mu.Lock()
	defer mu.Unlock()
	var counts [tenths]int
	for key, at := range second {
		require.Greater(t, at, time.Duration(0), key)
		require.LessOrEqual(t, at, interval, key)
		counts[min(int(at*tenths/interval), tenths-1)]++
	}
	t.Logf("second probes per tenth of the interval: %v", counts)
	for b, c := range counts {
		assert.LessOrEqual(t, c, n*15/100, "tenth %d of the interval holds %d of %d second probes: %v", b, c, n, counts)
	}
}
