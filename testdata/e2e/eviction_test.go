package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
)

// TestOllamaEvictsTheIdleModelWhoseFileSortsFirst checks, on the Ollama the
// suite runs, the eviction order that internal/fakeollama copies and
// least_delay's guess of a load's victim relies on (placement.go): a load on
// a full server evicts the idle model whose file sorts first, not the least
// recently used. A server of room two (OLLAMA_MAX_LOADED_MODELS=2) gets
// three copies of the chat model that differ in one byte, so three blobs;
// the copy whose blob sorts first is used last before the third is asked
// for. Least recently used would evict the other one.
func TestOllamaEvictsTheIdleModelWhoseFileSortsFirst(t *testing.T) {
	scenario(t)
	gguf, err := os.ReadFile(filepath.Join(env.modelsDir, chatModel+".gguf"))
	if err != nil {
		t.Fatalf("arranging: %v", err)
	}
	modelfile, err := os.ReadFile(filepath.Join(env.modelsDir, "Modelfile."+chatModel))
	if err != nil {
		t.Fatalf("arranging: %v", err)
	}
	from := "FROM ./" + chatModel + ".gguf"
	if !bytes.Contains(modelfile, []byte(from)) {
		t.Fatalf("arranging: Modelfile.%s has no %q", chatModel, from)
	}
	dir := filepath.Join(env.workDir, "eviction")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("arranging: %v", err)
	}
	type copyOf struct{ name, blob string }
	var copies []copyOf
	for i := range 3 {
		name := "evict-" + string(rune('a'+i))
		data := slices.Clone(gguf)
		data[len(data)-1] ^= byte(i + 1) // a tensor's last byte, or the padding after it
		sum := sha256.Sum256(data)
		if err := os.WriteFile(filepath.Join(dir, name+".gguf"), data, 0o644); err != nil {
			t.Fatalf("arranging: %v", err)
		}
		mf := bytes.Replace(modelfile, []byte(from), []byte("FROM ./"+name+".gguf"), 1)
		if err := os.WriteFile(filepath.Join(dir, "Modelfile."+name), mf, 0o644); err != nil {
			t.Fatalf("arranging: %v", err)
		}
		copies = append(copies, copyOf{name, hex.EncodeToString(sum[:])})
	}
	slices.SortFunc(copies, func(a, b copyOf) int { return strings.Compare(a.blob, b.blob) })
	first, second, third := copies[0].name, copies[1].name, copies[2].name

	port, err := freePort()
	if err != nil {
		t.Fatalf("arranging: %v", err)
	}
	o := &ollamaServer{name: "room2", port: port, dir: filepath.Join(env.workDir, "ollama-room2"),
		env: []string{"OLLAMA_MAX_LOADED_MODELS=2"}}
	os.RemoveAll(o.dir)
	t.Cleanup(o.stop)
	if err := o.start(); err != nil {
		t.Fatalf("arranging: %v", err)
	}
	for _, c := range copies {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		_, err := cli(ctx, o.hostPort(), dir, "create", c.name, "-f", "Modelfile."+c.name)
		cancel()
		if err != nil {
			t.Fatalf("arranging: %v", err)
		}
	}

	generate := func(model string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		stream := false
		err := o.client().Generate(ctx, &api.GenerateRequest{Model: model, Prompt: "hi", Stream: &stream,
			Options: map[string]any{"num_predict": 1}}, func(api.GenerateResponse) error { return nil })
		if err != nil {
			t.Fatalf("generate %s: %v", model, err)
		}
	}
	loaded := func() []string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		ps, err := o.client().ListRunning(ctx)
		if err != nil {
			t.Fatalf("/api/ps: %v", err)
		}
		var names []string
		for _, m := range ps.Models {
			names = append(names, strings.TrimSuffix(m.Name, ":latest"))
		}
		slices.Sort(names)
		return names
	}

	generate(first)
	generate(second)
	generate(first) // used last: least recently used is second now
	if got := loaded(); !slices.Equal(got, sorted(first, second)) {
		t.Fatalf("arranging: /api/ps lists %v, want %v", got, sorted(first, second))
	}
	generate(third)
	got := loaded()
	if want := sorted(second, third); !slices.Equal(got, want) {
		t.Errorf("after loading %s (blob %s), /api/ps lists %v; want %v: %s, whose blob sorts first, evicted though used last (least recently used would evict %s)",
			third, copies[2].blob[:12], got, want, first, second)
	}
}

func sorted(names ...string) []string {
	out := slices.Clone(names)
	slices.Sort(out)
	return out
}
