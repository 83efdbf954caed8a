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

# Nothing is deleted until the end: on an ext4 without a journal (as the
# scratch disks here), creating files within a minute of deleting as many
# costs a scan of the deleted inodes per file, which would charge one run
# for the cleanup of the one before it.
size=$(stat -c %s "$img")
local_s=$(BLOCKSNAP_STORE=$work/local secs "$bin" -q snapshot create "$img")
sync
local_snap=$(BLOCKSNAP_STORE=$work/local "$bin" --json snapshot list | "$python" -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][0]["SnapshotId"])')
local_restore_s=$(BLOCKSNAP_STORE=$work/local secs "$bin" -q volume restore "$local_snap" "$work/local-restored.img")
sync
export AWS_DEFAULT_REGION=local AWS_EC2_METADATA_DISABLED=true
# serve STORE LOG: a server of a fresh store with one account, its key in
# the environment and its address in $url.
serve() {
    local key
    key=$(BLOCKSNAP_STORE=$1 "$bin" --json account create --name bench)
    AWS_ACCESS_KEY_ID=$(echo "$key" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["AccessKey"]["AccessKeyId"])')
    AWS_SECRET_ACCESS_KEY=$(echo "$key" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["AccessKey"]["SecretAccessKey"])')
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    [ -z "${server:-}" ] || { kill "$server"; wait "$server" 2>/dev/null || true; }
    BLOCKSNAP_STORE=$1 "$bin" serve --listen 127.0.0.1:0 > "$work/serve.out" 2>"$2" &
    server=$!
    while ! grep -q listening "$work/serve.out" 2>/dev/null; do sleep 0.1; done
    url=$(sed -n 's/listening on //p' "$work/serve.out")
    rm -f "$work/serve.out"
}
serve "$work/served-coldsnap" "$work/coldsnap.log"
t0=$(date +%s.%N)
/usr/bin/time -f '%U %S' -o "$work/coldsnap.cpu" \
    "$coldsnap" --region local --endpoint "$url" upload --no-progress "$img" >/dev/null
coldsnap_s=$(echo "$(date +%s.%N) - $t0" | bc)
# CPU seconds of each side: the server's since it started, coldsnap's own.
server_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$server/stat")
coldsnap_cpu=$(awk '{printf "%.1f", $1 + $2}' "$work/coldsnap.cpu")
sync
# The CLI through a server of another fresh store: an upload, then a restore.
serve "$work/served-cli" "$work/serve.log"
cli_s=$(secs /usr/bin/time -f '%U %S' -o "$work/cli.cpu" "$bin" -q --endpoint "$url" snapshot create --no-parent "$img")
cli_server_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$server/stat")
cli_cpu=$(awk '{printf "%.1f", $1 + $2}' "$work/cli.cpu")
snap=$("$bin" --endpoint "$url" --json snapshot list | "$python" -c 'import json,sys; print(json.load(sys.stdin)["Snapshots"][-1]["SnapshotId"])')
sync
cli_restore_s=$(secs "$bin" -q --endpoint "$url" volume restore "$snap" "$work/cli-restored.img")
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
printf '  CPU seconds: coldsnap %s, server %s (the two share the cores)\n' "$coldsnap_cpu" "$server_cpu"
printf 'CLI --endpoint upload:       %6.2f s  %7.1f MiB/s  (%.2f x local)\n' "$cli_s" \
    "$(echo "$mib / $cli_s" | bc -l)" "$(echo "$local_s / $cli_s" | bc -l)"
printf '  CPU seconds: client %s, server %s\n' "$cli_cpu" "$cli_server_cpu"
printf 'volume restore (local):      %6.2f s  %7.1f MiB/s\n' "$local_restore_s" "$(echo "$mib / $local_restore_s" | bc -l)"
printf 'CLI --endpoint restore:      %6.2f s  %7.1f MiB/s  (%.2f x local)\n' "$cli_restore_s" \
    "$(echo "$mib / $cli_restore_s" | bc -l)" "$(echo "$local_restore_s / $cli_restore_s" | bc -l)"
read -r med p90 n <<<"$latency"
server_ms=$(grep 'op=GetSnapshotBlock status=200' "$work/serve.log" | sed 's/.*ms=//' | sort -n |
    awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
printf 'GetSnapshotBlock (botocore, %s blocks): median %s ms, p90 %s ms round trip; %s ms in the server (its log)\n' \
    "$n" "$med" "$p90" "$server_ms"
