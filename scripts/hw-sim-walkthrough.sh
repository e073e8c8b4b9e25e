#!/usr/bin/env bash
# Runs hw-sim/README.md's walk-through block, as written, against `hw-sim serve` of the
# demo site, and checks what it printed. Uses the debug build (HW_SIM_BIN to override).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -q -p hw-sim
bin=${HW_SIM_BIN:-target/debug/hw-sim}
# The walk-through uses the demo site's fixed ports: refuse to run over another simulator.
if curl -fsS http://127.0.0.1:9900/healthz >/dev/null 2>&1; then
  echo "hw-sim walk-through: something already answers on 127.0.0.1:9900; stop it first"; exit 1
fi
log=$(mktemp)
"$bin" serve --config config/sim.toml >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:9900/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

block=$(sed -n '/<!-- walkthrough:start -->/,/<!-- walkthrough:end -->/p' hw-sim/README.md | sed '/^```/d; /^<!--/d')
# `alias` does not expand in a non-interactive shell: give it the same meaning.
out=$(bash -euo pipefail -c "shopt -s expand_aliases; $block" 2>&1)

fail() { echo "hw-sim walk-through: $1"; echo "$out"; exit 1; }
for want in "gate-1" "relay-1 input 3: open" "00010000" "locks: http503" "cleared 1 fault" \
            "lock-A01: unassigned" "relay-1 input 3: closed" "11 passed, 0 failed"; do
  grep -qF -- "$want" <<<"$out" || fail "missing \"$want\""
done
echo "hw-sim walk-through: ok"
