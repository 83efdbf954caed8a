#!/usr/bin/env bash
# Throughput through `blocksnap serve` on loopback beside a local snapshot
# of the same image, in the same run: `snapshot create` (local), coldsnap
# upload (the EBS direct API, AWS SDK for Rust), the CLI's own upload and
# restore through `--endpoint`, beside a local restore, and
# GetSnapshotBlock latency (botocore, one block at a time). Each upload
# into a fresh store.
#
#   scripts/bench-serve.sh [IMAGE]     (default /tmp/peers/v1.img, see make-bench-images.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
img=${1:-/tmp/peers/v1.img}
bin="$here/../target/release/blocksnap"
aws=$("$here/awscli.sh")
python="$(dirname "$aws")/python3"
coldsnap=$(command -v coldsnap || echo "${CARGO_HOME:-$HOME/.cargo}/bin/coldsnap")
work=$(mktemp -d "${TMPDIR:-/tmp}/blocksnap-bench-serve.XXXXXX")
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
secs() { local t0=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $t0" | bc; }

size=$(stat -c %s "$img")
local_s=$(BLOCKSNAP_STORE=$work/local secs "$bin" -q snapshot create "$img")
sync
local_snap=$(BLOCKSNAP_STORE=$work/local "$bin" --json snapshot list | "$python" -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][0]["SnapshotId"])' 2>/dev/null ||
    BLOCKSNAP_STORE=$work/local "$bin" snapshot list | awk '/^snap-/ {print $1; exit}')
local_restore_s=$(BLOCKSNAP_STORE=$work/local secs "$bin" -q volume restore "$local_snap" "$work/local-restored.img")
rm -f "$work/local-restored.img"
rm -rf "$work/local"
sync
export BLOCKSNAP_STORE=$work/served
key=$("$bin" --json account create --name bench)
export AWS_ACCESS_KEY_ID=$(echo "$key" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["AccessKey"]["AccessKeyId"])')
export AWS_SECRET_ACCESS_KEY=$(echo "$key" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["AccessKey"]["SecretAccessKey"])')
export AWS_DEFAULT_REGION=local AWS_EC2_METADATA_DISABLED=true
"$bin" serve --listen 127.0.0.1:0 > "$work/serve.out" 2>"$work/serve.log" &
server=$!
while ! grep -q listening "$work/serve.out" 2>/dev/null; do sleep 0.1; done
url=$(sed -n 's/listening on //p' "$work/serve.out")
t0=$(date +%s.%N)
snap=$("$coldsnap" --region local --endpoint "$url" upload --no-progress "$img")
coldsnap_s=$(echo "$(date +%s.%N) - $t0" | bc)
# The CLI through the server: a fresh store for the upload, then a restore.
kill $server; wait $server 2>/dev/null || true
"$bin" serve --listen 127.0.0.1:0 > "$work/serve2.out" 2>"$work/serve2.log" &
server=$!
while ! grep -q listening "$work/serve2.out" 2>/dev/null; do sleep 0.1; done
url2=$(sed -n 's/listening on //p' "$work/serve2.out")
rm -rf "$work/served/local"
sync
cli_s=$(secs "$bin" -q --endpoint "$url2" snapshot create --no-parent "$img")
cli_snap=$("$bin" --endpoint "$url2" --json snapshot list | "$python" -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][-1]["SnapshotId"])')
sync
cli_restore_s=$(secs "$bin" -q --endpoint "$url2" volume restore "$cli_snap" "$work/cli-restored.img")
rm -f "$work/cli-restored.img"
kill $server; wait $server 2>/dev/null || true
"$bin" serve --listen 127.0.0.1:0 > "$work/serve.out" 2>>"$work/serve.log" &
server=$!
sleep 0.5
while ! grep -q listening "$work/serve.out" 2>/dev/null; do sleep 0.1; done
url=$(sed -n 's/listening on //p' "$work/serve.out")
snap=$cli_snap
latency=$("$python" - "$url" "$snap" <<'PY'
import sys, time, statistics
try:
    from awscli.botocore.session import get_session
except ImportError:
    from botocore.session import get_session
url, snap = sys.argv[1:3]
ebs = get_session().create_client("ebs", endpoint_url=url, region_name="local")
blocks = ebs.list_snapshot_blocks(SnapshotId=snap, MaxResults=300)["Blocks"][:200]
times = []
for b in blocks:
    t = time.perf_counter()
    r = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"])
    r["BlockData"].read()
    times.append((time.perf_counter() - t) * 1e3)
print(f"{statistics.median(times):.2f} {sorted(times)[int(len(times)*0.9)]:.2f} {len(times)}")
PY
)
mib=$((size >> 20))
printf 'image: %s (%d MiB)\n' "$img" "$mib"
printf 'snapshot create (local):     %6.2f s  %7.1f MiB/s\n' "$local_s" "$(echo "$mib / $local_s" | bc -l)"
printf 'coldsnap upload via serve:   %6.2f s  %7.1f MiB/s  (%.2f x local)\n' "$coldsnap_s" \
    "$(echo "$mib / $coldsnap_s" | bc -l)" "$(echo "$local_s / $coldsnap_s" | bc -l)"
printf 'CLI --endpoint upload:       %6.2f s  %7.1f MiB/s  (%.2f x local)\n' "$cli_s" \
    "$(echo "$mib / $cli_s" | bc -l)" "$(echo "$local_s / $cli_s" | bc -l)"
printf 'volume restore (local):      %6.2f s  %7.1f MiB/s\n' "$local_restore_s" "$(echo "$mib / $local_restore_s" | bc -l)"
printf 'CLI --endpoint restore:      %6.2f s  %7.1f MiB/s  (%.2f x local)\n' "$cli_restore_s" \
    "$(echo "$mib / $cli_restore_s" | bc -l)" "$(echo "$local_restore_s / $cli_restore_s" | bc -l)"
read -r med p90 n <<<"$latency"
server=$(grep 'op=GetSnapshotBlock status=200' "$work/serve.log" | sed 's/.*ms=//' | sort -n |
    awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
printf 'GetSnapshotBlock (botocore, %s blocks): median %s ms, p90 %s ms round trip; %s ms in the server (its log)\n' \
    "$n" "$med" "$p90" "$server"
