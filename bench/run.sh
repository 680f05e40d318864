#!/usr/bin/env bash
# bench/run.sh: compares ollamaflow with Caddy's own reverse_proxy in front of the same two fake
# Ollama servers, in ONE Caddy with two sites:
#   rp  :PORT_RP  reverse_proxy (lb_policy least_conn, flush_interval -1) over the two fakes
#   of  :PORT_OF  ollamaflow with the same two backends
# For non-streaming and streaming (NDJSON, read to the end) chat at each concurrency, the
# closed-loop load generator warms up, then alternates rp, of, rp, of ... for ROUNDS rounds and
# prints requests/s and p50/p99 latency per target and the ratio of/rp (median over rounds).
#
# Environment (defaults in brackets):
#   DURATION [5s]   measured run     WARMUP [1s]   warm-up run       ROUNDS [3]
#   CONC [1,32]     concurrencies    MODES [chat,chat-stream]
#   TOKENS [16]     tokens per completion of the fakes   TOKEN_GAP [0s] delay between chunks
#   WORK [mktemp]   where binaries, Caddyfile and logs go (kept when KEEP=1)
# Default run: about 2.5 minutes plus the build. Exit status 1 if any request failed.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s} WARMUP=${WARMUP:-1s} ROUNDS=${ROUNDS:-3}
CONC=${CONC:-1,32} MODES=${MODES:-chat,chat-stream}
TOKENS=${TOKENS:-16} TOKEN_GAP=${TOKEN_GAP:-0s}
. bench/lib.sh
bench_setup bench

read -r PORT_A PORT_B PORT_RP PORT_OF PORT_ADMIN <<<"$("$WORK/loadgen" -free-ports 5)"

for p in "$PORT_A" "$PORT_B"; do
  "$WORK/fakeollama" -listen "127.0.0.1:$p" -models tiny-llama -loaded tiny-llama \
    -tokens "$TOKENS" -token-gap "$TOKEN_GAP" >"$WORK/fake-$p.log" 2>&1 &
  pids+=($!)
done

cat >"$WORK/Caddyfile" <<CADDY
{
	admin 127.0.0.1:$PORT_ADMIN
	default_bind 127.0.0.1
	persist_config off
	log {
		level WARN
	}
}

:$PORT_RP {
	reverse_proxy 127.0.0.1:$PORT_A 127.0.0.1:$PORT_B {
		lb_policy least_conn
		flush_interval -1
	}
}

:$PORT_OF {
	ollamaflow {
		backend a 127.0.0.1:$PORT_A
		backend b 127.0.0.1:$PORT_B
	}
}
CADDY

"$WORK/caddy" run --adapter caddyfile --config "$WORK/Caddyfile" >"$WORK/caddy.log" 2>&1 &
pids+=($!)

wait_up() { # URL
  for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "not up: $1" >&2; tail -20 "$WORK/caddy.log" >&2; return 1
}
wait_up "http://127.0.0.1:$PORT_A/"
wait_up "http://127.0.0.1:$PORT_B/"
wait_up "http://127.0.0.1:$PORT_RP/"
wait_up "http://127.0.0.1:$PORT_OF/api/version"

echo "fakes 127.0.0.1:$PORT_A and :$PORT_B (tokens $TOKENS, gap $TOKEN_GAP); rp :$PORT_RP, of :$PORT_OF; $(nproc) CPUs" >&2
"$WORK/loadgen" -target "rp=http://127.0.0.1:$PORT_RP" -target "of=http://127.0.0.1:$PORT_OF" \
  -d "$DURATION" -warmup "$WARMUP" -rounds "$ROUNDS" -c "$CONC" -modes "$MODES"
