#!/usr/bin/env bash
# Runs README.md's walk-through block, as written, against a fresh demo and checks the
# outcome. Uses the debug binary the tests built (set UNITGATE_BIN to use another).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${UNITGATE_BIN:-target/debug/unitgate}
[ -x "$bin" ] || cargo build --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
token="walkthrough-$RANDOM$RANDOM"
log=$(mktemp)
"$bin" demo --listen "127.0.0.1:$port" --token "$token" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

export UNITGATE_URL="http://127.0.0.1:$port" TOKEN="$token"
block=$(sed -n '/<!-- walkthrough:start -->/,/<!-- walkthrough:end -->/p' README.md | sed '/^```/d; /^<!--/d')
out=$(bash -euo pipefail -c "$block")

fail() { echo "walk-through: $1"; echo "$out"; exit 1; }
status=$(curl -fsS -H "Authorization: Bearer $TOKEN" "$UNITGATE_URL/v1/units/u-A20" | grep -o '"status":"[a-z_]*"' | head -1)
[ "$status" = '"status":"available"' ] || fail "u-A20 ends $status, expected available"
types=$(curl -fsS -H "Authorization: Bearer $TOKEN" "$UNITGATE_URL/v1/events?after=60&limit=100" | grep -o '"type":"[a-z_.]*"' | tr '\n' ' ')
want='"type":"unit.reserved" "type":"unit.occupied" "type":"unit.overlocked" "type":"unit.occupied" "type":"unit.deallocated" "type":"unit.available" '
[ "$types" = "$want" ] || fail "events are: $types"
for s in reserved occupied overlocked available; do
  grep -q "\"status\":\"$s\"" <<<"$out" || fail "no answer showed status $s"
done
echo "walk-through: ok (6 steps, 6 events, u-A20 back to available)"
