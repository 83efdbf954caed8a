#!/usr/bin/env bash
# Thread scaling of snapshot and restore, in memory (tmpfs), so that the
# disk is out of the picture: a SIZE_GB image, half random and half text,
# then a copy with 1% of its 512 KiB blocks rewritten; for each thread
# count, a full snapshot, an incremental one, a restore and a delta
# restore, best of RUNS, as seconds and GB/s of the image.
#
# Usage: THREADS="1 2 4 8 16" SIZE_GB=4 RUNS=2 scripts/scaling.sh [BIN]
set -euo pipefail
bin=$(realpath "${1:-$(dirname "$0")/../target/release/blocksnap}")
THREADS=${THREADS:-"1 2 4 8 16"}
SIZE_GB=${SIZE_GB:-4}
RUNS=${RUNS:-2}
shm=$(mktemp -d /dev/shm/blocksnap-scaling.XXXXXX)
trap 'rm -rf "$shm"' EXIT
cd "$shm"
python3 - "$SIZE_GB" <<'PY'
import os, random, sys
gb = int(sys.argv[1]); half = gb << 29; bs = 512 << 10
random.seed(7)
line = b"".join(b"host%d kernel: event %d status ok\n" % (i % 97, i) for i in range(40000))
with open("v1.img", "wb") as f:
    for _ in range(half // (8 << 20)):
        f.write(os.urandom(8 << 20))
    written = 0
    while written < half:
        chunk = line[: min(len(line), half - written)]
        f.write(chunk); written += len(chunk)
os.system("cp v1.img v2.img")
blocks = (gb << 30) // bs
with open("v2.img", "r+b") as f:
    for b in random.sample(range(blocks), blocks // 100):
        f.seek(b * bs + random.randrange(0, bs - 65536, 4096)); f.write(os.urandom(65536))
PY
size=$(stat -c %s v1.img)
echo "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); image $size bytes in tmpfs; best of $RUNS"
echo
echo "| threads | full snapshot | incremental | restore | delta restore |"
echo "|---|---|---|---|---|"
best() { sort -n | head -1; }
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN {printf "%.3f", b - a}'; }
gbps() { awk -v s="$size" -v t="$1" 'BEGIN {printf "%.2f", s / t / 1e9}'; }
for n in $THREADS; do
    f=(); i=(); r=(); d=()
    for _ in $(seq 1 "$RUNS"); do
        rm -rf store out.img delta.img
        export BLOCKSNAP_STORE=$shm/store
        f+=("$(t "$bin" -q snapshot create v1.img --no-parent --threads "$n")")
        s1=$("$bin" -q --json snapshot list | python3 -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][0]["SnapshotId"])')
        i+=("$(t "$bin" -q snapshot create v2.img --parent "$s1" --threads "$n")")
        r+=("$(t "$bin" -q volume restore "$s1" out.img --threads "$n")")
        cmp -s out.img v1.img || { echo "restore differs" >&2; exit 1; }
        cp v2.img delta.img
        d+=("$(t "$bin" -q volume restore "$s1" delta.img --delta --threads "$n")")
        cmp -s delta.img v1.img || { echo "delta restore differs" >&2; exit 1; }
    done
    F=$(printf '%s\n' "${f[@]}" | best); I=$(printf '%s\n' "${i[@]}" | best)
    R=$(printf '%s\n' "${r[@]}" | best); D=$(printf '%s\n' "${d[@]}" | best)
    printf '| %s | %.2f s (%s GB/s) | %.2f s (%s GB/s) | %.2f s (%s GB/s) | %.2f s (%s GB/s) |\n' \
        "$n" "$F" "$(gbps "$F")" "$I" "$(gbps "$I")" "$R" "$(gbps "$R")" "$D" "$(gbps "$D")"
done
