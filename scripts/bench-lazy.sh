#!/usr/bin/env bash
# Lazy volumes, measured: `instance launch --lazy` of images with a 4 GiB
# and a 64 GiB root; a cold 4 KiB read through FUSE; `image create
# --instance` of a lazy instance with 1 % of its blocks written, beside
# today's full-scan incremental of the same change on a restored instance;
# the attach process's peak RSS after reading its whole volume.
#
# Usage: scripts/bench-lazy.sh [WORKDIR]    (IMG=/path/to/4GiB.img RUNS=3)
# Needs: root (FUSE, mount), qemu-io, python3, GNU time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
IMG=${IMG:-/tmp/peers/v1.img}
RUNS=${RUNS:-3}
work=${1:-$(mktemp -d /tmp/blocksnap-lazy.XXXXXX)}
mkdir -p "$work"
cd "$work"
export BLOCKSNAP_STORE=$work/store
bs() { "$bin" "$@"; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ami_of() { bs --json image list | python3 -c "import json,sys; print([i['ImageId'] for i in json.load(sys.stdin)['Images'] if i['Name']=='$1'][0])"; }

# The roots: the 4 GiB image, and the same data in a 64 GiB sparse volume.
bs image create --name root4g --map /dev/xvda="$IMG" >/dev/null
truncate -s 64G big.img
dd if="$IMG" of=big.img bs=4M conv=notrunc,sparse status=none
bs image create --name root64g --map /dev/xvda=big.img >/dev/null
rm big.img
a4=$(ami_of root4g); a64=$(ami_of root64g)

echo "## lazy launch (s), $RUNS runs"
for a in "$a4" "$a64"; do
    for r in $(seq "$RUNS"); do
        rm -rf "l-$r"; t0=$(now); bs instance launch "$a" "l-$r" --lazy >/dev/null; t1=$(now)
        echo "$a run $r: $(secs "$t0" "$t1")"
        bs instance terminate "l-$r" >/dev/null
    done
done

# 1 % of the blocks (512 KiB each), one 4 KiB write in each, same offsets
# for the lazy and the restored instance.
writes() { python3 - "$1" <<'PY'
import random, sys
size = int(sys.argv[1]); bs = 512 << 10
random.seed(7)
for b in random.sample(range(size // bs), size // bs // 100):
    print(f"-c\nwrite -P 0x5a {b * bs + random.randrange(0, bs - 4096, 4096)} 4k")
PY
}

attach() { # DIR: attach in the background, wait for the volume
    bs instance attach "$1" --socket "$work/$(basename "$1").sock" 2>"$work/$(basename "$1").log" &
    for _ in $(seq 200); do [ -e "$1/xvda.img" ] && return; sleep 0.05; done
    echo "attach failed" >&2; cat "$work/$(basename "$1").log" >&2; exit 1
}

for pair in "4g:$a4:4294967296" "64g:$a64:68719476736"; do
    IFS=: read -r name ami size <<<"$pair"
    writes "$size" > "w-$name.txt"
    echo "## $name: image create --instance with 1 % of blocks written ($(grep -c write "w-$name.txt") writes)"
    # Lazy.
    rm -rf "lz-$name"; bs instance launch "$ami" "lz-$name" --lazy >/dev/null
    attach "$work/lz-$name"
    mapfile -t cmds < "w-$name.txt"
    qemu-io -f raw "${cmds[@]}" "nbd+unix:///xvda?socket=$work/lz-$name.sock" >/dev/null
    t0=$(now); bs --json image create --name "lz-$name-1" --instance "lz-$name" > "lz-$name.json"; t1=$(now)
    echo "lazy: $(secs "$t0" "$t1") s; $(python3 -c "import json; s=json.load(open('lz-$name.json'))['Snapshots'][0]; print('read', s['BlocksRead'], 'taken', s['BlocksTaken'])")"
    if [ "$name" = 4g ]; then
        python3 - "$work/lz-$name/xvda.img" <<'PY'
import os, random, statistics, sys, time
f = os.open(sys.argv[1], os.O_RDONLY)
random.seed(3)
lat = []
for _ in range(200):
    off = random.randrange(0, 3 << 30, 4096)
    t = time.perf_counter(); os.pread(f, 4096, off); lat.append(time.perf_counter() - t)
print(f"cold 4 KiB FUSE read: median {statistics.median(lat)*1e3:.2f} ms, p90 {sorted(lat)[180]*1e3:.2f} ms")
PY
        pid=$(pgrep -f "instance attach $work/lz-$name" | head -1)
        t0=$(now); cat "lz-$name/xvda.img" > /dev/null; t1=$(now)
        echo "sequential FUSE read of the whole volume: $(secs "$t0" "$t1") s; attach peak RSS $(grep VmHWM /proc/"$pid"/status | awk '{print $2/1024}') MiB"
    fi
    if [ "$name" = 64g ]; then
        # The 4 GiB case's change (the same 81 writes) on the 64 GiB volume:
        # the cost follows the change, not the size.
        mapfile -t small < w-4g.txt
        qemu-io -f raw "${small[@]}" "nbd+unix:///xvda?socket=$work/lz-$name.sock" >/dev/null
        t0=$(now); bs --json image create --name "lz-$name-2" --instance "lz-$name" > "lz-$name-2.json"; t1=$(now)
        echo "lazy, the 4 GiB case's change: $(secs "$t0" "$t1") s; $(python3 -c "import json; s=json.load(open('lz-$name-2.json'))['Snapshots'][0]; print('read', s['BlocksRead'], 'taken', s['BlocksTaken'])")"
    fi
    bs instance terminate "lz-$name" >/dev/null
    # Restored, then the same writes, then the full-scan incremental.
    rm -rf "pl-$name"; t0=$(now); bs instance launch "$ami" "pl-$name" >/dev/null; t1=$(now)
    echo "normal launch (restore): $(secs "$t0" "$t1") s"
    qemu-io -f raw "${cmds[@]}" "pl-$name/xvda.img" >/dev/null
    sync
    t0=$(now); bs --json image create --name "pl-$name-1" --instance "pl-$name" >/dev/null; t1=$(now)
    echo "full-scan: $(secs "$t0" "$t1") s"
    bs instance terminate "pl-$name" >/dev/null
done
