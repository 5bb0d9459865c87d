"""Installing s3ssefs as an operator does: ``make install`` into a staging tree (``DESTDIR``),
``make uninstall`` from it, and the wheel ``python -m build`` makes, in a clean virtualenv.

The staged tree is what a package would ship: every file where the tool that uses it looks
(``/sbin`` for mount(8), ``share/man`` for man(1), a unit directory systemd reads), the unit's
``ExecStart=`` naming the installed command, and a virtualenv whose scripts name its final path,
not the staging one, and a unit that ``systemd-analyze verify`` accepts there.  The real
install into the default PREFIX, and the unit run by a real systemd, are in
``test_t5_systemd.py``.  Both need PyPI (or pip's cache) for the dependencies.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = "/usr/local/lib/s3ssefs/venv"
UNIT = "usr/local/lib/systemd/system/s3ssefs@.service"
MAN = {"man1/s3ssefs.1", "man5/s3ssefs-keyfile.5", "man8/mount.s3ssefs.8"}


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def _installed(dest: Path) -> set[str]:
    """Files and symlinks under ``dest``, the virtualenv counted as one entry."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(dest):
        rel = Path(dirpath).relative_to(dest)
        if "/" + rel.as_posix() == VENV:
            out.add(VENV.lstrip("/"))
            dirnames.clear()
            continue
        out.update((rel / n).as_posix() for n in filenames)
        out.update((rel / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink())
    return out


def test_make_install_and_uninstall_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    _run(["make", "-C", str(ROOT), "install", f"DESTDIR={dest}"])

    assert _installed(dest) == {
        "usr/local/bin/s3ssefs", "sbin/mount.s3ssefs", UNIT, VENV.lstrip("/"),
        "usr/local/share/doc/s3ssefs/example.conf",
        *(f"usr/local/share/man/{m}" for m in MAN)}
    # links name the final paths, and those exist in the staged tree
    for link, target in (("usr/local/bin/s3ssefs", f"{VENV}/bin/s3ssefs"),
                         ("sbin/mount.s3ssefs", f"{VENV}/bin/mount.s3ssefs")):
        assert os.readlink(dest / link) == target
        assert os.access(dest / target.lstrip("/"), os.X_OK)
    for m in MAN:
        assert (dest / "usr/local/share/man" / m).read_bytes() == (
            ROOT / "man" / Path(m).name).read_bytes()
    etc = dest / "etc/s3ssefs"
    assert etc.is_dir() and stat.S_IMODE(etc.stat().st_mode) == 0o700

    # the unit is the template with ExecStart= naming the installed command
    template = (ROOT / "systemd/s3ssefs@.service").read_text().splitlines()
    unit = (dest / UNIT).read_text().splitlines()
    assert len(unit) == len(template)
    changed = [(a, b) for a, b in zip(template, unit, strict=True) if a != b]
    starts = [line for line in unit if line.startswith("ExecStart=")]
    assert len(starts) == 1 and starts[0].startswith("ExecStart=/usr/local/bin/s3ssefs mount ")
    assert all(b.startswith("ExecStart=") for _, b in changed)

    # systemd-analyze verify accepts the installed unit in the staged tree (a copy of the
    # system's units beside it): ExecStart= names an executable, Documentation= man pages
    # that the staged MANPATH holds
    system_units = next(p for p in (Path("/usr/lib/systemd/system"),
                                    Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, dest / "usr/lib/systemd/system", symlinks=True)
    env = dict(os.environ, MANPATH=str(dest / "usr/local/share/man"), SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={dest}", "--man=yes",
                           "--recursive-errors=no", "s3ssefs@example.service"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "s3ssefs" not in proc.stdout + proc.stderr, (
        proc.stdout + proc.stderr)
    shutil.rmtree(dest / "usr/lib/systemd/system")

    # the virtualenv's scripts name /usr/local, not the staging directory, and work
    venv = dest / VENV.lstrip("/")
    for script in ("s3ssefs", "mount.s3ssefs"):
        text = (venv / "bin" / script).read_text()
        assert text.startswith(f"#!{VENV}/bin/python"), text.splitlines()[0]
        assert str(dest) not in text
    assert str(dest) not in (venv / "pyvenv.cfg").read_text()
    py = str(venv / "bin/python")
    assert _run([py, str(venv / "bin/s3ssefs"), "--version"]).stdout.startswith("s3ssefs ")
    assert "BUCKET" in _run([py, str(venv / "bin/mount.s3ssefs"), "--help"]).stdout

    # a key file already in /etc/s3ssefs survives uninstall; everything else goes
    (etc / "data.key").write_text("kept\n")
    _run(["make", "-C", str(ROOT), "uninstall", f"DESTDIR={dest}"])
    assert _installed(dest) == {"etc/s3ssefs/data.key"}
    (etc / "data.key").unlink()
    _run(["make", "-C", str(ROOT), "uninstall", f"DESTDIR={dest}"])
    assert not etc.exists()


def test_wheel_installs_in_a_clean_virtualenv(tmp_path: Path) -> None:
    """``python -m build`` (on a copy of the sources, so the clone stays clean) makes a wheel
    that pip installs into a fresh virtualenv with both console scripts."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "s3ssefs"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)])
    (wheel,) = dist.glob("s3ssefs-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)])
    assert _run([str(venv / "bin/s3ssefs"), "--version"]).stdout.startswith("s3ssefs ")
    assert "BUCKET" in _run([str(venv / "bin/mount.s3ssefs"), "--help"]).stdout
    keyfile = tmp_path / "k.key"
    _run([str(venv / "bin/s3ssefs"), "keygen", str(keyfile)])
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
