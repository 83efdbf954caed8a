#!/usr/bin/env bash
# blocksnap beside the tools its users would pick instead, on the same
# images, in one run: full snapshot, incremental, bytes the incremental
# stored, restore (and whether it is sparse), delta restore; plus the
# floors `b3sum` (hashing) and `zstd -1` (compression), and each target's
# floor from the same run (the incremental's: b3sum of v2 plus zstd -1 of
# the changed blocks; the delta restore's: b3sum of the target plus
# writing the differing blocks; the increment's: the changed 4 KiB pages).
# Medians of RUNS. PEERS="" measures blocksnap and the floors alone.
#
# Usage: scripts/bench-peers.sh [WORKDIR]
#   RUNS=3 SIZE=4G TEXT_MB=1350 RANDOM_MB=1350 WRITES=1311 scripts/bench-peers.sh
#   PEERS="borg-lz4 borg-zstd borg-fixed restic casync rustic"  (those installed run)
# Installs what it can: restic, borgbackup, casync, zstd from Debian; b3sum
# (and rustic, if RUSTIC=1) with cargo. Not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || (cd "$here" && cargo build --release)
RUNS=${RUNS:-3}
SIZE=${SIZE:-4G}
TEXT_MB=${TEXT_MB:-1350}
RANDOM_MB=${RANDOM_MB:-1350}
WRITES=${WRITES:-1311}
PEERS=${PEERS-"borg-lz4 borg-zstd borg-fixed restic casync rustic"}
cores=$(nproc)
work=${1:-/tmp/blocksnap-peers}
mkdir -p "$work"
cd "$work"

install_peers() {
    local want=()
    command -v borg >/dev/null || want+=(borgbackup)
    command -v restic >/dev/null || want+=(restic)
    command -v casync >/dev/null || want+=(casync)
    command -v zstd >/dev/null || want+=(zstd)
    if [ ${#want[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${want[@]}" >/dev/null || true
    fi
    command -v b3sum >/dev/null || cargo install b3sum >/dev/null 2>&1 || true
    if [ "${RUSTIC:-0}" = 1 ]; then command -v rustic >/dev/null || cargo install rustic-rs >/dev/null 2>&1 || true; fi
}

# Reproducible images: fixed seeds, so every run and machine builds the same bytes.
make_images() {
    [ -f v1.img ] && return
    echo "building images in $work (text ${TEXT_MB} MB, random ${RANDOM_MB} MB, $SIZE)" >&2
    rm -rf files && mkdir -p files/text files/random
    python3 - "$TEXT_MB" "$RANDOM_MB" <<'PY'
import random, sys
text_mb, random_mb = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(20261126)
words = [w.encode() for w in "the quick brown fox jumps over lazy dog kernel event accepted connection from host port user session opened closed error warning info debug".split()]
i = 0
while text_mb > 0:
    n = min(text_mb, 24)
    with open(f"files/text/log{i:04d}.txt", "wb") as f:
        out = bytearray()
        line = 0
        while len(out) < n << 20:
            out += b"%08d " % line + b" ".join(rng.choice(words) for _ in range(10)) + b"\n"
            line += 1
        f.write(out[: n << 20])
    text_mb -= n; i += 1
i = 0
while random_mb > 0:
    n = min(random_mb, 1 + i % 32)
    with open(f"files/random/r{i:04d}.bin", "wb") as f:
        f.write(rng.randbytes(n << 20))
    random_mb -= n; i += 1
PY
    truncate -s "$SIZE" v1.img
    mkfs.ext4 -q -F -E lazy_itable_init=0 -U 6b1e4c0a-3f8e-4d2b-9c1a-5e7f8a9b0c1d -d files v1.img
    rm -rf files
    cp --sparse=always v1.img v2.img
    python3 - "$WRITES" <<'PY'
import os, random, sys
n = int(sys.argv[1])
rng = random.Random(1311)
used = os.stat("v1.img").st_blocks * 512
with open("v2.img", "r+b") as f:
    for _ in range(n):
        off = rng.randrange(0, used // 4096 - 16) * 4096
        f.seek(off); f.write(rng.randbytes(65536))
PY
    # The 8 GiB sparse image with 1 GiB of data, and a dense 1 GiB image of the same data.
    python3 - <<'PY'
import random
rng = random.Random(8)
data = [rng.randbytes(64 << 20) for _ in range(16)]
with open("sparse8g.img", "wb") as f:
    f.truncate(8 << 30)
    for i, d in enumerate(data):
        f.seek(i * (512 << 20)); f.write(d)
with open("dense1g.img", "wb") as f:
    for d in data:
        f.write(d)
PY
}

# Stores are set aside (renamed) between runs and deleted only when a tool
# is done: on a journal-less ext4 the kernel skips, one by one, every inode
# freed in the last minutes when it allocates a new one (ext4's
# `recently_deleted`), so a run that follows the deletion of a 5,400-file
# store pays for it in every file it creates (up to a quarter of a full
# snapshot's time here), which is no cost of the run itself.
retire() { mkdir -p .trash; for d in "$@"; do [ -e "$d" ] && mv "$d" ".trash/$d.$(date +%s%N)"; done; return 0; }
empty_trash() { rm -rf .trash; }

# median of the numbers on stdin
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# t CMD...: wall seconds of one run (output discarded)
t() { /usr/bin/time -f "%e" -o .t.out "$@" >/dev/null 2>.t.err || { cat .t.err >&2; return 1; }; cat .t.out; }

declare -A FULL INC STORED RESTORE SPARSE DELTA FULLSTORE
row() { # name full inc stored restore sparse delta
    FULL[$1]=$2; INC[$1]=$3; STORED[$1]=$4; RESTORE[$1]=$5; SPARSE[$1]=$6; DELTA[$1]=$7
    ORDER+=("$1")
}
ORDER=()

# Runs one tool RUNS times: prep_full, full, inc, restore (to out/v1.img).
measure_tool() { # name init full inc restore size_cmd
    local name=$1 init=$2 full=$3 inc=$4 restore=$5 size_cmd=$6
    local fs=() is=() rs=() stored=0 sparse=no
    for _ in $(seq 1 "$RUNS"); do
        retire repo; rm -rf out; mkdir -p out; sync
        eval "$init" >/dev/null 2>&1
        fs+=("$(t bash -c "$full")")
        local before; before=$(eval "$size_cmd")
        FULLSTORE[$name]=$before
        sync
        is+=("$(t bash -c "$inc")")
        stored=$(( $(eval "$size_cmd") - before ))
        sync
        rs+=("$(t bash -c "$restore")")
        cmp -s out/v1.img v1.img || { echo "$name: restore differs" >&2; return 1; }
        [ "$(du -B1 out/v1.img | cut -f1)" -lt "$(stat -c %s v1.img)" ] && sparse=yes || sparse=no
    done
    row "$name" "$(printf '%s\n' "${fs[@]}" | median)" "$(printf '%s\n' "${is[@]}" | median)" "$stored" \
        "$(printf '%s\n' "${rs[@]}" | median)" "$sparse" "-"
}

install_peers
make_images
cat v1.img v2.img > /dev/null
apparent=$(stat -c %s v1.img)
allocated=$(du -B1 v1.img | cut -f1)

floor() { local xs=(); for _ in $(seq 1 "$RUNS"); do xs+=("$(t "$@")"); done; printf '%s\n' "${xs[@]}" | median; }
B3=$(floor b3sum --num-threads "$cores" v1.img)
ZSTD=$(floor zstd -1 -T"$cores" -c v1.img)
WRITE=$(floor bash -c "rm -f .copy.img; cp --sparse=always v1.img .copy.img; rm -f .copy.img")

# blocksnap, with its delta restore.
bs_init="true"
bs_full="$bin -q --store repo snapshot create v1.img --no-parent"
# v2 is another path: name its parent, as an incremental of the same disk.
bs_inc="$bin -q --store repo snapshot create v2.img --parent \$($bin --store repo snapshot list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"Snapshots\"][0][\"SnapshotId\"])')"
bs_restore="$bin -q --store repo volume restore \$($bin --store repo snapshot list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"Snapshots\"][0][\"SnapshotId\"])') out/v1.img"
bs_size="du -sb repo | cut -f1"
measure_tool blocksnap "$bs_init" "$bs_full" "$bs_inc" "$bs_restore" "$bs_size"
ds=()
for _ in $(seq 1 "$RUNS"); do
    cp --sparse=always v2.img out/d.img; sync
    s1=$("$bin" --store repo snapshot list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][0]["SnapshotId"])')
    ds+=("$(t "$bin" -q --store repo volume restore --delta "$s1" out/d.img)")
    cmp -s out/d.img v1.img || { echo "delta restore differs" >&2; exit 1; }
done
DELTA[blocksnap]=$(printf '%s\n' "${ds[@]}" | median)
bs_manifest=$(du -b repo/local/snapshots/* | sort -n | tail -1 | cut -f1)

export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
borg_tool() { # name create-args
    measure_tool "$1" "borg init --encryption=none repo" \
        "borg create $2 repo::v1 v1.img" "borg create $2 repo::v2 v2.img" \
        "cd out && borg extract --sparse ../repo::v1" "du -sb repo | cut -f1"
}
export RESTIC_PASSWORD=bench
for peer in $PEERS; do
    case $peer in
        borg-lz4) command -v borg >/dev/null && borg_tool "borg lz4" "--compression lz4" ;;
        borg-zstd) command -v borg >/dev/null && borg_tool "borg zstd-3" "--compression zstd,3" ;;
        borg-fixed) command -v borg >/dev/null && borg_tool "borg fixed-64K zstd-3" "--compression zstd,3 --chunker-params fixed,65536 --sparse" ;;
        restic) command -v restic >/dev/null && measure_tool "restic $(restic version | awk '{print $2}')" \
            "restic -r repo init" "restic -r repo backup v1.img" "restic -r repo backup v2.img" \
            "restic -r repo restore latest --path $PWD/v1.img --target out" \
            "du -sb repo | cut -f1" ;;
        casync) command -v casync >/dev/null && measure_tool "casync" "mkdir -p repo" \
            "casync make --store=repo/store repo/v1.caibx v1.img" "casync make --store=repo/store repo/v2.caibx v2.img" \
            "casync extract --store=repo/store repo/v1.caibx out/v1.img" "du -sb repo | cut -f1" ;;
        rustic) command -v rustic >/dev/null && measure_tool "rustic" "rustic -r repo --password bench init" \
            "rustic -r repo --password bench backup v1.img" "rustic -r repo --password bench backup v2.img" \
            "rustic -r repo --password bench restore latest:v1.img out/v1.img" "du -sb repo | cut -f1" ;;
    esac || true
done

# The floors of the incremental and the delta restore, from the same
# images: which 512 KiB blocks and 4 KiB pages v2 changes, their bytes.
python3 - <<'PY'
import os
bs, page = 512 << 10, 4096
blocks, pages = [], 0
with open("v1.img", "rb") as a, open("v2.img", "rb") as b, open(".changed.bin", "wb") as out:
    size = os.fstat(a.fileno()).st_size
    for off in range(0, size, bs):
        x, y = a.read(bs), b.read(bs)
        if x != y:
            blocks.append(off)
            out.write(y)
            pages += sum(x[i:i + page] != y[i:i + page] for i in range(0, len(x), page))
with open(".changed.txt", "w") as f:
    f.write(" ".join(map(str, blocks)) + "\n%d %d\n" % (len(blocks), pages * page))
PY
read -r CHANGED_BLOCKS CHANGED_PAGE_BYTES < <(sed -n 2p .changed.txt)
B3_V2=$(floor b3sum --num-threads "$cores" v2.img)
ZSTD_CHANGED=$(floor zstd -1 -T"$cores" -c .changed.bin)
INC_FLOOR=$(awk -v a="$B3_V2" -v b="$ZSTD_CHANGED" 'BEGIN{printf "%.2f", a+b}')
# Writing the differing blocks back in place, durably (what a delta restore
# of v1 onto v2 must write), beside hashing the target.
write_changed() {
    cp --sparse=always v2.img out/w.img; sync
    t python3 -c '
import os
offs = list(map(int, open(".changed.txt").readline().split()))
src = os.open("v1.img", os.O_RDONLY); dst = os.open("out/w.img", os.O_WRONLY)
for o in offs:
    os.pwrite(dst, os.pread(src, 512 << 10, o), o)
os.fsync(dst)'
}
WCS=(); for _ in $(seq 1 "$RUNS"); do WCS+=("$(write_changed)"); done
WRITE_CHANGED=$(printf '%s\n' "${WCS[@]}" | median)
DELTA_FLOOR=$(awk -v a="$B3_V2" -v b="$WRITE_CHANGED" 'BEGIN{printf "%.2f", a+b}')
# A full snapshot into a store that exists already (its chunk directories
# made by another volume's snapshot) beside a fresh one, alternating.
FRESH=(); EXISTING=()
for _ in $(seq 1 "$RUNS"); do
    retire repo; sync
    FRESH+=("$(t "$bin" -q --store repo snapshot create v1.img --no-parent)")
    retire repo; "$bin" -q --store repo snapshot create dense1g.img --no-parent >/dev/null; sync
    EXISTING+=("$(t "$bin" -q --store repo snapshot create v1.img --no-parent)")
done
FULL_FRESH=$(printf '%s\n' "${FRESH[@]}" | median)
FULL_EXISTING=$(printf '%s\n' "${EXISTING[@]}" | median)
retire repo

# Sparse vs dense (target 7).
retire repo; sync
SPARSE8=$(t "$bin" -q --store repo snapshot create sparse8g.img --no-parent); retire repo; sync
DENSE1=$(t "$bin" -q --store repo snapshot create dense1g.img --no-parent); retire repo
empty_trash

mb() { awk -v b="$1" 'BEGIN{printf "%.1f MB", b/1e6}'; }
echo
echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); medians of $RUNS"
echo "v1: $apparent bytes, $(mb "$allocated") allocated; v2 = v1 + $WRITES random 64 KiB writes"
echo
echo "| tool | full | incremental | increment stored | restore | restore sparse | delta restore |"
echo "|---|---|---|---|---|---|---|"
for n in "${ORDER[@]}"; do
    echo "| $n | ${FULL[$n]} s | ${INC[$n]} s | $(mb "${STORED[$n]}") | ${RESTORE[$n]} s | ${SPARSE[$n]} | ${DELTA[$n]} |"
done
echo "| b3sum --num-threads $cores (hashing floor) | $B3 s | | | | | |"
echo "| zstd -1 -T$cores (compression floor) | $ZSTD s | | | | | |"
echo "| writing v1's data to a new file | $WRITE s | | | | | |"
echo
fastest() { local best=""; for n in "${ORDER[@]}"; do [ "$n" = blocksnap ] && continue; v=$(eval "echo \${$1[\$n]}"); [ -z "$best" ] || awk -v a="$v" -v b="$best" 'BEGIN{exit !(a<b)}' && best=$v; done; echo "${best:-0}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }'; }
echo "| target | measured | goal |"
echo "|---|---|---|"
echo "| 1. full ÷ zstd -1 | $(ratio "${FULL[blocksnap]}" "$ZSTD") | ≤ 1.10 |"
echo "| 1. full ÷ fastest peer | $(ratio "${FULL[blocksnap]}" "$(fastest FULL)") | ≤ 0.40 |"
echo "| 2. incremental ÷ b3sum | $(ratio "${INC[blocksnap]}" "$B3") | ≤ 1.00 |"
echo "| 2. incremental ÷ fastest peer | $(ratio "${INC[blocksnap]}" "$(fastest INC)") | ≤ 0.25 |"
floor_bytes=$((WRITES * 65536))
echo "| 3. increment stored ÷ changed bytes ($(mb $floor_bytes)) | $(ratio "${STORED[blocksnap]}" "$floor_bytes") | ≤ 1.25 |"
echo "| 4. restore ÷ fastest peer | $(ratio "${RESTORE[blocksnap]}" "$(fastest RESTORE)") | ≤ 0.50 |"
echo "| 4. delta restore ÷ b3sum | $(ratio "${DELTA[blocksnap]}" "$B3") | ≤ 1.20 |"
echo "| 5. full store size ÷ borg zstd-3's | $(ratio "${FULLSTORE[blocksnap]}" "${FULLSTORE[borg zstd-3]:-0}") | ≤ 1.05 |"
echo "| 7. 8 GiB sparse (1 GiB data) ÷ dense 1 GiB | $(ratio "$SPARSE8" "$DENSE1") | ≤ 1.30 |"
echo
echo "blocksnap full store: $(mb "${FULLSTORE[blocksnap]}"); largest manifest: $bs_manifest bytes; sparse 8 GiB: $SPARSE8 s; dense 1 GiB: $DENSE1 s"
echo
echo "Floors, same run ($CHANGED_BLOCKS changed blocks, $(mb "$CHANGED_PAGE_BYTES") in changed 4 KiB pages):"
echo
echo "| target | floor | blocksnap | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| full snapshot, existing store | zstd -1 -T$cores: $ZSTD s | $FULL_EXISTING s | $(ratio "$FULL_EXISTING" "$ZSTD") | ≤ 1.2 |"
echo "| full snapshot, fresh store | zstd -1 -T$cores: $ZSTD s | $FULL_FRESH s | $(ratio "$FULL_FRESH" "$ZSTD") | ≤ 1.3 |"
echo "| incremental, no dirty map | b3sum v2 $B3_V2 s + zstd -1 of the changed blocks $ZSTD_CHANGED s = $INC_FLOOR s | ${INC[blocksnap]} s | $(ratio "${INC[blocksnap]}" "$INC_FLOOR") | ≤ 1.2 |"
echo "| increment stored | changed 4 KiB pages: $(mb "$CHANGED_PAGE_BYTES") | $(mb "${STORED[blocksnap]}") | $(ratio "${STORED[blocksnap]}" "$CHANGED_PAGE_BYTES") | ≤ 1.25 |"
echo "| delta restore | b3sum of the target $B3_V2 s + writing the differing blocks $WRITE_CHANGED s = $DELTA_FLOOR s | ${DELTA[blocksnap]} s | $(ratio "${DELTA[blocksnap]}" "$DELTA_FLOOR") | ≤ 1.3 |"
rm -f .changed.bin .changed.txt
