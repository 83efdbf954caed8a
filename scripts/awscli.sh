#!/usr/bin/env bash
# Installs the AWS CLI (and with it botocore, AWS's Python SDK) and moto
# (the AWS mock, with boto3) into .aws-venv/, the outside clients of the
# tests of `blocksnap serve`; prints the path of `aws`. Pinned: the tests
# compare shapes these clients parse and moto answers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${BLOCKSNAP_AWS_VENV:-$here/../.aws-venv}
if [ ! -x "$venv/bin/aws" ] || [ ! -x "$venv/bin/moto_server" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet awscli==1.46.3 'moto[server]==5.1.22'
fi
echo "$venv/bin/aws"
