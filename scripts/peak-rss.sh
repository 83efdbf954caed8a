#!/usr/bin/env bash
# Peak RSS of every command that reads or writes a whole volume, on a large
# sparse image (SIZE, default 64 GiB, with DATA_MB of random data in 16
# places), against the budget of 100 MiB + 40 bytes per block.
#
# Usage: scripts/peak-rss.sh [WORKDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || (cd "$here" && cargo build --release)
SIZE=${SIZE:-64G}
DATA_MB=${DATA_MB:-512}
work=${1:-/tmp/blocksnap-rss}
rm -rf "$work" && mkdir -p "$work"
cd "$work"
export BLOCKSNAP_STORE=$work/store BLOCKSNAP_PASSPHRASE=${BLOCKSNAP_PASSPHRASE:-rss passphrase}

bytes=$(numfmt --from=iec "$SIZE")
blocks=$((bytes / (512 << 10)))
budget_kib=$(((100 << 10) + blocks * 40 / 1024))
truncate -s "$SIZE" vol.img
for i in $(seq 0 15); do
    dd if=/dev/urandom of=vol.img bs=1M count=$((DATA_MB / 16)) seek=$((bytes / 16 / 1048576 * i)) conv=notrunc status=none
done

printf '%-44s %10s %8s\n' command "peak RSS" budget
rss() { # label command... -> one table row
    local label=$1
    shift
    /usr/bin/time -f "%M" -o rss.txt "$@" >/dev/null 2>cmd.err || { cat cmd.err >&2; exit 1; }
    local kib
    kib=$(tail -1 rss.txt)
    printf '%-44s %6d MiB %8s\n' "$label" $((kib / 1024)) "$([ "$kib" -le "$budget_kib" ] && echo met || echo MISSED)"
}
snap() { "$bin" snapshot list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][-1]["SnapshotId"])'; }

rss "snapshot create (full)" "$bin" snapshot create vol.img -q
first=$(snap)
dd if=/dev/urandom of=vol.img bs=4K count=64 seek=1000 conv=notrunc status=none
rss "snapshot create (incremental)" "$bin" snapshot create vol.img -q
second=$(snap)
rss "snapshot create (nothing changed)" "$bin" snapshot create vol.img -q
cp --sparse=always vol.img copy.img
dd if=/dev/urandom of=copy.img bs=4K count=64 seek=5000 conv=notrunc status=none
rss "snapshot create (new path, parent found)" "$bin" snapshot create copy.img -q
rss "snapshot create --encrypted (full)" "$bin" snapshot create vol.img --no-parent --encrypted -q
rss "changed-blocks" "$bin" snapshot changed-blocks "$first" "$second"
rss "volume restore (new file)" "$bin" volume restore "$second" restored.img -q
rss "volume restore --delta" "$bin" volume restore "$first" restored.img --delta -q
rss "volume verify" "$bin" volume verify "$first" restored.img -q
rss "store verify" "$bin" store verify -q
rss "image create" "$bin" image create --name rss --map "/dev/xvda=$second" -q
rss "store gc" "$bin" store gc -q
echo "budget: 100 MiB + 40 B x $blocks blocks = $((budget_kib / 1024)) MiB"
