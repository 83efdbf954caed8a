#!/usr/bin/env bash
# Builds the benchmark images in DIR (once): v1.img, a sparse ext4 image of
# SIZE with ~DATA_MB MB of text and random files, and v2.img, v1 after
# WRITES random 64 KiB writes of random data inside its used area.
#
# Usage: SIZE=1G DATA_MB=600 WRITES=300 scripts/make-bench-images.sh DIR
set -euo pipefail
SIZE=${SIZE:-1G}
DATA_MB=${DATA_MB:-600}
WRITES=${WRITES:-300}
mkdir -p "$1"
cd "$1"
[ -f v1.img ] && [ -f v2.img ] && exit 0

echo "making a $SIZE ext4 image with ~${DATA_MB} MB of text and random files" >&2
rm -rf files && mkdir -p files/text files/random
half=$((DATA_MB / 2))
# Compressible: numbered log lines, 8 MB per file.
for i in $(seq 1 $((half / 8))); do
    seq $((i * 1000000)) $((i * 1000000 + 900000)) | sed "s/^/host$i kernel: event /" | head -c 8M > files/text/log$i.txt || true
done
# Incompressible: random files of 1 to 16 MB.
left=$half; i=0
while [ $left -gt 0 ]; do
    n=$(( (i % 16) + 1 )); [ $n -gt $left ] && n=$left
    head -c ${n}M /dev/urandom > files/random/r$i.bin
    left=$((left - n)); i=$((i + 1))
done
truncate -s "$SIZE" v1.img
mkfs.ext4 -q -F -d files v1.img
rm -rf files
# v2: WRITES random 64 KiB writes of random data inside the used area.
cp --sparse=always v1.img v2.img
used=$(( $(du -B1 v1.img | cut -f1) ))
python3 - "$WRITES" "$used" <<'PY'
import os, random, sys
n, used = int(sys.argv[1]), int(sys.argv[2])
random.seed(42)
with open("v2.img", "r+b") as f:
    for _ in range(n):
        off = random.randrange(0, used // 4096 - 16) * 4096
        f.seek(off); f.write(os.urandom(65536))
PY
