#!/usr/bin/env bash
# VM disks through NBD, measured: a full snapshot of a raw image through
# qemu-nbd on a Unix socket beside the same snapshot of the file itself; an
# incremental of a qcow2 from its dirty bitmap (1 % of its 512 KiB blocks
# written) beside the full-scan incremental of the same change, on a 4 GiB
# and a 64 GiB qcow2 holding the same data; and the peer users reach for
# here, `nbdcopy` of the disk (through qemu-nbd) piped into `borg create` (fixed
# 512 KiB chunks), on the same change.
#
# Usage: scripts/bench-nbd.sh [WORKDIR]    (IMG=/path/to/4GiB.img)
# Needs: qemu-utils; borgbackup (installed if missing and apt works).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
IMG=${IMG:-/tmp/peers/v1.img}
command -v borg >/dev/null || { apt-get install -y -q borgbackup >/dev/null 2>&1 || true; }
work=${1:-$(mktemp -d /tmp/blocksnap-nbd.XXXXXX)}
mkdir -p "$work"
cd "$work"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
timed() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); secs "$t0" "$t1"; }
last_snap() { "$bin" --json snapshot list | python3 -c "import json,sys; print(json.load(sys.stdin)['Snapshots'][-1]['SnapshotId'])"; }

echo "## full snapshot of $(basename "$IMG"): the file vs through qemu-nbd (raw, unix socket)"
for round in 1 2 3; do
    rm -rf s-file s-nbd
    f=$(BLOCKSNAP_STORE=$work/s-file timed "$bin" snapshot create "$IMG")
    qemu-nbd -r -t -e 8 -f raw -x disk -k "$work/raw.sock" "$IMG" & pid=$!
    sleep 0.5
    n=$(BLOCKSNAP_STORE=$work/s-nbd timed "$bin" snapshot create "nbd+unix:///disk?socket=$work/raw.sock")
    kill $pid; wait $pid 2>/dev/null || true
    echo "round $round: file $f s, nbd $n s"
done

# 1 % of the blocks, one 4 KiB write each; the same offsets on both disks.
writes() { python3 - "$1" <<'PY'
import random, sys
size = int(sys.argv[1]); bs = 512 << 10
random.seed(11)
for b in random.sample(range(size // bs), size // bs // 100):
    print(f"write -P 0x6b {b * bs + random.randrange(0, bs - 4096, 4096)} 4k")
PY
}

for pair in "4g:4294967296" "64g:68719476736"; do
    IFS=: read -r name size <<<"$pair"
    export BLOCKSNAP_STORE=$work/store-$name
    rm -rf "$BLOCKSNAP_STORE" "repo-$name" "$name.qcow2"
    qemu-img create -q -f qcow2 "$name.qcow2" "$size"
    qemu-img convert -n -f raw -O qcow2 "$IMG" "$name.qcow2"
    "$bin" snapshot create "$name.qcow2" >/dev/null
    parent=$(last_snap)
    qemu-img bitmap --add --enable "$name.qcow2" daily
    if command -v borg >/dev/null; then
        export BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
        borg init -e none "repo-$name" >/dev/null 2>&1
        nbdcopy -- [ qemu-nbd -r -f qcow2 "$name.qcow2" ] - | borg create --chunker-params fixed,524288 "repo-$name::0" - 2>/dev/null
    fi
    writes "$size" > "w-$name.txt"
    # The 4 GiB case's change on both: the cost follows it, not the size.
    writes 4294967296 > "w-small.txt"
    args=()
    while read -r c; do args+=(-c "$c"); done < "w-small.txt"
    qemu-io -f qcow2 "${args[@]}" "$name.qcow2" >/dev/null
    echo "## $name qcow2, $(wc -l < w-small.txt) blocks written"
    echo "bitmap incremental: $(timed "$bin" snapshot create "$name.qcow2" --dirty-bitmap daily --parent "$parent") s"
    echo "full-scan incremental: $(timed "$bin" snapshot create "$name.qcow2" --parent "$parent") s"
    if command -v borg >/dev/null; then
        t0=$(now)
        nbdcopy -- [ qemu-nbd -r -f qcow2 "$name.qcow2" ] - | borg create --chunker-params fixed,524288 "repo-$name::1" - 2>/dev/null
        t1=$(now)
        echo "peer (nbdcopy | borg create, fixed 512 KiB chunks), same change: $(secs "$t0" "$t1") s"
    fi
done
