package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFailover: the busiest server is killed (SIGKILL, runners included)
// while 300 non-streaming chats run, 6 at a time; no client sees an error.
func TestFailover(t *testing.T) {
	scenario(t)
	const total, workers, killAt = 300, 6, 100

	var (
		mu       sync.Mutex
		landed   = map[string]int{}
		recent   []string
		failures []string
		done     atomic.Int64
		next     atomic.Int64
		killed   *ollamaServer
		killOnce sync.Once
		killedAt atomic.Int64 // unix nanoseconds; 0 before the kill
	)
	kill := func() {
		// The victim is the backend that served most of the last requests:
		// killing an idle one would prove nothing.
		mu.Lock()
		counts := map[string]int{}
		for _, b := range recent {
			counts[b]++
		}
		mu.Unlock()
		best := env.servers[0]
		for _, s := range env.servers {
			if counts[s.name] > counts[best.name] {
				best = s
			}
		}
		killed = best
		best.kill()
		killedAt.Store(time.Now().UnixNano())
		t.Logf("killed server %s after %d requests (recent backends: %v)", best.name, done.Load(), counts)
	}

	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > total {
					return
				}
				sent := time.Now()
				res, body, err := postJSON(env.mainURL, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":16}}`)
				mu.Lock()
				// When, against the kill: a failure before it is not the failover's.
				when := "before the kill"
				if k := killedAt.Load(); k != 0 {
					when = fmt.Sprintf("sent %s after the kill", sent.Sub(time.Unix(0, k)).Round(time.Millisecond))
				}
				switch {
				case err != nil:
					failures = append(failures, fmt.Sprintf("request %d (%s, %s after the start): %v", i, when, sent.Sub(start).Round(time.Millisecond), err))
				case res.StatusCode != http.StatusOK:
					failures = append(failures, fmt.Sprintf("request %d (%s): %d %s", i, when, res.StatusCode, strings.TrimSpace(string(body))))
				case !strings.Contains(string(body), `"done":true`):
					failures = append(failures, fmt.Sprintf("request %d: 200 with an incomplete body %q", i, body))
				default:
					b := res.Header.Get("X-OllamaFlow-Backend")
					landed[b]++
					recent = append(recent, b)
					if len(recent) > 30 {
						recent = recent[1:]
					}
				}
				mu.Unlock()
				if done.Add(1) == killAt {
					killOnce.Do(kill)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d chats in %.1fs, by backend: %v", total, time.Since(start).Seconds(), landed)
	if killed == nil {
		t.Fatal("no server was killed")
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d requests failed after killing %s:\n%s", len(failures), total, killed.name, strings.Join(failures, "\n"))
	}

	// Leave the rig as we found it: the server back, and seen healthy again.
	if err := restart(killed); err != nil {
		t.Fatal(err)
	}
}

// probeLine is gin's log line for a GET / (the proxy's health probe).
var probeLine = regexp.MustCompile(`\| GET +"/"`)

// restart starts a killed server again (its store kept its models) and waits
// until the proxy's health checker has probed it twice, which makes it healthy
// again (health_passes 2, health_interval 1s); a third probe is the margin.
func restart(s *ollamaServer) error {
	logPath := filepath.Join(s.dir, "serve.log")
	st, err := os.Stat(logPath)
	if err != nil {
		return err
	}
	offset := st.Size()
	if err := s.start(); err != nil {
		return err
	}
	ok := eventually(30*time.Second, func() bool {
		b, err := os.ReadFile(logPath)
		if err != nil || int64(len(b)) < offset {
			return false
		}
		return len(probeLine.FindAllIndex(b[offset:], -1)) >= 3
	})
	if !ok {
		return fmt.Errorf("server %s restarted but the proxy did not probe it within 30s", s.name)
	}
	return nil
}
