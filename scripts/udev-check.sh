#!/usr/bin/env bash
# CI: the udev rules in udev/ parse, and their lines do what they say.
#
# 1. A strict parser (below, Python): every line is KEY<op>"value" pairs of keys udev knows,
#    with an operator that key allows; GOTO targets exist; the example lines (commented out
#    in the file) parse too; every name is /dev/unitgate-rs485-N with N unique.
# 2. udev's own parser: `udevadm verify` (systemd >= 254) if there is one; else (systemd 252,
#    Debian 12) `udevadm test` on a real tty device in a private mount namespace (its /run and
#    /dev are scratch tmpfs, so nothing on the host changes), with the rules plus the examples
#    uncommented and one of them aimed at that device: no line may be refused, and the device
#    must get the link, group and mode. udevadm comes from the `udev` package; when it is not
#    installed, the .deb matching the installed systemd is unpacked into target/udev-tools.
set -euo pipefail
cd "$(dirname "$0")/.."

rules=udev/99-unitgate-rs485.rules
[ -f "$rules" ] || { echo "udev-check: $rules missing"; exit 1; }

echo "udev-check: strict parse of $rules"
python3 - "$rules" <<'PY'
import re, sys

path = sys.argv[1]
MATCH_ONLY = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS", "DRIVER",
              "DRIVERS", "ATTRS", "TAGS", "CONST", "TEST", "RESULT", "PROGRAM"}
ASSIGN_ONLY = {"OWNER", "GROUP", "MODE", "RUN", "LABEL", "GOTO", "OPTIONS", "SECLABEL", "IMPORT"}
BOTH = {"NAME", "SYMLINK", "ATTR", "SYSCTL", "ENV", "TAG"}
WITH_ATTR = {"ATTR", "ATTRS", "SYSCTL", "ENV", "CONST", "TEST", "RUN", "IMPORT", "SECLABEL"}
PAIR = re.compile(r'\s*([A-Z]+)(\{[^}]*\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')

errors, labels, gotos, links = [], set(), [], {}

def parse(line, where):
    pos, seen = 0, []
    while pos < len(line):
        m = PAIR.match(line, pos)
        if not m:
            errors.append(f"{where}: cannot parse at column {pos + 1}: {line[pos:]!r}")
            return
        key, attr, op, value, sep = m.groups()
        if key not in MATCH_ONLY | ASSIGN_ONLY | BOTH:
            errors.append(f"{where}: unknown key {key}")
        if (attr is not None) != (key in WITH_ATTR) and key not in ("IMPORT", "RUN", "TEST"):
            errors.append(f"{where}: {key} {'needs' if attr is None else 'takes no'} {{attribute}}")
        if key in MATCH_ONLY and op not in ("==", "!="):
            errors.append(f"{where}: {key} only matches (== or !=), not {op}")
        if key in ASSIGN_ONLY and op in ("==", "!="):
            errors.append(f"{where}: {key} only assigns, not {op}")
        if key in ("LABEL", "GOTO") and op != "=":
            errors.append(f"{where}: {key} takes =")
        if key == "MODE" and not re.fullmatch(r"0[0-7]{3}", value):
            errors.append(f"{where}: MODE {value!r} is not octal 0NNN")
        if key == "MODE" and value[-1] != "0":
            errors.append(f"{where}: MODE {value} gives others access")
        if key == "GROUP" and value != "dialout":
            errors.append(f"{where}: GROUP must be dialout (the unitgate user's group)")
        if key == "LABEL":
            labels.add(value)
        if key == "GOTO":
            gotos.append((where, value))
        if key == "SYMLINK":
            if not re.fullmatch(r"unitgate-rs485-\d+", value) or op != "+=":
                errors.append(f"{where}: SYMLINK must be += \"unitgate-rs485-N\", not {op}{value!r}")
            elif value in links:
                errors.append(f"{where}: {value} is also named at {links[value]}")
            else:
                links[value] = where
        seen.append(key)
        pos = m.end()
        if sep == "" and pos < len(line):
            errors.append(f"{where}: missing comma before {line[pos:]!r}")
            return
    if "SYMLINK" in seen and not {"GROUP", "MODE"} <= set(seen):
        errors.append(f"{where}: a naming line also sets GROUP and MODE")

examples = 0
with open(path) as f:
    for n, raw in enumerate(f, 1):
        line = raw.rstrip("\n")
        if line.strip() == "":
            continue
        if line.startswith("#"):
            body = line[1:]
            # An example rule: commented out without a space, e.g. #ATTRS{idVendor}==...
            if re.match(r"[A-Z]+(\{[^}]*\})?\s*(==|!=|\+=|:=|=)", body):
                examples += 1
                parse(body, f"{path}:{n} (example)")
            continue
        parse(line, f"{path}:{n}")
for where, target in gotos:
    if target not in labels:
        errors.append(f"{where}: GOTO {target!r} has no LABEL")
if examples < 6:
    errors.append(f"{path}: expected an example per chip and a by-path one, found {examples}")
if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"udev-check: parser ok ({examples} example rules, names {', '.join(sorted(links))})")
PY

# udev's own parser.
udevadm=$(command -v udevadm || true)
if [ -z "$udevadm" ]; then
  tools=target/udev-tools
  if [ ! -x "$tools/bin/udevadm" ]; then
    version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
    [ -n "$version" ] || { echo "udev-check: no udevadm and no systemd package to match"; exit 1; }
    mkdir -p "$tools"
    (cd "$tools" && apt-get download -q "udev=$version" >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download -q "udev=$version" >/dev/null; })
    dpkg -x "$tools"/udev_*.deb "$tools"
  fi
  udevadm=$tools/bin/udevadm
fi
echo "udev-check: $("$udevadm" --version | head -1) ($udevadm)"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The rules with every example uncommented; the FT232R one aimed at a device every Linux has.
dev=tty
sed -e 's/^#\([A-Z]\+\({[^}]*}\)\?\(==\|!=\|+=\|:=\|=\)\)/\1/' \
  -e "s/ATTRS{idVendor}==\"0403\", ATTRS{idProduct}==\"6001\", ATTRS{serial}==\"[^\"]*\"/KERNEL==\"$dev\"/" \
  "$rules" >"$scratch/99-unitgate-rs485.rules"
grep -q "^KERNEL==\"$dev\", SYMLINK+=\"unitgate-rs485-0\"" "$scratch/99-unitgate-rs485.rules" \
  || { echo "udev-check: the FT232R example (unitgate-rs485-0) is not where expected"; exit 1; }

if "$udevadm" verify --help >/dev/null 2>&1; then
  "$udevadm" verify --no-summary "$rules" "$scratch/99-unitgate-rs485.rules"
  echo "udev-check: udevadm verify ok"
  exit 0
fi

if [ "$(id -u)" != 0 ] || ! unshare -m true 2>/dev/null; then
  echo "udev-check: udevadm test needs root and a mount namespace; only the parser check ran"
  exit 0
fi
out=$(unshare -m sh -c '
  mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /dev &&
  mkdir -p /run/udev/rules.d && cp "$1" /run/udev/rules.d/ &&
  "$2" test --action=add "/sys/class/tty/$3"' sh "$scratch/99-unitgate-rs485.rules" "$udevadm" "$dev" 2>&1) \
  || { echo "$out"; echo "udev-check: udevadm test failed"; exit 1; }
ours=$(grep '99-unitgate-rs485.rules' <<<"$out" || true)
fail() { echo "$ours"; echo "udev-check: $1"; exit 1; }
grep -q "Reading rules file: /run/udev/rules.d/99-unitgate-rs485.rules" <<<"$ours" || fail "udevadm did not read the rules"
if grep -v "Reading rules file" <<<"$ours" | grep -vE ":[0-9]+ (GROUP|MODE|LINK) " | grep -q .; then
  fail "udevadm refused a line"
fi
grep -qE ":[0-9]+ LINK 'unitgate-rs485-0'" <<<"$ours" || fail "no link unitgate-rs485-0"
grep -qE ":[0-9]+ MODE 0660" <<<"$ours" || fail "no MODE 0660"
grep -qE ":[0-9]+ GROUP [0-9]+" <<<"$ours" || fail "no GROUP"
grep -q "^DEVLINKS=.*/dev/unitgate-rs485-0" <<<"$out" || fail "DEVLINKS lacks /dev/unitgate-rs485-0"
echo "udev-check: udevadm test ok (every line accepted; /sys/class/tty/$dev -> /dev/unitgate-rs485-0, group dialout, 0660)"
