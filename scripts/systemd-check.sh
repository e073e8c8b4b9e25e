#!/usr/bin/env bash
# Checks systemd/unitgate.service: `systemd-analyze verify` (with ExecStart pointed at the
# built binary, since /usr/bin/unitgate is not installed here) and the offline
# `systemd-analyze security` exposure score, which must stay at or below 2.0 ("OK").
# Usage: scripts/systemd-check.sh [path/to/unitgate]   (default: target/debug/unitgate)
set -euo pipefail
cd "$(dirname "$0")/.."
unit=systemd/unitgate.service
bin=$(realpath "${1:-target/debug/unitgate}")
[[ -x $bin ]] || { echo "no unitgate binary at $bin (cargo build first)" >&2; exit 1; }
if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
fi

# What the service relies on (DESIGN.md §6, README "Running as a service").
for line in 'Type=notify' 'NotifyAccess=main' 'WatchdogSec=30' 'Restart=on-failure' \
  'User=unitgate' 'SupplementaryGroups=dialout' 'StateDirectory=unitgate' \
  'ExecStart=/usr/bin/unitgate run --config /etc/unitgate/config.toml' \
  'ExecReload=/bin/kill -HUP $MAINPID' 'CapabilityBoundingSet=' 'ProtectSystem=strict'; do
  grep -qxF "$line" "$unit" || { echo "$unit: missing $line" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#^ExecStart=/usr/bin/unitgate #ExecStart=$bin #" "$unit" >"$tmp/unitgate.service"
out=$(systemd-analyze verify --man=no "$tmp/unitgate.service" 2>&1) || { echo "$out" >&2; exit 1; }
# verify exits 0 on some warnings; any output at all is a finding.
[[ -z $out ]] || { echo "systemd-analyze verify: $out" >&2; exit 1; }
echo "systemd-analyze verify: clean"

version=$(systemd-analyze --version | awk 'NR==1 {print $2}')
if ((version >= 252)); then
  systemd-analyze security --offline=true --threshold=20 --no-pager "$tmp/unitgate.service" \
    | grep -E '^→ Overall'
else
  echo "systemd $version: no offline security analysis (needs 252)"
fi
