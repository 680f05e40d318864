package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestNodeClients runs node/clients.mjs: the npm packages ollama and openai,
// one streamed chat and one embedding each, through the proxy.
func TestNodeClients(t *testing.T) {
	scenario(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	if err := npmCI(ctx); err != nil {
		t.Fatal(err)
	}

	cmd := exec.CommandContext(ctx, "node", "clients.mjs")
	cmd.Dir = "node"
	cmd.Env = append(os.Environ(), "PROXY_URL="+env.mainURL, "CHAT_MODEL="+chatModel, "EMBED_MODEL="+embedModel)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node clients.mjs: %v\n%s%s", err, out, stderr.Bytes())
	}

	type result struct {
		Check  string `json:"check"`
		OK     bool   `json:"ok"`
		Error  string `json:"error"`
		Result struct {
			Chunks       int    `json:"chunks"`
			Text         string `json:"text"`
			Done         bool   `json:"done"`
			EvalCount    int    `json:"eval_count"`
			FinishReason string `json:"finish_reason"`
			Vectors      int    `json:"vectors"`
			Dims         int    `json:"dims"`
		} `json:"result"`
	}
	got := map[string]result{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var r result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("node printed something that is not a result: %q", sc.Text())
		}
		got[r.Check] = r
	}
	for _, name := range []string{"ollama.chat", "ollama.embed", "openai.chat", "openai.embed"} {
		r, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s: no result", name)
		case !r.OK:
			t.Errorf("%s: %s", name, r.Error)
		case strings.HasSuffix(name, ".embed") && (r.Result.Vectors != 2 || r.Result.Dims != 32):
			t.Errorf("%s: want 2 vectors of 32 dimensions, got %d of %d", name, r.Result.Vectors, r.Result.Dims)
		case name == "ollama.chat" && (r.Result.Chunks != 9 || !r.Result.Done || r.Result.EvalCount != 8 || r.Result.Text == ""):
			t.Errorf("%s: want 8 token chunks and a done chunk with eval_count 8, got %+v", name, r.Result)
		case name == "openai.chat" && (r.Result.Chunks != 9 || r.Result.FinishReason != "length" || r.Result.Text == ""):
			t.Errorf("%s: want 8 token chunks and a finish chunk (finish_reason length), got %+v", name, r.Result)
		default:
			t.Logf("%s: %+v", name, r.Result)
		}
	}
}

// npmCI installs the exact versions of node/package-lock.json (ollama 0.6.4, openai 7.55.0).
func npmCI(ctx context.Context) error {
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not on PATH: the npm scenarios need Node.js 20 or later", tool)
		}
	}
	install := exec.CommandContext(ctx, "npm", "ci", "--no-audit", "--no-fund", "--loglevel=error")
	install.Dir = "node"
	if out, err := install.CombinedOutput(); err != nil {
		return fmt.Errorf("npm ci: %v\n%s", err, out)
	}
	return nil
}
