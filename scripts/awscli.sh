#!/usr/bin/env bash
# Installs the AWS CLI (and with it botocore, AWS's Python SDK) into
# .aws-venv/, the outside clients of the tests of `blocksnap serve`; prints
# the path of `aws`. Pinned: the tests compare shapes AWS's clients parse.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${BLOCKSNAP_AWS_VENV:-$here/../.aws-venv}
if [ ! -x "$venv/bin/aws" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet awscli==1.46.3
fi
echo "$venv/bin/aws"
