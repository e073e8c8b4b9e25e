#!/usr/bin/env bash
# Instructions per cloud command (issue 9: bench-thingsboard's "CPU per command beyond idle"),
# counted by callgrind, which is repeatable on a loaded machine where CPU time is not.
#   bash scripts/profile-command.sh [OUT_DIR]      (default /tmp/profile-command)
# Runs the bench's unitgate half (Mosquitto, hw-sim's Modbus TCP board, a unit on a coil;
# scripts/profile-command.py) under `valgrind --tool=callgrind --separate-threads=yes` in five
# runs: PROF_OPS=50 and 150 commands with bench.py's GET /v1/devices settle polls; 50 and 150
# without; 0 commands with 200 and 600 GETs. The differences give instructions per command,
# per command without the polls, and per GET, free of start-up; the board is polled every
# PROF_POLL_MS [60000] so that the wall time under valgrind does not add poll cycles (set 250
# for the bench's). Prints a table; each run's callgrind.out.* stay in OUT_DIR/<run>/ for
#   callgrind_annotate --inclusive=yes OUT_DIR/<run>/callgrind.out.<pid>-<thread>
# The binary is UNITGATE_BIN [target/release/unitgate]: build it with symbols, e.g.
#   CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bin unitgate
# Needs valgrind, mosquitto (/usr/sbin), hw-sim's release build, and target/tb-venv (paho;
# bash scripts/bench-thingsboard/run.sh creates it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/profile-command}
export UNITGATE_BIN=${UNITGATE_BIN:-target/release/unitgate}
export PROF_POLL_MS=${PROF_POLL_MS:-60000}
py=target/tb-venv/bin/python
mkdir -p "$out"

# run NAME OPS SETTLE GETS: the gateway's instructions, all threads, into $out/NAME/total.
run() {
  local d="$out/$1"
  rm -rf "$d" && mkdir -p "$d"
  UNITGATE_CMD="valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$d/callgrind.out.%p" \
    PROF_OPS=$2 PROF_SETTLE=$3 PROF_GETS=$4 "$py" scripts/profile-command.py >"$d/driver.json" 2>"$d/driver.log"
  local total=0 ir
  for f in "$d"/callgrind.out.*; do
    ir=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$f")
    total=$((total + ${ir:-0}))
  done
  echo "$total" >"$d/total"
  echo "$1: $total instructions ($(cat "$d/driver.json"))" >&2
}

run cmd50 50 1 0
run cmd150 150 1 0
run bare50 50 0 0
run bare150 150 0 0
run get200 0 0 200
run get600 0 0 600

t() { cat "$out/$1/total"; }
gets() { sed -n 's/.*"settle_gets": \([0-9]*\).*/\1/p' "$out/$1/driver.json"; }
per() { echo $(( ($(t "$2") - $(t "$1")) / $3 )); }
echo "instructions per command, with settle polls: $(per cmd50 cmd150 100) ($(( $(gets cmd150) - $(gets cmd50) )) GETs per 100 commands)"
echo "instructions per command, without polls:     $(per bare50 bare150 100)"
echo "instructions per GET /v1/devices:            $(per get200 get600 400)"
