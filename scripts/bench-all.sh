#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, in one sitting, one after the other:
#   bash scripts/bench-all.sh [OUT_DIR]        (default target/bench-all)
# Each bench's full output goes to OUT_DIR/<name>.log, its JSON line to OUT_DIR/<name>.json,
# and OUT_DIR/summary.txt records the machine, the commit, each bench's wall time and the
# load average before it (these machines are shared: a bench's own baseline runs beside it,
# so a ratio survives a noisy neighbour better than an absolute figure). A failing bench
# is recorded and the rest still run; the exit code is 1 if any failed.
# The shipped build (`--profile dist --no-default-features`) is the gateway under test for
# the ThingsBoard comparison and the footprint; callgrind's count (profile-command) needs
# valgrind and runs only when it is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-all}
mkdir -p "$out"
summary=$out/summary.txt
failed=0

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty tree)')"
  echo "cpu: $(nproc) x $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel: $(uname -r); $(rustc --version)"
} >"$summary"

# bench NAME COMMAND...: run one, keep its log and JSON line, note time and load.
bench() {
  local name=$1
  shift
  local t0 rc
  t0=$(date +%s)
  echo "== $name (load before: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$summary"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  grep -E '^\{' "$out/$name.log" | tail -1 >"$out/$name.json"
  echo "   $name: exit $rc, $(($(date +%s) - t0)) s" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
}

# Build everything first, so no bench shares the machine with the compiler.
cargo build --release --workspace --bins || exit 1
cargo build --profile dist --no-default-features --bin unitgate || exit 1
cargo bench --no-run || exit 1

bench api cargo bench --bench api
bench limits cargo bench --bench limits
bench hardware cargo bench --bench hardware
bench cloud cargo bench --bench cloud
bench footprint env BENCH_FOOTPRINT_BIN=target/dist/unitgate cargo bench --bench footprint
bench thingsboard bash scripts/bench-thingsboard/run.sh
if command -v valgrind >/dev/null 2>&1; then
  cargo build --release --bin unitgate --config 'profile.release.debug="line-tables-only"' || exit 1
  bench profile-command bash scripts/profile-command.sh "$out/profile-command"
fi
echo "done: $(date -u +%FT%TZ)" >>"$summary"
exit "$failed"
