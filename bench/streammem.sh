#!/usr/bin/env bash
# bench/streammem.sh: resident memory per concurrent stream of a real Caddy, ollamaflow and
# reverse_proxy side by side. For each proxy in turn, one Caddy built from this checkout fronts one
# fake Ollama whose streams send their first token at once and the next one TOKEN_GAP later; a
# client (bench/holdstreams) opens STREAMS streaming chats, each on its own connection, and reads
# the first chunk of each. With every stream open and idle, Caddy's resident memory (VmRSS from
# /proc) is compared with its figure before (after a warm-up): the growth over STREAMS is the cost
# of one open stream. Go's own view (heap in use, goroutine stacks, goroutines) comes from Caddy's
# admin /metrics.
#
# Environment (defaults in brackets): STREAMS [5000]  PROXIES [rp,of]  TOKEN_GAP [10m]
#   SETTLE [3s] wait after the last stream opened   WORK [mktemp]   KEEP=1 keeps WORK
#   PROFILE [unset] a directory: with the streams open, saves each proxy's heap profile
#     (heap-PROXY.pb.gz, for go tool pprof), goroutine stacks (goroutines-PROXY.txt) and
#     runtime.MemStats (memstats-PROXY.json) there, the evidence behind the per-stream breakdown
# Needs an open-file limit of at least 2×STREAMS+1000 (it raises the soft limit to the hard one).
set -euo pipefail
cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-5000} PROXIES=${PROXIES:-rp,of} TOKEN_GAP=${TOKEN_GAP:-10m} SETTLE=${SETTLE:-3s}
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((2 * STREAMS + 1000)) ]; then
  echo "open-file limit $(ulimit -n) is below 2×STREAMS+1000; lower STREAMS or raise the hard limit" >&2
  exit 1
fi
. bench/lib.sh
bench_setup streammem
go build -o "$WORK/holdstreams" ./bench/holdstreams
read -r PORT_A PORT_PROXY PORT_ADMIN <<<"$("$WORK/loadgen" -free-ports 3)"

"$WORK/fakeollama" -listen "127.0.0.1:$PORT_A" -models tiny-llama -loaded tiny-llama \
  -tokens 100 -token-gap "$TOKEN_GAP" >"$WORK/fake.log" 2>&1 &
pids+=($!)

site() { # PROXY: the site block of one proxy
  case $1 in
  rp) printf 'reverse_proxy 127.0.0.1:%s {\n\t\tflush_interval -1\n\t}' "$PORT_A" ;;
  of) printf 'ollamaflow {\n\t\tstream_idle_timeout 1h\n\t\tbackend a 127.0.0.1:%s\n\t}' "$PORT_A" ;;
  esac
}
metric() { # NAME: a Go runtime figure from Caddy's admin /metrics
  curl -s "http://127.0.0.1:$PORT_ADMIN/metrics" | awk -v k="$1" '$1==k {printf "%d", $2}'
}

measure() { # PROXY
  cat >"$WORK/Caddyfile" <<CADDY
{
	admin 127.0.0.1:$PORT_ADMIN
	default_bind 127.0.0.1
	persist_config off
	log {
		level ERROR
	}
}
:$PORT_PROXY {
	$(site "$1")
}
CADDY
  "$WORK/caddy" run --adapter caddyfile --config "$WORK/Caddyfile" >"$WORK/caddy-$1.log" 2>&1 &
  local caddy=$!
  pids+=($caddy)
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$PORT_PROXY/api/version" && break; sleep 0.1; done
  # Warm up: a few complete chats, so pools and buffers that any request needs exist before.
  for _ in $(seq 1 20); do
    curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT_PROXY/api/chat" \
      -d '{"model":"tiny-llama","stream":false,"messages":[]}' || true
  done
  sleep 1
  local before heap0 stack0 gor0 after heap1 stack1 gor1 line
  before=$(awk '$1=="VmRSS:" {print $2}' "/proc/$caddy/status")
  heap0=$(metric go_memstats_heap_inuse_bytes) stack0=$(metric go_memstats_stack_inuse_bytes) gor0=$(metric go_goroutines)

  mkfifo "$WORK/hold-$1.in"
  "$WORK/holdstreams" -url "http://127.0.0.1:$PORT_PROXY" -n "$STREAMS" <"$WORK/hold-$1.in" >"$WORK/hold-$1.out" 2>"$WORK/hold-$1.err" &
  local hold=$!
  pids+=($hold)
  exec 9>"$WORK/hold-$1.in" # holdstreams holds until this closes
  until grep -q '^open' "$WORK/hold-$1.out"; do
    kill -0 "$hold" 2>/dev/null || { cat "$WORK/hold-$1.err" >&2; exit 1; }
    sleep 0.5
  done
  sleep "$SETTLE"
  after=$(awk '$1=="VmRSS:" {print $2}' "/proc/$caddy/status")
  heap1=$(metric go_memstats_heap_inuse_bytes) stack1=$(metric go_memstats_stack_inuse_bytes) gor1=$(metric go_goroutines)
  if [ -n "${PROFILE:-}" ]; then
    mkdir -p "$PROFILE"
    curl -s -o "$PROFILE/heap-$1.pb.gz" "http://127.0.0.1:$PORT_ADMIN/debug/pprof/heap?gc=1"
    curl -s -o "$PROFILE/goroutines-$1.txt" "http://127.0.0.1:$PORT_ADMIN/debug/pprof/goroutine?debug=1"
    curl -s "http://127.0.0.1:$PORT_ADMIN/debug/vars" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["memstats"], indent=1))' \
      >"$PROFILE/memstats-$1.json" 2>/dev/null || true
  fi
  line=$(cat "$WORK/hold-$1.out")
  local open=${line#open }
  open=${open%% *}
  if [ "$open" -gt 0 ]; then
    printf '%-3s %s; RSS %d -> %d MiB: %.1f KiB per stream (Go: heap in use %.1f KiB, stacks %.1f KiB, %.1f goroutines)\n' \
      "$1" "$line" $((before / 1024)) $((after / 1024)) "$(echo "($after - $before) / $open" | bc -l)" \
      "$(echo "($heap1 - $heap0) / 1024 / $open" | bc -l)" "$(echo "($stack1 - $stack0) / 1024 / $open" | bc -l)" \
      "$(echo "($gor1 - $gor0) / $open" | bc -l)"
  else
    echo "$1 $line" >&2
  fi
  [ -s "$WORK/hold-$1.err" ] && head -5 "$WORK/hold-$1.err" >&2
  exec 9>&-
  wait "$hold" || true
  kill "$caddy"
  wait "$caddy" || true
}

echo "$STREAMS idle streams (first token read, next one $TOKEN_GAP later) through one Caddy per proxy; $(nproc) CPUs" >&2
for p in ${PROXIES//,/ }; do measure "$p"; done
