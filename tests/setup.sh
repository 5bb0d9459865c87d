#!/usr/bin/env bash
# tests/setup.sh -- everything s3ssefs needs on a fresh Debian 12 machine (run as root):
# system packages (FUSE 3, the build tools pyfuse3 needs, the Ceph RGW packages, the peers
# and tools the tests and benchmarks drive), then a virtualenv in .venv with the package
# installed editable plus its test extras, and the second test server (tests/s3second-up.sh).
# Idempotent and quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
      ceph-mon ceph-osd radosgw ceph-common openssl curl uuid-runtime
      sqlite3 rsync tar attr s3fs rclone fio groff mandoc man-db systemd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || { echo "setup: need root to install: ${missing[*]}" >&2; exit 1; }
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
modprobe fuse 2>/dev/null || true
[ -c /dev/fuse ] || { echo "setup: /dev/fuse is missing: FUSE is not available here" >&2; exit 1; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import s3ssefs, pyfuse3, pytest_trio, hypothesis' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip >&2
  .venv/bin/pip install -q -e '.[test]' >&2
  touch .venv/.installed
fi
# the second S3 server of the tests (LocalStack's S3, from PyPI, in its own venv under /tmp)
bash tests/s3second-up.sh --install-only
echo "setup: ok ($(.venv/bin/python --version), pyfuse3 $(.venv/bin/python -c 'import pyfuse3; print(pyfuse3.__version__)'))" >&2
