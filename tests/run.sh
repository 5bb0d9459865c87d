#!/usr/bin/env bash
# tests/run.sh -- the whole test suite, from a fresh clone: set-up, the two S3 servers (Ceph RGW,
# LocalStack's S3), pytest.
# `make test` and .ci/run run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
bash tests/rgw-up.sh >/dev/null
bash tests/s3second-up.sh >/dev/null
.venv/bin/ruff check s3ssefs tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
