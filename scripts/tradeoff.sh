#!/usr/bin/env bash
# Block size and delta scheme vs bytes an incremental stores, snapshot and
# restore time and manifest size, on bench-peers.sh's images (v1, and v2 =
# v1 + 1,311 scattered 64 KiB writes). Prints a markdown table.
# Usage: scripts/tradeoff.sh [WORKDIR with v1.img and v2.img]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
work=${1:-/tmp/blocksnap-peers}
cd "$work"
[ -f v1.img ] && [ -f v2.img ] || { echo "run scripts/bench-peers.sh first" >&2; exit 1; }
t() { /usr/bin/time -f "%e" -o .t.out "$@" >/dev/null 2>.t.err || { cat .t.err >&2; return 1; }; cat .t.out; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
echo "| block size | changed blocks stored as | full | incremental | increment stored | restore v2 | manifest |"
echo "|---|---|---|---|---|---|---|"
for scheme in "512K delta" "512K whole" "1M delta" "256K delta" "128K whole" "64K whole" "64K delta"; do
    set -- $scheme
    bs=$1; flag=(); [ "$2" = whole ] && flag=(--no-delta)
    rm -rf ts out.img; sync
    full=$(t "$bin" -q --store ts snapshot create v1.img --no-parent --block-size "$bs" "${flag[@]}")
    sync
    inc=$(t "$bin" -q --store ts snapshot create v2.img --parent "$("$bin" --store ts snapshot list --json | json 'd["Snapshots"][0]["SnapshotId"]')" "${flag[@]}")
    s2=$("$bin" --store ts snapshot list --json | json 'd["Snapshots"][1]["SnapshotId"]')
    stored=$("$bin" --store ts snapshot describe "$s2" --json | json 'd["Snapshots"][0]["Stats"]["NewBytesStored"]')
    sync
    rest=$(t "$bin" -q --store ts volume restore "$s2" out.img)
    cmp -s out.img v2.img || { echo "restore of $scheme differs" >&2; exit 1; }
    manifest=$(stat -c %s "ts/local/snapshots/$s2")
    awk -v bs="$bs" -v sc="$2" -v f="$full" -v i="$inc" -v s="$stored" -v r="$rest" -v m="$manifest" \
        'BEGIN{printf "| %s | %s | %.2f s | %.2f s | %.1f MB | %.2f s | %.0f KB |\n", bs, (sc=="delta"?"zstd delta vs parent":"whole blocks"), f, i, s/1e6, r, m/1e3}'
done
rm -rf ts out.img
