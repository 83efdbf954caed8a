#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 120), seeded from
# testdata/fuzz/<target>/, and prints each target's executions.
# Needs: cargo install cargo-fuzz. Works on a stable toolchain through
# RUSTC_BOOTSTRAP=1 (cargo fuzz needs unstable sanitizer flags).
# A crash leaves its input in fuzz/artifacts/<target>/: copy it into
# testdata/fuzz/<target>/ with the fix, so `cargo test` replays it forever.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SECONDS_PER_TARGET:-${1:-120}}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in chunk snapshot_manifest image_manifest store_json instance_json nbd_reply sigv4_request; do
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    cargo fuzz run -O "$target" "fuzz/corpus/$target" "testdata/fuzz/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=1048576 > "$log" 2>&1 || {
        tail -40 "$log"; echo "FUZZ CRASH in $target" >&2; exit 1; }
    execs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || true)
    echo "$target: ${seconds}s, ${execs:-?} executions, no crash"
    rm -f "$log"
done
