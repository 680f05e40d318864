package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// TestStreamCutReachesClients: each official client in turn reads a long streamed chat
// through the proxy from server a, which is killed (SIGKILL, runners included) as the first
// chunk arrives. Every client must report an error, none a complete answer; what each prints
// is logged as a FIGURE line. Server a is restarted after each kill.
func TestStreamCutReachesClients(t *testing.T) {
	scenario(t)
	// lb_policy first: every request goes to a (first in config order) while it is healthy.
	useConfig(t, "\t\tlb_policy first\n")
	victim := env.servers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	messages := []api.Message{{Role: "user", Content: "hi"}}

	clients := []struct {
		name string
		run  func(first func()) (chunks int, done bool, err error)
	}{
		{"ollama Go api.Client.Chat", func(first func()) (int, bool, error) {
			chunks, done := 0, false
			stream := true
			err := proxyClient(env.extraURL).Chat(ctx, &api.ChatRequest{Model: chatModel, Messages: messages, Stream: &stream, Options: map[string]any{"num_predict": 100000}},
				func(r api.ChatResponse) error {
					chunks++
					done = done || r.Done
					first()
					return nil
				})
			return chunks, done, err
		}},
		{"openai-go streaming", func(first func()) (int, bool, error) {
			c := openai.NewClient(option.WithBaseURL(env.extraURL+"/v1/"), option.WithAPIKey("unused"), option.WithMaxRetries(0))
			stream := c.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
				Model: chatModel, Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}, MaxTokens: openai.Int(100000),
			})
			chunks, done := 0, false
			for stream.Next() {
				chunks++
				if ch := stream.Current(); len(ch.Choices) > 0 && ch.Choices[0].FinishReason != "" {
					done = true
				}
				first()
			}
			return chunks, done, stream.Err()
		}},
		{"npm ollama", func(first func()) (int, bool, error) { return nodeCut(ctx, t, "ollama", first) }},
		{"npm openai", func(first func()) (int, bool, error) { return nodeCut(ctx, t, "openai", first) }},
	}
	if err := npmCI(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range clients {
		var once sync.Once
		killed := false
		chunks, done, err := c.run(func() {
			once.Do(func() {
				victim.kill()
				killed = true
			})
		})
		msg := "<nil>"
		if err != nil {
			msg = err.Error()
		}
		t.Logf("FIGURE backend killed mid-stream, %s: %d chunks, done marker %v, error: %s", c.name, chunks, done, msg)
		switch {
		case !killed:
			t.Errorf("%s: no chunk arrived, so the server was never killed (err %v)", c.name, err)
		case err == nil:
			t.Errorf("%s: the client reported no error for a stream cut by a dead backend (%d chunks)", c.name, chunks)
		case done:
			t.Errorf("%s: the client saw a done marker in a cut stream", c.name)
		case !strings.Contains(msg, "backend a failed mid-answer"):
			t.Errorf("%s: the error does not carry the proxy's explanation: %s", c.name, msg)
		}
		if strings.Contains(msg, victim.hostPort()) {
			t.Errorf("%s: the error shows the backend's address: %s", c.name, msg)
		}
		if killed {
			if err := restart(victim); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// nodeCut runs node/cut.mjs for one npm client, calling first when it reports its first chunk.
func nodeCut(ctx context.Context, t *testing.T, client string, first func()) (int, bool, error) {
	cmd := exec.CommandContext(ctx, "node", "cut.mjs", client)
	cmd.Dir = "node"
	cmd.Env = append(os.Environ(), "PROXY_URL="+env.extraURL, "CHAT_MODEL="+chatModel)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, false, err
	}
	if err := cmd.Start(); err != nil {
		return 0, false, err
	}
	var end struct {
		Event  string `json:"event"`
		OK     bool   `json:"ok"`
		Chunks int    `json:"chunks"`
		Done   bool   `json:"done"`
		Error  string `json:"error"`
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var line struct {
			Event string `json:"event"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			t.Errorf("node printed something that is not an event: %q", sc.Text())
			continue
		}
		switch line.Event {
		case "first":
			first()
		case "end":
			_ = json.Unmarshal(sc.Bytes(), &end)
		}
	}
	if err := cmd.Wait(); err != nil {
		return end.Chunks, end.Done, fmt.Errorf("node cut.mjs %s: %v: %s", client, err, stderr.String())
	}
	if end.Event != "end" {
		return end.Chunks, end.Done, fmt.Errorf("node cut.mjs %s printed no end: %s", client, stderr.String())
	}
	if end.OK {
		return end.Chunks, end.Done, nil
	}
	return end.Chunks, end.Done, fmt.Errorf("%s", end.Error)
}
