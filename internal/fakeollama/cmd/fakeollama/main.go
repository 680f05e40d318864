// Command fakeollama runs the fake Ollama server of package fakeollama on a fixed address, for
// benchmarks and manual tests:
//
//	fakeollama -listen 127.0.0.1:11434 -models tiny-llama,tiny-bert -tokens 16 -token-gap 10ms
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
	flag.Parse()

	f := fakeollama.NewUnstarted(fakeollama.Config{
		Models:         split(*models),
		Loaded:         split(*loaded),
		Tokens:         *tokens,
		TokenGap:       *gap,
		FirstByteDelay: *firstByte,
		LoadDelay:      *loadDelay,
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
