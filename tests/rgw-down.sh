#!/usr/bin/env bash
# tests/rgw-down.sh [STATE_DIR] [--purge] -- stop the daemons tests/rgw-up.sh started in STATE_DIR
# (default /tmp/s3ssefs-rgw).
# Only PIDs from STATE_DIR/run/*.pid whose command line names STATE_DIR/ceph.conf are signalled.
# --purge also deletes STATE_DIR.
set -uo pipefail
DIR=${S3SSEFS_RGW_DIR:-/tmp/s3ssefs-rgw}; PURGE=0
for a in "$@"; do
  case $a in --purge) PURGE=1;; *) DIR=$a;; esac
done
[ -d "$DIR" ] || { echo "[rgw-down] $DIR does not exist, nothing to stop" >&2; exit 0; }
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf

ours() { # pid -> 0 if alive and started with our conf
  [ -d "/proc/$1" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$CONF"
}
stop() { # pidfile
  local f=$1 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if ours "$p"; then
    echo "[rgw-down] stopping $(basename "$f" .pid) pid $p" >&2
    kill "$p" 2>/dev/null
    for i in $(seq 100); do ours "$p" || break; sleep 0.2; done
    if ours "$p"; then
      echo "[rgw-down] pid $p still alive after 20s, SIGKILL" >&2
      kill -9 "$p" 2>/dev/null; sleep 0.5
    fi
  fi
  rm -f "$f"
}
# reverse start order: rgw, osd, mon
stop "$DIR/run/client.rgw.a.pid"
for f in "$DIR"/run/osd.*.pid; do [ -e "$f" ] && stop "$f"; done
stop "$DIR/run/mon.a.pid"
for f in "$DIR"/run/*.pid; do [ -e "$f" ] && stop "$f"; done
if [ $PURGE = 1 ]; then rm -rf "$DIR"; echo "[rgw-down] purged $DIR" >&2; fi
exit 0
