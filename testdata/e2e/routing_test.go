package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestModelAwareRouting: with tiny-llama on one server only, every chat lands
// there and none fails, although the other two are healthy and idle.
//
// Two rounds of 50 chats. The first starts right after the model was deleted
// from b and c, while the proxy may still believe they have it: retries must
// hide that from clients. The second starts after the proxy has read every
// server's list again (model_refresh, plus a margin): by then it must route,
// not retry, so b and c see none of those chats.
func TestModelAwareRouting(t *testing.T) {
	scenario(t)
	only := env.servers[0]
	others := env.servers[1:]
	for _, s := range others {
		if err := s.deleteModel(chatModel); err != nil {
			t.Fatalf("arranging: deleting %s on %s: %v", chatModel, s.name, err)
		}
	}
	t.Cleanup(func() {
		for _, s := range others {
			if err := s.createModel(chatModel, chatModel); err != nil {
				t.Errorf("cleanup: recreating %s on %s: %v", chatModel, s.name, err)
			}
		}
	})

	for round, pause := range []time.Duration{0, modelRefresh + time.Second} {
		time.Sleep(pause)
		before := map[string]int{}
		for _, s := range others {
			before[s.name] = chatsLogged(s, http.StatusNotFound)
		}
		landed, failures := chatBurst(50, 5)
		if len(failures) > 0 {
			t.Errorf("round %d: %d of 50 chats failed: %s", round+1, len(failures), strings.Join(failures, "; "))
		}
		if landed[only.name] != 50 {
			t.Errorf("round %d: want all 50 chats on %s (the only server with %s), got %v", round+1, only.name, chatModel, landed)
		}
		// Retries hide a wrong choice from the client; the servers' logs do not.
		for _, s := range others {
			m := chatsLogged(s, http.StatusNotFound) - before[s.name]
			t.Logf("round %d: server %s answered %d chats with 404 (model not found)", round+1, s.name, m)
			if round == 1 && m > 0 {
				t.Errorf("round 2: the proxy still sent %d chats to %s, which has not had %s for %s", m, s.name, chatModel, pause)
			}
		}
	}
}

// chatBurst sends n non-streaming chats to the main frontend, conc at a time,
// and returns where they landed and what failed.
func chatBurst(n, conc int) (map[string]int, []string) {
	var mu sync.Mutex
	landed := map[string]int{}
	var failures []string
	var wg sync.WaitGroup
	sem := make(chan struct{}, conc)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			res, body, err := postJSON(env.mainURL, "/api/chat", `{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stream":false,"options":{"num_predict":4}}`)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failures = append(failures, fmt.Sprintf("request %d: %v", i, err))
			case res.StatusCode != http.StatusOK:
				failures = append(failures, fmt.Sprintf("request %d: %d %s", i, res.StatusCode, body))
			default:
				landed[res.Header.Get("X-OllamaFlow-Backend")]++
			}
		}()
	}
	wg.Wait()
	return landed, failures
}

// chatsLogged counts the chats a server answered with status, from its
// log: Ollama logs every request in gin's format (`| 404 | ... | POST
// "/api/chat"`).
func chatsLogged(s *ollamaServer, status int) int {
	time.Sleep(100 * time.Millisecond) // let the server finish writing its log line
	b, err := os.ReadFile(filepath.Join(s.dir, "serve.log"))
	if err != nil {
		return -1
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, fmt.Sprintf("| %d |", status)) && strings.Contains(line, `"/api/chat"`) {
			n++
		}
	}
	return n
}
