#!/usr/bin/env bash
# Throughput of a region on a local S3 server (SeaweedFS) beside a local
# directory region, on the same images in one run: full snapshot,
# incremental snapshot and restore, medians of RUNS, in MB/s of the image's
# allocated data; then the full snapshot and restore on S3 for several
# BLOCKSNAP_S3_INFLIGHT values, and the requests an incremental sends.
#
# With LATENCY_MS (default 10), the sweep is repeated through
# scripts/latency-proxy.py, which adds that round trip to every request, as
# a store across a network has.
#
# Usage: SIZE=1G DATA_MB=600 WRITES=300 RUNS=3 scripts/bench-s3.sh [WORKDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BLOCKSNAP_BIN:-$here/target/release/blocksnap}
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
RUNS=${RUNS:-3}
INFLIGHTS=${INFLIGHTS:-"1 4 16 32 64"}
LATENCY_MS=${LATENCY_MS:-10}
work=${1:-$(mktemp -d /tmp/blocksnap-bench-s3.XXXXXX)}
"$here/scripts/make-bench-images.sh" "$work"
cd "$work"
server="$work/s3"
proxy_pid=
trap '[ -n "$proxy_pid" ] && kill "$proxy_pid"; "$here/scripts/s3-server.sh" stop "$server"' EXIT
"$here/scripts/s3-server.sh" start "$server" >/dev/null
# shellcheck disable=SC1091
. "$server/env"
allocated=$(du -B1 v1.img | cut -f1)
export BLOCKSNAP_STORE="$work/store"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }
snap_id() { python3 -c 'import json,sys; print(json.load(sys.stdin)["SnapshotId"])'; }
mbps() { awk -v b="$1" -v t="$2" 'BEGIN {printf "%.0f", b / t / 1e6}'; }

# One run in region $1: full, incremental, restore; prints three seconds.
run_once() {
    local region=$1 t0 t1 t2 t3 snap
    rm -rf out.img
    t0=$(now)
    snap=$("$bin" -q --region "$region" --json snapshot create v1.img --no-parent | snap_id)
    t1=$(now)
    snap=$("$bin" -q --region "$region" --json snapshot create v2.img --parent "$snap" | snap_id)
    t2=$(now)
    "$bin" -q --region "$region" volume restore "$snap" out.img >/dev/null
    t3=$(now)
    cmp -s out.img v2.img || { echo "restore from $region differs" >&2; exit 1; }
    awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN {printf "%.3f %.3f %.3f\n", b-a, c-b, d-c}'
}

# A fresh region for each run: local directory or S3 prefix (through
# ENDPOINT, the server or the latency proxy).
ENDPOINT=$BLOCKSNAP_TEST_S3_ENDPOINT
fresh_region() {
    local kind=$1 name=$2
    rm -rf "$BLOCKSNAP_STORE"
    if [ "$kind" = s3 ]; then
        "$bin" -q region add "$name" "s3://$BLOCKSNAP_TEST_S3_BUCKET/$name-$RANDOM$RANDOM" \
            --endpoint "$ENDPOINT" --allow-http >/dev/null
    else
        "$bin" -q region add "$name" >/dev/null
    fi
}

measure() {
    local kind=$1 full=() inc=() res=()
    for _ in $(seq 1 "$RUNS"); do
        fresh_region "$kind" bench
        read -r f i r < <(run_once bench)
        full+=("$f"); inc+=("$i"); res+=("$r")
    done
    f=$(printf '%s\n' "${full[@]}" | median)
    i=$(printf '%s\n' "${inc[@]}" | median)
    r=$(printf '%s\n' "${res[@]}" | median)
    echo "| $kind | $f s ($(mbps "$allocated" "$f") MB/s) | $i s ($(mbps "$allocated" "$i") MB/s) | $r s ($(mbps "$allocated" "$r") MB/s) |"
}

echo "image: $(stat -c %s v1.img) bytes, $allocated allocated; $(nproc) cores; $RUNS runs; $(date -u +%F)"
echo
echo "| region | full snapshot | incremental | restore |"
echo "|---|---|---|---|"
measure local
measure s3
sweep() {
    echo
    echo "| BLOCKSNAP_S3_INFLIGHT | full snapshot | restore | ($1) |"
    echo "|---|---|---|---|"
    for n in $INFLIGHTS; do
        full=(); res=()
        for _ in $(seq 1 "$RUNS"); do
            fresh_region s3 bench
            read -r f _ r < <(BLOCKSNAP_S3_INFLIGHT=$n run_once bench)
            full+=("$f"); res+=("$r")
        done
        f=$(printf '%s\n' "${full[@]}" | median)
        r=$(printf '%s\n' "${res[@]}" | median)
        echo "| $n | $f s ($(mbps "$allocated" "$f") MB/s) | $r s ($(mbps "$allocated" "$r") MB/s) | |"
    done
}
sweep "loopback"
if [ "$LATENCY_MS" != 0 ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 "$here/scripts/latency-proxy.py" "$port" "${BLOCKSNAP_TEST_S3_ENDPOINT#http://}" "$LATENCY_MS" &
    proxy_pid=$!
    sleep 0.5
    ENDPOINT=http://127.0.0.1:$port
    sweep "$LATENCY_MS ms added per request"
fi
echo
fresh_region s3 bench
snap=$("$bin" -q --region bench --json snapshot create v1.img | snap_id)
echo "requests of an incremental snapshot (v2 after v1, $(( $(stat -c %s v1.img) / 524288 )) blocks):"
BLOCKSNAP_S3_TRACE=1 "$bin" -q --region bench snapshot create v2.img --parent "$snap" 2>&1 >/dev/null \
    | sed 's/^blocksnap: /  /'
