#!/usr/bin/env bash
# Bounded fuzzing for CI: builds every cargo-fuzz target in fuzz/ with the stable toolchain,
# then runs each for FUZZ_SECONDS from its seed corpus. Fails on any crash, timeout, OOM or
# leak; the reproducer stays under target/fuzz-artifacts/<target>/ and its command is printed.
#
#   scripts/fuzz-ci.sh                 # every target, FUZZ_SECONDS (default 10) each
#   FUZZ_SECONDS=300 scripts/fuzz-ci.sh mqtt_command config
#
# It builds with plain cargo and the coverage flags cargo-fuzz would pass (sancov, no
# sanitizer: the code under test is safe Rust), 16 codegen units and opt-level 1, so CI
# needs neither cargo-fuzz (minutes to install) nor nightly, and the cold build fits its
# budget. With cargo-fuzz installed, `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target>`
# works as usual (and FUZZ_SANITIZER=address here uses it, for an ASan build).
#
# Environment: FUZZ_SECONDS (per target), FUZZ_SANITIZER (none | address),
# FUZZ_BUILD_ONLY=1 (build, run nothing), FUZZ_JOBS (cargo build jobs).
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-10}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

export RUSTC_BOOTSTRAP=1
export RUSTUP_TOOLCHAIN=${RUSTUP_TOOLCHAIN:-stable}
# Inside target/: cached with the rest of the build, ignored by git.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/target/fuzz}"
artifacts="$root/target/fuzz-artifacts"
work="$root/target/fuzz-corpus" # grown corpora; the committed seeds stay untouched

if [[ $FUZZ_SANITIZER != none ]] && ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# target  max_len  dictionary
targets=(
    "mqtt_command    65536 json"
    "signed_envelope 8192  json"
    "mqtt_chunks     8192  json"
    "webhook         16384 json"
    "http_api        65536 json"
    "config          16384 toml"
    "sim_scenario    16384 toml"
    "sim_site        16384 toml"
    "rtu_framer      2048  -"
    "osdp_sniffer    4096  -"
)
want=("$@")

build_flags=(-s "$FUZZ_SANITIZER" --debug-assertions --codegen-units 16 --target-dir "$CARGO_TARGET_DIR")
if [[ -n ${FUZZ_JOBS:-} ]]; then export CARGO_BUILD_JOBS=$FUZZ_JOBS; fi
host=$(rustc -vV | sed -n 's/^host: //p')

start=$(date +%s)
echo "== building fuzz targets (sanitizer: $FUZZ_SANITIZER)"
if [[ $FUZZ_SANITIZER == none ]]; then
    # What `cargo fuzz build -s none --debug-assertions` passes (cargo-fuzz 0.13.2,
    # project.rs); --target keeps the flags off build scripts and proc macros.
    (cd fuzz && RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions \
-Ccodegen-units=16" cargo build --locked --release --bins --target "$host")
else
    cargo fuzz build "${build_flags[@]}"
fi
built=$(date +%s)
echo "== built in $((built - start)) s"
[[ ${FUZZ_BUILD_ONLY:-0} == 1 ]] && exit 0

bin="$CARGO_TARGET_DIR/$host/release"
failed=()
for line in "${targets[@]}"; do
    read -r name max_len dict <<<"$line"
    if ((${#want[@]})) && [[ " ${want[*]} " != *" $name "* ]]; then continue; fi
    mkdir -p "$artifacts/$name" "$work/$name"
    args=(
        "$work/$name" "fuzz/corpus/$name"
        -max_total_time="$FUZZ_SECONDS"
        -max_len="$max_len"
        -timeout=10
        -rss_limit_mb=2048
        -print_final_stats=1
        -artifact_prefix="$artifacts/$name/"
    )
    [[ $dict != - ]] && args+=(-dict="fuzz/dict/$dict.dict")
    echo "== $name: ${FUZZ_SECONDS}s"
    # The built binary directly: `cargo fuzz run` would re-check the whole build each time.
    if ! "$bin/$name" "${args[@]}" >"$artifacts/$name.log" 2>&1; then
        failed+=("$name")
        tail -n 60 "$artifacts/$name.log"
        for a in "$artifacts/$name"/{crash,timeout,oom,leak}-*; do
            [[ -e $a ]] || continue
            echo "!! $name: $a"
            echo "   reproduce: $bin/$name $a   (or: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $name $a)"
        done
    else
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec)' "$artifacts/$name.log" |
            sed "s/^/   /" || true
    fi
done

echo "== fuzzing took $(($(date +%s) - built)) s, $(($(date +%s) - start)) s in all"
if ((${#failed[@]})); then
    echo "!! fuzz targets failed: ${failed[*]} (logs and reproducers in $artifacts)"
    exit 1
fi
