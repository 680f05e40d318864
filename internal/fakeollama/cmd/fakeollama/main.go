// Command fakeollama runs the fake Ollama server of package fakeollama on a fixed address, for
// benchmarks and manual tests:
//
//	fakeollama -listen 127.0.0.1:11434 -models tiny-llama,tiny-bert -tokens 16 -token-gap 10ms
//	fakeollama -listen 127.0.0.1:11435 -parallel 1 -first-byte-delay 400ms   # a slow box
package main

import (
	"flag"
	"log"
	"net/http"
	"strings"
	"time"

	"github.com/caddy-ollamaflow/ollamaflow/internal/fakeollama"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:11434", "address to listen on")
	models := flag.String("models", "tiny-llama:latest", "comma-separated model names to serve")
	loaded := flag.String("loaded", "", "comma-separated model names shown as loaded (default: none)")
	tokens := flag.Int("tokens", 5, "tokens per completion")
	gap := flag.Duration("token-gap", 0, "delay between streamed chunks")
	firstByte := flag.Duration("first-byte-delay", 0, "prompt evaluation time before the first token")
	loadDelay := flag.Duration("load-delay", 0, "time to load a model that is not loaded")
	parallel := flag.Int("parallel", 0, "completions and embeddings processed at once, like OLLAMA_NUM_PARALLEL (0: no limit)")
	maxQueue := flag.Int("max-queue", 0, "requests waiting for a slot before 503 server busy, like OLLAMA_MAX_QUEUE (0: 512, negative: none)")
	flag.Parse()

	f := fakeollama.NewUnstarted(fakeollama.Config{
		Models:         split(*models),
		Loaded:         split(*loaded),
		Tokens:         *tokens,
		TokenGap:       *gap,
		FirstByteDelay: *firstByte,
		LoadDelay:      *loadDelay,
		Parallel:       *parallel,
		MaxQueue:       *maxQueue,
	})
	srv := &http.Server{Addr: *listen, Handler: f.Handler(), ReadHeaderTimeout: 10 * time.Second}
	log.Printf("fake ollama on http://%s serving %s", *listen, *models)
	log.Fatal(srv.ListenAndServe())
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
