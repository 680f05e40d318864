#!/usr/bin/env bash
# bench/bodymem.sh: resident memory of a real Caddy under a flood of large request bodies.
# CLIENTS clients each send one chat of BODY_MIB MiB at once to a frontend whose only backend (a
# fake Ollama) has one slot (max_parallel 1). Prints Caddy's resident memory before, its peak
# (VmHWM) during the flood, the growth, the budget, and the status every client got.
#
# Environment (defaults in brackets): CLIENTS [40]  BODY_MIB [16]  MAX_BODY_MEMORY [256MiB]
#   TOKEN_GAP [20ms] delay between the fake's chunks (5 tokens)   WORK [mktemp]   KEEP=1 keeps WORK
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-40} BODY_MIB=${BODY_MIB:-16} MAX_BODY_MEMORY=${MAX_BODY_MEMORY:-256MiB}
TOKEN_GAP=${TOKEN_GAP:-20ms}
. bench/lib.sh
bench_setup bodymem
read -r PORT_A PORT_OF PORT_ADMIN <<<"$("$WORK/loadgen" -free-ports 3)"

"$WORK/fakeollama" -listen "127.0.0.1:$PORT_A" -models tiny-llama -loaded tiny-llama \
  -tokens 5 -token-gap "$TOKEN_GAP" >"$WORK/fake.log" 2>&1 &
pids+=($!)
cat >"$WORK/Caddyfile" <<CADDY
{
	admin 127.0.0.1:$PORT_ADMIN
	default_bind 127.0.0.1
	persist_config off
	log {
		level ERROR
	}
}
:$PORT_OF {
	ollamaflow {
		max_body_memory $MAX_BODY_MEMORY
		backend a 127.0.0.1:$PORT_A {
			max_parallel 1
		}
	}
}
CADDY
"$WORK/caddy" run --adapter caddyfile --config "$WORK/Caddyfile" >"$WORK/caddy.log" 2>&1 &
CADDY_PID=$!
pids+=($CADDY_PID)
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$PORT_OF/" && break; sleep 0.1; done

# One chat body of BODY_MIB MiB (within the default max_request_body of 64 MiB).
python3 - "$WORK/body.json" "$BODY_MIB" <<'PY'
import sys
n = int(sys.argv[2]) << 20
head, tail = '{"model":"tiny-llama","stream":false,"messages":[{"role":"user","content":"', '"}]}'
open(sys.argv[1], "w").write(head + "x" * (n - len(head) - len(tail)) + tail)
PY
# Warm up: a small request, then settle.
curl -s -o /dev/null "http://127.0.0.1:$PORT_OF/api/chat" -d '{"model":"tiny-llama","stream":false,"messages":[]}'
sleep 1
rss() { awk -v k="$1:" '$1==k {print $2}' "/proc/$CADDY_PID/status"; }
# Reset the peak (VmHWM) to the current resident size.
echo 5 >"/proc/$CADDY_PID/clear_refs" 2>/dev/null || true
BEFORE=$(rss VmRSS)

clients=()
for i in $(seq 1 "$CLIENTS"); do
  curl -s -o /dev/null -w '%{http_code}\n' -H 'Content-Type: application/json' \
    --data-binary "@$WORK/body.json" "http://127.0.0.1:$PORT_OF/api/chat" >"$WORK/status.$i" &
  clients+=($!)
done
wait "${clients[@]}" || true
PEAK=$(rss VmHWM)
AFTER=$(rss VmRSS)
PEAK_BODIES=$(curl -s "http://127.0.0.1:$PORT_ADMIN/ollamaflow/frontends" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["body_memory"]["process_peak_bytes"]>>20)')

echo "clients $CLIENTS x ${BODY_MIB} MiB bodies, one backend slot, max_body_memory $MAX_BODY_MEMORY"
echo "caddy RSS before ${BEFORE} kB, peak ${PEAK} kB, after ${AFTER} kB"
echo "RSS growth at peak: $(( (PEAK - BEFORE) / 1024 )) MiB (budget $MAX_BODY_MEMORY; peak bodies reserved: ${PEAK_BODIES} MiB)"
echo "statuses: $(cat "$WORK"/status.* | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}')"
