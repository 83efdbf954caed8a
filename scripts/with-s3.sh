#!/usr/bin/env bash
# Runs a command with a fresh local SeaweedFS S3 server, its endpoint and
# credentials exported (BLOCKSNAP_TEST_S3_*, AWS_*), and stops the server
# when the command ends, however it ends:
#
#   scripts/with-s3.sh cargo test
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/blocksnap-s3.XXXXXX")
trap '"$here/s3-server.sh" stop "$dir"' EXIT
"$here/s3-server.sh" start "$dir" >/dev/null
# shellcheck disable=SC1091
. "$dir/env"
echo "S3 test server: $BLOCKSNAP_TEST_S3_ENDPOINT (SeaweedFS, data in $dir)" >&2
"$@"
