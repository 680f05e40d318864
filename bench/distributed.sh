#!/usr/bin/env bash
# bench/distributed.sh: two Caddy processes built from this checkout share one file-system storage
# (the global `storage file_system` option) and a tenant limited to RPM requests a minute, with
# `distributed 1s`. Each process is offered RATE requests a second of that tenant for DURATION
# seconds (curl's own time included: the run may last longer). Prints what each admitted (200)
# and refused (429), the total, and what one instance alone would admit in the time the run
# took (the full bucket of RPM plus RPM × elapsed / 60); with
# DISTRIBUTED=0 the two count apart, for comparison (about twice that).
#
# Environment (defaults in brackets): RPM [30]  RATE [5]  DURATION [30]  DISTRIBUTED [1]
#   WORK [mktemp]   KEEP=1 keeps WORK
set -euo pipefail
cd "$(dirname "$0")/.."

RPM=${RPM:-30} RATE=${RATE:-5} DURATION=${DURATION:-30} DISTRIBUTED=${DISTRIBUTED:-1}
. bench/lib.sh
bench_setup distributed
read -r PORT_F PORT_1 PORT_2 ADMIN_1 ADMIN_2 <<<"$("$WORK/loadgen" -free-ports 5)"
mkdir -p "$WORK/storage"

"$WORK/fakeollama" -listen "127.0.0.1:$PORT_F" -models tiny-llama -loaded tiny-llama -tokens 2 >"$WORK/fake.log" 2>&1 &
pids+=($!)
dist=""
[ "$DISTRIBUTED" = 1 ] && dist="distributed 1s"
for i in 1 2; do
  port=PORT_$i admin=ADMIN_$i
  cat >"$WORK/Caddyfile.$i" <<CADDY
{
	admin 127.0.0.1:${!admin}
	default_bind 127.0.0.1
	persist_config off
	storage file_system $WORK/storage
	log {
		level ERROR
	}
}
:${!port} {
	ollamaflow {
		name llm
		tenants {
			$dist
			tenant team {
				key {env.BENCH_TEAM_KEY}
				requests_per_minute $RPM
			}
		}
		backend a 127.0.0.1:$PORT_F
	}
}
CADDY
  BENCH_TEAM_KEY=bench-key "$WORK/caddy" run --adapter caddyfile --config "$WORK/Caddyfile.$i" >"$WORK/caddy.$i.log" 2>&1 &
  pids+=($!)
done
for port in $PORT_1 $PORT_2; do
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/version" || true)
    [ "$code" = 401 ] && break # up: tenancy answers without a key
    sleep 0.1
  done
done
sleep 1.5 # a first sync on both

# Paced load: each tick sends one request to each instance.
body='{"model":"tiny-llama","stream":false,"messages":[{"role":"user","content":"hi"}]}'
declare -A ok=() refused=()
ticks=$((RATE * DURATION))
gap=$(awk -v r="$RATE" 'BEGIN { printf "%.3f", 1 / r }')
began=$(date +%s.%N)
for _ in $(seq 1 "$ticks"); do
  for port in $PORT_1 $PORT_2; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer bench-key' "http://127.0.0.1:$port/api/chat" -d "$body")
    case $code in
    200) ok[$port]=$((${ok[$port]:-0} + 1)) ;;
    429) refused[$port]=$((${refused[$port]:-0} + 1)) ;;
    *) echo "unexpected status $code from :$port" >&2; exit 1 ;;
    esac
  done
  sleep "$gap"
done
elapsed=$(awk -v b="$began" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - b }')
one=$(awk -v r="$RPM" -v t="$elapsed" 'BEGIN { printf "%d", r + r * t / 60 }')
total=$((${ok[$PORT_1]:-0} + ${ok[$PORT_2]:-0}))
echo "FIGURE distributed=$DISTRIBUTED: tenant at $RPM rpm, two instances offered up to $RATE/s each for ${elapsed}s: instance 1 admitted ${ok[$PORT_1]:-0} (429: ${refused[$PORT_1]:-0}), instance 2 admitted ${ok[$PORT_2]:-0} (429: ${refused[$PORT_2]:-0}); total $total, one instance alone would admit $one in that time"
ls "$WORK/storage/ollamaflow/tenants/llm/" 2>/dev/null | sed 's/^/storage record: /' || true
