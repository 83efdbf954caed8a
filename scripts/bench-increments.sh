#!/usr/bin/env bash
# What an incremental stores against what changed, for three write
# patterns on a real ext4 image (SIZE, 3/4 full of random files):
#   scattered  4 KiB writes at 1 % of the pages, random offsets
#   64k        64 KiB writes (16 pages each) over 1 % of the pages
#   files      whole files rewritten in place (their blocks, from debugfs)
#   copy       the scattered change made to a copy at a new path, which
#              has to find its parent by a sample of its blocks
# Changed bytes are counted in 4 KiB pages (`cmp -l` of the two images),
# the increment is the snapshot's NewBytesStored. Bytes, not time: one
# run is enough.
#
# Usage: scripts/bench-increments.sh [WORKDIR]   (SIZE=1G by default)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || (cd "$here" && cargo build --release)
SIZE=${SIZE:-1G}
work=${1:-/tmp/blocksnap-increments}
rm -rf "$work" && mkdir -p "$work/src"
cd "$work"
export BLOCKSNAP_STORE=$work/store

bytes=$(numfmt --from=iec "$SIZE")
pages=$((bytes / 4096))
files=$((bytes * 3 / 4 / (4 << 20)))
for i in $(seq "$files"); do
    head -c $((4 << 20)) /dev/urandom >"src/f$i"
done
truncate -s "$SIZE" base.img
mkfs.ext4 -q -F -d src base.img
rm -rf src

stored() { python3 -c 'import json,sys; print(json.load(sys.stdin)["Stats"]["NewBytesStored"])'; }
changed_pages() { # a b -> how many 4 KiB pages differ
    python3 - "$1" "$2" <<'PY'
import sys
n = 0
with open(sys.argv[1], "rb") as a, open(sys.argv[2], "rb") as b:
    while True:
        x, y = a.read(1 << 20), b.read(1 << 20)
        if not x and not y:
            break
        if x != y:
            n += sum(x[i:i + 4096] != y[i:i + 4096] for i in range(0, max(len(x), len(y)), 4096))
print(n)
PY
}

# Writes `count` runs of `run` random bytes at random page-aligned offsets.
scatter() { # image count run_bytes seed
    python3 - "$@" <<'EOF'
import os, random, sys
img, count, run, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
size = os.path.getsize(img)
random.seed(seed)
with open(img, "r+b") as f:
    for _ in range(count):
        f.seek(random.randrange(size // run) * run)
        f.write(os.urandom(run))
EOF
}

# Rewrites `n` whole files of the image in place: their blocks get new bytes.
rewrite_files() { # image n
    local img=$1 n=$2
    for i in $(seq "$n"); do
        debugfs -R "blocks /f$((i * 7))" "$img" 2>/dev/null | tr ' ' '\n' | grep . |
            awk '{printf "%d\n", $1}' >blocks.txt
        python3 - "$img" blocks.txt <<'EOF'
import os, sys
img, listing = sys.argv[1], sys.argv[2]
with open(img, "r+b") as f:
    for line in open(listing):
        f.seek(int(line) * 4096)
        f.write(os.urandom(4096))
EOF
    done
}

printf '%-10s %14s %14s %8s\n' pattern changed stored ratio
report() { # name old new snapshot-json
    local c s
    c=$(($(changed_pages "$2" "$3") * 4096))
    s=$(echo "$4" | stored)
    printf '%-10s %14d %14d %7.3fx\n' "$1" "$c" "$s" "$(echo "$s / $c" | bc -l)"
}

for pattern in scattered 64k files; do
    cp --sparse=always base.img vol-$pattern.img
    "$bin" snapshot create vol-$pattern.img -q >/dev/null 2>&1
    cp --sparse=always vol-$pattern.img before.img
    case $pattern in
    scattered) scatter vol-$pattern.img $((pages / 100)) 4096 1 ;;
    64k) scatter vol-$pattern.img $((pages / 100 / 16)) 65536 2 ;;
    files) rewrite_files vol-$pattern.img $((files / 100 + 1)) ;;
    esac
    report "$pattern" before.img vol-$pattern.img "$("$bin" snapshot create vol-$pattern.img --json)"
    rm -f before.img
done

# A copy at a new path, changed as `scattered` was, in a store holding
# only the original.
export BLOCKSNAP_STORE=$work/store-copy
"$bin" snapshot create base.img -q >/dev/null
cp --sparse=always base.img copy.img
scatter copy.img $((pages / 100)) 4096 3
report copy base.img copy.img "$("$bin" snapshot create copy.img --json 2>/dev/null)"
