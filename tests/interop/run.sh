#!/usr/bin/env bash
# The interop suite: the gateway against third-party peers (Mosquitto and paho-mqtt as the
# cloud, pymodbus as the relay board over TCP and RTU on a socat pty pair, libosdp as the
# keypad, schemathesis against /openapi.json), and its web pages in headless Chromium
# (Selenium + chromium-driver; screenshots in target/screenshots/).
# Installs its peers when missing (Debian packages, a pinned Python venv in target/), builds
# the gateway if needed, then runs pytest on tests/interop with a bounded timeout; arguments
# go to pytest (e.g. `-k signed -x`).
# Logs of every process a test started are kept in target/interop-logs/.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/interop-venv
timeout_s=${INTEROP_TIMEOUT_S:-300}

if ! [ -x /usr/sbin/mosquitto ] || ! command -v mosquitto_passwd >/dev/null 2>&1 ||
  ! command -v socat >/dev/null 2>&1 || ! [ -x /usr/bin/chromium ] ||
  ! [ -x /usr/bin/chromedriver ]; then
  echo "interop: installing mosquitto, socat, chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto socat chromium chromium-driver >/dev/null
  # The package starts a system broker on 1883 where systemd runs; the suite uses free
  # ports, and `unitgate demo` wants 1883 for its own broker: stop the one we just installed.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
fi

# The venv is rebuilt when requirements.txt changes (its copy inside the venv differs).
if ! cmp -s tests/interop/requirements.txt "$venv/requirements.txt"; then
  echo "interop: creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/interop/requirements.txt
  cp tests/interop/requirements.txt "$venv/requirements.txt"
fi

# The debug binary `cargo test` leaves (as scripts/readme-walkthrough.sh uses it), rebuilt only
# when a source is newer: `cargo build` picks other dependency features than `cargo test` and
# would build a second variant of it for nothing.
export UNITGATE_BIN=${UNITGATE_BIN:-target/debug/unitgate}
if [ "$UNITGATE_BIN" = target/debug/unitgate ] && { ! [ -x "$UNITGATE_BIN" ] ||
  [ -n "$(find src hw-sim/src Cargo.toml hw-sim/Cargo.toml Cargo.lock -newer "$UNITGATE_BIN" -print -quit)" ]; }; then
  echo "interop: building $UNITGATE_BIN"
  cargo build --quiet --bin unitgate -p unitgate
fi
[ -x "$UNITGATE_BIN" ] || { echo "interop: no gateway binary at $UNITGATE_BIN"; exit 1; }

rm -rf target/interop-logs
mkdir -p target/interop-logs
export INTEROP_LOGS="$PWD/target/interop-logs" PYTHONPYCACHEPREFIX="$PWD/target/interop-pycache"
start=$(date +%s)
status=0
timeout --kill-after=10 "$timeout_s" "$venv/bin/python" -m pytest -q tests/interop "$@" || status=$?
echo "interop: pytest exited $status after $(($(date +%s) - start)) s (logs: target/interop-logs/)"
exit "$status"
