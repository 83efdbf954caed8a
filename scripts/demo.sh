#!/usr/bin/env bash
# Builds a real ext4 disk image, snapshots it, changes it, takes an
# incremental snapshot, restores both (one as a delta) and checks every byte.
# Usage: scripts/demo.sh [WORKDIR]   (needs e2fsprogs; uses target/release/blocksnap)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
work=${1:-$(mktemp -d /tmp/blocksnap-demo.XXXXXX)}
mkdir -p "$work/files"
export BLOCKSNAP_STORE="$work/store"
cd "$work"

echo "== making a 256 MiB ext4 image with text and random files in $work"
for i in $(seq 1 8); do seq 1 300000 | sed "s/^/log line $i: /" > files/log$i.txt; done
head -c 32M /dev/urandom > files/random.bin
truncate -s 256M disk.img
mkfs.ext4 -q -F -d files disk.img
cp --sparse=always disk.img golden.img

echo "== full snapshot"
"$bin" snapshot create disk.img --description "golden disk" --tag role=demo

echo "== change the disk (a new file, written with debugfs) and snapshot again"
head -c 4M /dev/urandom > new.bin
debugfs -w -R "write new.bin new.bin" disk.img >/dev/null 2>&1
"$bin" snapshot create disk.img

"$bin" snapshot list
first=$("$bin" snapshot list --json | sed -n 's/.*"SnapshotId": "\(snap-[0-9a-f]*\)".*/\1/p' | head -1)
second=$("$bin" snapshot list --json | sed -n 's/.*"SnapshotId": "\(snap-[0-9a-f]*\)".*/\1/p' | tail -1)

echo "== blocks that changed"
"$bin" snapshot changed-blocks "$first" "$second"

echo "== restore the golden snapshot to a new sparse file"
"$bin" volume restore "$first" restored.img
cmp restored.img golden.img && echo "restored.img equals golden.img byte for byte"
du -h --apparent-size restored.img; du -h restored.img

echo "== reset the changed disk to golden, writing only changed blocks"
"$bin" volume restore --delta "$first" disk.img
cmp disk.img golden.img && echo "disk.img is golden again"
e2fsck -fn disk.img >/dev/null 2>&1 && echo "e2fsck: clean"

"$bin" store verify
"$bin" store stats
echo "== done; everything is in $work"
