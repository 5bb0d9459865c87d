#!/usr/bin/env bash
# tests/systemd-sandbox.sh -- a real systemd as PID 1 of new pid/mount/uts/ipc/cgroup namespaces,
# for testing the installed unit on a machine whose own PID 1 is not systemd (a container, CI).
#
#   tests/systemd-sandbox.sh boot DIR [UNITDIR...]   boot it; prints the host PID of its systemd
#   tests/systemd-sandbox.sh poweroff DIR            shut it down and tidy up
#   nsenter -t PID -a systemctl ...                  talk to it (D-Bus tools such as systemd-run
#                                                    and machinectl do not work from outside)
#
# The sandbox keeps the host's network namespace (loopback reaches the test RGW) and file
# systems; it gets its own /run (tmpfs) and a private unit search path: DIR/units (stub targets
# and journald) followed by the UNITDIRs, such as the directory `make install` put the unit in.
# Nothing from the host's /etc/systemd or /lib/systemd/system is started. Each line below that
# looks odd avoids a trap:
# - the host's sysinit.target would run systemd-tmpfiles, whose "D /tmp" wipes the host's /tmp:
#   hence the private unit path with stub targets;
# - without container= set, systemd's shutdown acts on the host's devices and mounts;
# - with container= set, systemd leaves / private, and LoadCredential= then fails: hence
#   `mount --make-rshared /` inside;
# - journald would read and write the host's kernel log (/dev/kmsg) and, with a
#   /var/log/journal, the host's disk: both are covered inside;
# - the host's / must be private, or the sandbox's mounts (its /run) would propagate to it.
# A mount point whose mounts the host should see must be a shared mount of its own on the host
# (`mount --bind D D && mount --make-shared D`) before boot.
set -euo pipefail
cmd=${1:?usage: $0 boot|poweroff DIR [UNITDIR...]}
W=$(realpath -m "${2:?usage: $0 boot|poweroff DIR [UNITDIR...]}")
shift 2

cgroup_root() { findmnt -rn -t cgroup2 -o TARGET | head -1; }

case $cmd in
boot)
  [ "$(findmnt -no PROPAGATION /)" = private ] \
    || { echo "systemd-sandbox: the host's / is not private; its mounts would leak" >&2; exit 1; }
  CGROOT=$(cgroup_root)
  [ -n "$CGROOT" ] || { echo "systemd-sandbox: no cgroup2 file system mounted" >&2; exit 1; }
  SYSTEMD=$(command -v /lib/systemd/systemd || command -v /usr/lib/systemd/systemd) \
    || { echo "systemd-sandbox: systemd is missing: apt-get install -y systemd" >&2; exit 1; }
  mkdir -p "$W/units"
  U=$W/units
  for t in sysinit basic network network-online sockets local-fs remote-fs timers paths \
           slices swap; do
    printf '[Unit]\nDefaultDependencies=no\n' > "$U/$t.target"
  done
  for u in poweroff.target systemd-poweroff.service shutdown.target umount.target \
           final.target systemd-journald.socket; do
    cp "/lib/systemd/system/$u" "$U/"
  done
  sed -e 's/^Sockets=.*/Sockets=systemd-journald.socket/' -e '/^WatchdogSec/d' \
      /lib/systemd/system/systemd-journald.service > "$U/systemd-journald.service"
  printf '[Unit]\nDefaultDependencies=no\nWants=systemd-journald.socket\n' > "$U/sandbox.target"
  unit_path=$U
  for d in "$@"; do unit_path=$unit_path:$d; done

  cat > "$W/init.sh" <<'INIT'
#!/bin/bash
set -eu
mount --make-rshared /
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
[ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal
mount --bind /dev/null /dev/kmsg
umount -R /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
exec env -i container=s3ssefs-test SYSTEMD_UNIT_PATH="$1" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
     "$2" --system --unit=sandbox.target --log-target=journal
INIT
  chmod +x "$W/init.sh"

  CG=$CGROOT/s3ssefs-sandbox.$$
  mkdir "$CG"
  echo "$CG" > "$W/cgroup"
  # the child moves itself into the sandbox's cgroup, then becomes unshare
  bash -c 'echo $$ > "$1/cgroup.procs"; exec unshare --pid --fork --mount --uts --ipc \
      --cgroup --propagation unchanged --mount-proc "$2/init.sh" "$3" "$4"' \
      _ "$CG" "$W" "$unit_path" "$SYSTEMD" </dev/null >"$W/unshare.log" 2>&1 &
  UP=$!
  SD=
  for _ in $(seq 300); do
    SD=$(pgrep -P "$UP" -x systemd || true)
    [ -n "$SD" ] && break
    kill -0 "$UP" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$SD" ] || { echo "systemd-sandbox: systemd did not start:" >&2; cat "$W/unshare.log" >&2
                    rmdir "$CG" 2>/dev/null || true; exit 1; }
  echo "$SD" > "$W/pid"
  for _ in $(seq 600); do
    st=$(nsenter -t "$SD" -a systemctl is-system-running 2>/dev/null || true)
    case $st in running|degraded) echo "$SD"; exit 0 ;; esac
    kill -0 "$SD" 2>/dev/null || break
    sleep 0.1
  done
  echo "systemd-sandbox: systemd (pid $SD) did not come up: ${st:-no answer}" >&2
  kill -KILL "$SD" 2>/dev/null || true
  exit 1
  ;;
poweroff)
  [ -f "$W/pid" ] || exit 0
  SD=$(cat "$W/pid")
  CG=$(cat "$W/cgroup")
  if kill -0 "$SD" 2>/dev/null; then
    nsenter -t "$SD" -a systemctl --no-block start poweroff.target 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$SD" 2>/dev/null || break; sleep 0.1; done
    # killing a PID namespace's init takes every process in it along
    if kill -0 "$SD" 2>/dev/null; then
      kill -KILL "$SD"
      while kill -0 "$SD" 2>/dev/null; do sleep 0.1; done
    fi
  fi
  find "$CG" -depth -type d -exec rmdir {} + 2>/dev/null || true
  rm -f "$W/pid"
  ;;
*)
  echo "usage: $0 boot|poweroff DIR [UNITDIR...]" >&2
  exit 2
  ;;
esac
