#!/usr/bin/env bash
# CI: build the Debian package with cargo-deb and check what it holds.
#
# The package's files, exactly (with the modes that matter), its control fields, maintainer
# scripts that parse, and, unpacked into a scratch root, a binary that runs and accepts the
# config it installs. `cargo deb --profile dist` makes CI's one optimised gateway build (the
# production build: no default features, fat LTO); a second run finds it fresh.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package-check: $*"; exit 1; }
command -v dpkg-deb >/dev/null || fail "needs dpkg-deb (a Debian or Ubuntu machine)"

if ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.8\.0$'; then
  echo "package-check: installing cargo-deb 3.8.0 (a few minutes)"
  start=$(date +%s)
  cargo install cargo-deb --version 3.8.0 --locked --quiet
  echo "package-check: cargo-deb installed in $(($(date +%s) - start)) s"
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
start=$(date +%s)
deb=$(cargo deb --locked --quiet --profile dist --output target/debian/ | tail -1)
echo "package-check: $deb in $(($(date +%s) - start)) s"
[ "$deb" = "target/debian/unitgate_${version}-1_${arch}.deb" ] || fail "unexpected package path: $deb"

# Every file (not directory) in the package, with its mode; nothing more, nothing less.
listing=$(dpkg-deb -c "$deb")
got=$(awk '$1 !~ /^d/ { print $1, $6 }' <<<"$listing" | sort)
want=$(sort <<'EOF'
-rw-r----- ./etc/unitgate/config.toml
-rwxr-xr-x ./usr/bin/unitgate
-rw-r--r-- ./usr/lib/systemd/system/unitgate.service
-rw-r--r-- ./usr/lib/udev/rules.d/99-unitgate-rs485.rules
-rw-r--r-- ./usr/share/doc/unitgate/README.md
-rw-r--r-- ./usr/share/doc/unitgate/copyright
-rw-r--r-- ./usr/share/doc/unitgate/default.toml
-rw-r--r-- ./usr/share/doc/unitgate/udev.md
EOF
)
if [ "$got" != "$want" ]; then
  diff <(echo "$want") <(echo "$got") || true
  fail "the package's files differ from the expected list (< expected, > packaged)"
fi
# Owned by root: the service user gets its group on /etc/unitgate from postinst.
owners=$(awk '{ print $2 }' <<<"$listing" | sort -u)
[ "$owners" = "0/0" ] || [ "$owners" = "root/root" ] || fail "files not owned by root: $owners"

info=$(dpkg-deb -I "$deb")
depends=$(sed -n 's/^ Depends: //p' <<<"$info")
grep -q 'libc6' <<<"$depends" || fail "Depends lacks libc6 (\$auto): $depends"
grep -q 'adduser' <<<"$depends" || fail "Depends lacks adduser: $depends"
grep -q "^ Version: ${version}-1$" <<<"$info" || fail "no Version ${version}-1"
for s in postinst postrm prerm; do
  grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\* +$s " <<<"$info" || fail "no $s script"
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg -x "$deb" "$root"
dpkg-deb -e "$deb" "$root/DEBIAN"
[ "$(cat "$root/DEBIAN/conffiles")" = "/etc/unitgate/config.toml" ] \
  || fail "conffiles: $(cat "$root/DEBIAN/conffiles")"
for s in postinst postrm prerm; do
  bash -n "$root/DEBIAN/$s" || fail "$s does not parse"
  ! grep -q '#DEBHELPER#' "$root/DEBIAN/$s" || fail "$s still has #DEBHELPER#"
done
grep -q 'adduser --system --group --home /var/lib/unitgate' "$root/DEBIAN/postinst" \
  || fail "postinst does not create the system user"
grep -q 'deb-systemd-helper' "$root/DEBIAN/postinst" || fail "postinst lacks the systemd handling"
grep -q 'deb-systemd-helper purge' "$root/DEBIAN/postrm" || fail "postrm lacks the systemd purge"
# Not enabled or started on install (the site id and a token come first): cargo-deb's
# "dont-enable" snippet re-enables only a unit that was enabled (debian-installed), and an
# upgrade only try-restarts a running one.
grep -q 'deb-systemd-helper debian-installed unitgate.service' "$root/DEBIAN/postinst" \
  || fail "postinst enables the service on install"
if grep -q 'deb-systemd-invoke start\|deb-systemd-invoke restart' "$root/DEBIAN/postinst"; then
  fail "postinst starts the service before the site is configured"
fi
grep -q 'deb-systemd-invoke try-restart unitgate.service' "$root/DEBIAN/postinst" \
  || fail "postinst does not restart a running service after an upgrade"

cmp -s udev/99-unitgate-rs485.rules "$root/usr/lib/udev/rules.d/99-unitgate-rs485.rules" \
  || fail "packaged udev rules differ from udev/"
cmp -s systemd/unitgate.service "$root/usr/lib/systemd/system/unitgate.service" \
  || fail "packaged unit differs from systemd/"
if readelf -S "$root/usr/bin/unitgate" | grep -q '\.symtab'; then
  fail "usr/bin/unitgate is not stripped"
fi
"$root/usr/bin/unitgate" version | grep -qx "unitgate $version" || fail "the binary does not run"

# The installed config passes check-config (the warning: it ships with no token).
out=$("$root/usr/bin/unitgate" check-config --config "$root/etc/unitgate/config.toml" 2>&1) \
  || { echo "$out"; fail "check-config refuses the packaged config"; }
grep -q ': ok$' <<<"$out" || fail "check-config: $out"
grep -q 'warning: api.tokens' <<<"$out" || fail "no warning about the missing token: $out"
! grep -q 'sha256 = "[0-9a-f]' "$root/etc/unitgate/config.toml" || fail "the packaged config holds a token"

# The maintainer scripts, run for real in a private mount namespace over a copy of /etc and
# scratch /var/lib and /run (the host's users and files stay as they were): install creates
# the user in dialout and sets the modes, an upgrade neither enables nor starts the unit,
# remove keeps user and state, purge deletes both.
if [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null && command -v adduser >/dev/null; then
  cp -a /etc "$root/host-etc"
  mkdir -p "$root/host-etc/unitgate"
  cp "$root/etc/unitgate/config.toml" "$root/host-etc/unitgate/"
  cat >"$root/maintainer-scripts.sh" <<'EOF_NS'
root=$1
mount --bind "$root/host-etc" /etc
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /run
export DPKG_MAINTSCRIPT_PACKAGE=unitgate
sh -e "$root/DEBIAN/postinst" configure >/dev/null
id -nG unitgate | tr ' ' '\n' | grep -qx dialout || { echo "not in dialout"; exit 1; }
[ "$(stat -c '%U:%G %a' /var/lib/unitgate)" = "unitgate:unitgate 750" ] || { stat /var/lib/unitgate; exit 1; }
[ "$(stat -c '%U:%G %a' /etc/unitgate/config.toml)" = "root:unitgate 640" ] || { stat /etc/unitgate/config.toml; exit 1; }
sh -e "$root/DEBIAN/postinst" configure 0.1.0-1 >/dev/null
! ls /etc/systemd/system/multi-user.target.wants/unitgate.service 2>/dev/null || { echo "enabled"; exit 1; }
sh -e "$root/DEBIAN/prerm" remove >/dev/null
sh -e "$root/DEBIAN/postrm" remove >/dev/null
[ -d /var/lib/unitgate ] && getent passwd unitgate >/dev/null || { echo "remove took user or state"; exit 1; }
rm /etc/unitgate/config.toml
sh -e "$root/DEBIAN/postrm" purge >/dev/null 2>&1
[ ! -e /var/lib/unitgate ] && ! getent passwd unitgate >/dev/null && ! getent group unitgate >/dev/null \
  || { echo "purge left user or state"; exit 1; }
echo "maintainer scripts: ok"
EOF_NS
  scripts=$(unshare -m sh -e "$root/maintainer-scripts.sh" "$root" 2>&1) \
    || { echo "$scripts"; fail "maintainer scripts failed"; }
  grep -q '^maintainer scripts: ok$' <<<"$scripts" || { echo "$scripts"; fail "maintainer scripts"; }
  echo "package-check: maintainer scripts ok (install: user in dialout, modes; upgrade: not enabled; remove keeps, purge deletes)"
else
  echo "package-check: maintainer scripts only parsed (running them needs root and a mount namespace)"
fi

size=$(stat -c %s "$deb")
bin=$(stat -c %s "$root/usr/bin/unitgate")
echo "package-check: ok ($(basename "$deb"): $((size / 1024)) KiB, $(wc -l <<<"$got") files, usr/bin/unitgate $((bin / 1024)) KiB stripped; Depends: $depends)"
