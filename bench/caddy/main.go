// Command caddy is Caddy with its standard modules and ollamaflow, for the benchmark.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddy-ollamaflow/ollamaflow"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func main() {
	caddycmd.Main()
}
