#!/usr/bin/env bash
# tests/s3second-down.sh [STATE_DIR] [--purge] -- stop the server tests/s3second-up.sh started in
# STATE_DIR (default /tmp/s3ssefs-second): only the pid in STATE_DIR/pid, and only when its
# command line is that STATE_DIR's venv.  --purge also deletes STATE_DIR (and so the install).
set -uo pipefail
DIR=${S3SSEFS_SECOND_DIR:-/tmp/s3ssefs-second}; PURGE=0
for a in "$@"; do
  case $a in --purge) PURGE=1;; *) DIR=$a;; esac
done
[ -d "$DIR" ] || { echo "[s3second-down] $DIR does not exist, nothing to stop" >&2; exit 0; }
DIR=$(cd "$DIR" && pwd)
ours() { [ -d "/proc/$1" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$DIR/venv"; }
if [ -s "$DIR/pid" ] && ours "$(cat "$DIR/pid")"; then
  p=$(cat "$DIR/pid")
  echo "[s3second-down] stopping pid $p" >&2
  kill "$p" 2>/dev/null
  for _ in $(seq 100); do ours "$p" || break; sleep 0.2; done
  ours "$p" && { echo "[s3second-down] pid $p still alive after 20s, SIGKILL" >&2; kill -9 "$p"; }
fi
rm -f "$DIR/pid"
if [ $PURGE = 1 ]; then rm -rf "$DIR"; echo "[s3second-down] purged $DIR" >&2; fi
exit 0
