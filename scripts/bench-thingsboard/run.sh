#!/usr/bin/env bash
# unitgate side by side with ThingsBoard IoT Gateway (issue 9; see bench.py for what is
# measured and how). A benchmark, not a test: not in `cargo test` nor .ci/run.
#   bash scripts/bench-thingsboard/run.sh        (BENCH_TB_OPS=300 BENCH_TB_IDLE_S=10)
# Installs its peers when missing: Debian mosquitto, a pinned venv in target/tb-venv. The
# gateway under test is the package build (profile dist, no default features, as
# `cargo deb --profile dist` builds it) unless UNITGATE_BIN names another; the relay board is
# hw-sim's release build (HW_SIM_BIN). Prints a table and one JSON line on stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/tb-venv
reqs=scripts/bench-thingsboard/requirements.txt

if ! [ -x /usr/sbin/mosquitto ]; then
  echo "bench-thingsboard: installing mosquitto" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
fi

# The venv is rebuilt when requirements.txt changes (its copy inside the venv differs).
if ! cmp -s "$reqs" "$venv/requirements.txt"; then
  echo "bench-thingsboard: creating $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$venv/requirements.txt"
fi

# Rebuilt only when a source is newer than the binary.
stale() { ! [ -x "$1" ] || [ -n "$(find "${@:2}" Cargo.toml Cargo.lock -newer "$1" -print -quit)" ]; }
export UNITGATE_BIN=${UNITGATE_BIN:-target/dist/unitgate}
if [ "$UNITGATE_BIN" = target/dist/unitgate ] && stale "$UNITGATE_BIN" src; then
  echo "bench-thingsboard: building $UNITGATE_BIN (profile dist, fat LTO: minutes)" >&2
  cargo build --quiet --locked --profile dist --no-default-features --bin unitgate -p unitgate
fi
export HW_SIM_BIN=${HW_SIM_BIN:-target/release/hw-sim}
if [ "$HW_SIM_BIN" = target/release/hw-sim ] && stale "$HW_SIM_BIN" hw-sim/src hw-sim/Cargo.toml; then
  echo "bench-thingsboard: building $HW_SIM_BIN" >&2
  cargo build --quiet --locked --release -p hw-sim --bin hw-sim
fi

export PYTHONPYCACHEPREFIX="$PWD/target/tb-pycache"
exec timeout --kill-after=10 "${BENCH_TB_TIMEOUT_S:-1200}" \
  "$venv/bin/python" scripts/bench-thingsboard/bench.py
