#!/usr/bin/env bash
# What encryption costs: full snapshot, incremental and restore of the same
# image, plain and encrypted, alternating in one run (medians of RUNS), as
# ratios. An encrypted command includes unlocking its key (one Argon2id).
#
# Usage: scripts/bench-encryption.sh V1.img V2.img [WORKDIR]
#   (the peers images: scripts/bench-peers.sh builds them)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || (cd "$here" && cargo build --release)
v1=$(realpath "$1")
v2=$(realpath "$2")
work=${3:-/tmp/blocksnap-bench-encryption}
RUNS=${RUNS:-3}
export BLOCKSNAP_PASSPHRASE=${BLOCKSNAP_PASSPHRASE:-bench passphrase}
rm -rf "$work" && mkdir -p "$work"
cd "$work"

secs() { # command... -> "wall,cpu" seconds (cpu: user + system)
    /usr/bin/time -f "%e,%U,%S" -o "$work/time.txt" "$@" >/dev/null
    awk -F, '{printf "%s,%.2f", $1, $2 + $3}' "$work/time.txt"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A t
for run in $(seq "$RUNS"); do
    # Alternate which goes first, and free the last run's stores well
    # before timing anything: ext4 on this VM slows file creation right
    # after gigabytes are freed.
    rm -rf "$work"/store-* out.img && sync && sleep 5
    order="plain encrypted"
    [ $((run % 2)) = 0 ] && order="encrypted plain"
    for mode in $order; do
        store=$work/store-$mode
        flags=()
        if [ $mode = encrypted ]; then
            BLOCKSNAP_STORE=$store "$bin" key create --alias bench >/dev/null
            flags=(--kms-key-id alias/bench)
        fi
        cp --reflink=auto --sparse=always "$v1" vol.img
        sync
        t[$mode-full]+="$(BLOCKSNAP_STORE=$store secs "$bin" snapshot create vol.img "${flags[@]}" -q) "
        cp --reflink=auto --sparse=always "$v2" vol.img
        sync
        t[$mode-incr]+="$(BLOCKSNAP_STORE=$store secs "$bin" snapshot create vol.img -q) "
        # Nothing changed: every block is taken from the parent unread.
        t[$mode-unchanged]+="$(BLOCKSNAP_STORE=$store secs "$bin" snapshot create vol.img -q) "
        snap=$(BLOCKSNAP_STORE=$store "$bin" snapshot list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][0]["SnapshotId"])')
        sync
        t[$mode-restore]+="$(BLOCKSNAP_STORE=$store secs "$bin" volume restore "$snap" out.img -q) "
        t[$mode-stored]="$(du -sb "$store" | cut -f1)"
        rm -f out.img vol.img
    done
done
printf '%-12s %10s %10s %8s %10s %10s %8s\n' step plain encrypted ratio "plain cpu" "enc cpu" ratio
for step in full incr unchanged restore; do
    col() { echo "${t[$1-$step]}" | tr ' ' '\n' | grep . | cut -d, -f"$2" | median; }
    p=$(col plain 1) e=$(col encrypted 1) pc=$(col plain 2) ec=$(col encrypted 2)
    printf '%-12s %9.2fs %9.2fs %7.2fx %9.2fs %9.2fs %7.2fx\n' "$step" "$p" "$e" \
        "$(echo "$e / $p" | bc -l)" "$pc" "$ec" "$(echo "$ec / $pc" | bc -l)"
done
printf '%-12s %10s %10s %7.3fx\n' stored "${t[plain-stored]}" "${t[encrypted-stored]}" \
    "$(echo "${t[encrypted-stored]} / ${t[plain-stored]}" | bc -l)"
