#!/usr/bin/env bash
# Side-by-side timings on one machine, in one run: blocksnap's full and
# incremental snapshot, restore and delta restore of a real ext4 image,
# beside `b3sum` (the hashing floor) and `zstd -1` (the compression floor)
# over the same image. Prints a markdown table of medians, ratios and peak RSS.
#
# Usage: scripts/bench.sh [WORKDIR]
#   SIZE=1G DATA_MB=600 WRITES=300 RUNS=3 THREADS=0 scripts/bench.sh
# Needs: e2fsprogs, zstd, b3sum (cargo install b3sum), GNU time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for t in b3sum zstd mkfs.ext4 /usr/bin/time; do
    command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
SIZE=${SIZE:-1G}
DATA_MB=${DATA_MB:-600}
WRITES=${WRITES:-300}
RUNS=${RUNS:-3}
THREADS=${THREADS:-0}
cores=$(nproc)
work=${1:-$(mktemp -d /tmp/blocksnap-bench.XXXXXX)}
mkdir -p "$work"
cd "$work"

SIZE=$SIZE DATA_MB=$DATA_MB WRITES=$WRITES "$here/scripts/make-bench-images.sh" "$work"
apparent=$(stat -c %s v1.img)
allocated=$(du -B1 v1.img | cut -f1)

# Runs a command RUNS times (after `prep`), records the median wall time and
# the largest peak RSS.
measure() { # name prep cmd...
    local name=$1 prep=$2; shift 2
    local times=() rss=0
    for _ in $(seq 1 "$RUNS"); do
        eval "$prep"
        /usr/bin/time -f "%e %M" -o time.out "$@" >/dev/null 2>cmd.err || { cat cmd.err >&2; exit 1; }
        read -r t m < time.out
        times+=("$t"); [ "$m" -gt "$rss" ] && rss=$m
    done
    local med
    med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
    echo "$name $med $rss" >> results.txt
}

cat v1.img v2.img > /dev/null # warm the page cache for every tool alike
rm -f results.txt
tflag=(); [ "$THREADS" != 0 ] && tflag=(--threads "$THREADS")
bs() { "$bin" --store store "$@"; }
json_field() { sed -n "s/.*\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -1; }

measure b3sum ":" b3sum --num-threads "$cores" v1.img
measure zstd-1 ":" zstd -1 -T"$cores" -c v1.img
measure full "rm -rf store" "$bin" --store store snapshot create v1.img --no-parent "${tflag[@]}"
# Keep the store as it is after one full snapshot; each incremental run
# starts from a hard-linked copy of it (chunks are never modified in place).
rm -rf store store.full
bs snapshot create v1.img --no-parent --json "${tflag[@]}" > full.json
s1=$(json_field SnapshotId < full.json)
full_stored=$(json_field NewBytesStored < full.json)
mv store store.full
measure incremental "rm -rf store && cp -al store.full store" \
    "$bin" --store store snapshot create v2.img --parent "$s1" "${tflag[@]}"
rm -rf store && cp -al store.full store
bs snapshot create v2.img --parent "$s1" --json "${tflag[@]}" > inc.json
inc_stored=$(json_field NewBytesStored < inc.json)
measure restore "rm -f r.img" "$bin" --store store volume restore "$s1" r.img "${tflag[@]}"
cmp r.img v1.img || { echo "restore differs!" >&2; exit 1; }
r_alloc=$(du -B1 r.img | cut -f1)
measure delta-restore "cp --sparse=always v2.img d.img" "$bin" --store store volume restore --delta "$s1" d.img "${tflag[@]}"
cmp d.img v1.img || { echo "delta restore differs!" >&2; exit 1; }

b3=$(awk '$1=="b3sum"{print $2}' results.txt)
mb() { awk -v b="$1" 'BEGIN{printf "%.1f MB", b/1e6}'; }
echo
echo "image: $apparent bytes apparent, $(mb "$allocated") allocated; v2 = v1 + $WRITES random 64 KiB writes; $cores cores; median of $RUNS"
echo
echo "| step | seconds | × b3sum | peak RSS | stored |"
echo "|---|---|---|---|---|"
while read -r name t rss; do
    stored=""
    case $name in full) stored=$(mb "$full_stored");; incremental) stored=$(mb "$inc_stored");; restore) stored="restored file allocates $(mb "$r_alloc")";; esac
    awk -v n="$name" -v t="$t" -v b="$b3" -v r="$rss" -v s="$stored" \
        'BEGIN{printf "| %s | %.2f | %.2f | %.0f MiB | %s |\n", n, t, t/b, r/1024, s}'
done < results.txt
