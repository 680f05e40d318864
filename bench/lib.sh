# Sourced by the bench scripts: a work directory ($WORK, kept with KEEP=1), a cleanup that stops
# every process whose pid is added to the pids array, and the three binaries the benchmarks run
# (caddy with the module, the fake Ollama, the load generator), built into $WORK.
# Usage: bench_setup NAME (after cd to the repository root).
bench_setup() {
  WORK=${WORK:-$(mktemp -d -t "ollamaflow-$1.XXXXXX")}
  mkdir -p "$WORK"
  pids=()
  trap bench_cleanup EXIT
  echo "building into $WORK ..." >&2
  go build -o "$WORK/caddy" ./bench/caddy
  go build -o "$WORK/fakeollama" ./internal/fakeollama/cmd/fakeollama
  go build -o "$WORK/loadgen" ./bench/loadgen
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
