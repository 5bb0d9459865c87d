"""The man pages and the systemd unit: they lint clean, they document every option and command,
and the unit passes ``systemd-analyze verify``.

groff, mandoc and systemd-analyze are part of the test set-up: when one is missing the test
fails and says which package to install; nothing here is skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from s3ssefs.config import OPTIONS, MountConfig

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = {
    "s3ssefs.1": MAN / "s3ssefs.1",
    "s3ssefs-keyfile.5": MAN / "s3ssefs-keyfile.5",
    "mount.s3ssefs.8": MAN / "mount.s3ssefs.8",
}
UNIT = ROOT / "systemd" / "s3ssefs@.service"
EXAMPLE_CONF = ROOT / "systemd" / "example.conf"

COMMANDS = ("mount", "umount", "keygen", "keys", "rekey", "stats", "presign", "cleanup")
KEYS_COMMANDS = ("list", "add", "current", "import-s3fs")

# package that provides each tool on Debian
_PACKAGES = {"groff": "groff", "mandoc": "mandoc", "systemd-analyze": "systemd"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install -y {_PACKAGES.get(name, name)}",
                    pytrace=False)
    return path


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def _render(page: Path) -> str:
    """The page as a reader sees it: plain text, no overstrike, no hyphenation, long lines."""
    proc = _run([_tool("mandoc"), "-T", "ascii", "-O", "width=250", str(page)])
    assert proc.returncode == 0, proc.stderr
    return re.sub(r".\x08", "", proc.stdout)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^{re.escape(title)}\n(.*?)(?=^\S)", text, re.M | re.S)
    assert m, f"section {title} missing"
    return m.group(1)


# --- man pages -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAGES))
def test_man_page_groff_clean(name: str) -> None:
    proc = _run([_tool("groff"), "-ww", "-z", "-man", str(PAGES[name])])
    assert proc.returncode == 0 and not proc.stdout and not proc.stderr, (
        f"groff -ww -z -man {name}:\n{proc.stdout}{proc.stderr}")


@pytest.mark.parametrize("name", sorted(PAGES))
def test_man_page_mandoc_clean(name: str) -> None:
    proc = _run([_tool("mandoc"), "-Tlint", str(PAGES[name])])
    assert proc.returncode == 0 and not proc.stdout and not proc.stderr, (
        f"mandoc -Tlint {name}:\n{proc.stdout}{proc.stderr}")


@pytest.mark.parametrize("name", sorted(PAGES))
def test_man_page_header(name: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    th = next(line for line in PAGES[name].read_text().splitlines() if line.startswith(".TH "))
    section = name.rsplit(".", 1)[1]
    assert re.fullmatch(rf'\.TH \S+ {section} \d{{4}}-\d\d-\d\d "s3ssefs {re.escape(version)}" '
                        r'"[^"]+"', th), th


def test_every_option_documented() -> None:
    """Each option of config.OPTIONS has an entry ``--name-with-dashes METAVAR, -o name=METAVAR``
    (flags: ``--name, -o name``) in the OPTIONS section of s3ssefs(1); nothing else is listed."""
    options = _section(_render(PAGES["s3ssefs.1"]), "OPTIONS")
    tags = {m.group(1): m.group(0).strip()
            for m in re.finditer(r"^ {7}(--[a-z][a-z0-9-]*)\b.*$", options, re.M)}
    missing, wrong = [], []
    for opt in OPTIONS:
        long = "--" + opt.name.replace("_", "-")
        if long not in tags:
            missing.append(long)
            continue
        want = (f"{long}, -o {opt.name}" if opt.flag
                else f"{long} {opt.metavar}, -o {opt.name}={opt.metavar}")
        if tags[long] != want:
            wrong.append(f"{tags[long]!r} (want {want!r})")
    assert not missing, f"options missing from man/s3ssefs.1: {missing}"
    assert not wrong, f"option entries that do not match config.OPTIONS: {wrong}"
    stale = sorted(set(tags) - {"--" + o.name.replace("_", "-") for o in OPTIONS})
    assert not stale, f"man/s3ssefs.1 lists options that config.OPTIONS does not have: {stale}"


def test_every_option_in_source() -> None:
    """Also in the roff source, spelled ``\\-\\-name\\-with\\-dashes`` (so `-` prints as ASCII)."""
    src = PAGES["s3ssefs.1"].read_text()
    for opt in OPTIONS:
        roff = r"\-\-" + opt.name.replace("_", r"\-")
        assert roff in src, f"{roff} not in man/s3ssefs.1"


def test_every_command_documented() -> None:
    text = _render(PAGES["s3ssefs.1"])
    synopsis = _section(text, "SYNOPSIS")
    commands = _section(text, "COMMANDS")
    for cmd in COMMANDS:
        assert re.search(rf"^\s*s3ssefs {cmd}\b", synopsis, re.M), f"{cmd} not in SYNOPSIS"
    for sub in KEYS_COMMANDS:
        assert re.search(rf"^\s*s3ssefs keys {sub}\b", synopsis, re.M), (
            f"keys {sub} not in SYNOPSIS")
    want = [c for c in COMMANDS if c != "keys"] + [f"keys {s}" for s in KEYS_COMMANDS]
    missing = [c for c in want if not re.search(rf"^ {{7}}{c}(?:\s|$)", commands, re.M)]
    assert not missing, f"commands without an entry in COMMANDS: {missing}"


def test_required_sections() -> None:
    text = _render(PAGES["s3ssefs.1"])
    for title in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ENVIRONMENT",
                  "FILES", "EXIT STATUS", "SEMANTICS AND LIMITS", "SECURITY", "EXAMPLES",
                  "SEE ALSO"):
        assert re.search(rf"^{title}$", text, re.M), f"s3ssefs(1) has no {title} section"
    keyfile = _render(PAGES["s3ssefs-keyfile.5"])
    for word in ("version", "current", "[keys]", "[[map]]", "0600", "MD5"):
        assert word in keyfile, f"s3ssefs-keyfile(5) does not mention {word}"


def test_mount_helper_lists_generic_options() -> None:
    from s3ssefs.config import GENERIC_MOUNT_OPTIONS

    text = _section(_render(PAGES["mount.s3ssefs.8"]), "OPTIONS")
    words = set(re.findall(r"[\w.-]+", text))
    missing = [o for o in GENERIC_MOUNT_OPTIONS if o not in words]
    assert not missing, f"mount.s3ssefs(8) does not list generic options {missing}"


# --- systemd ---------------------------------------------------------------------------------

def _unit_lines() -> list[tuple[str, str]]:
    out = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def test_unit_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on an instance of the template prints nothing.

    It runs against a scratch root (``--root``) holding a copy of the system's unit directory,
    the template and a stand-in ``/usr/local/bin/s3ssefs`` (verify checks that ExecStart= is
    executable), so the host is not touched whether s3ssefs is installed there or not.  The man
    pages named by Documentation= are found through MANPATH."""
    analyze = _tool("systemd-analyze")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if p.is_dir()), None)
    if system_units is None:
        pytest.fail("no /usr/lib/systemd/system: apt-get install -y systemd", pytrace=False)
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    for exe in {v.split()[0].lstrip("-@:+!") for k, v in _unit_lines() if k.startswith("Exec")}:
        stub = root / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    manpath = tmp_path / "man"
    for page in PAGES.values():
        d = manpath / f"man{page.suffix[1:]}"
        d.mkdir(parents=True, exist_ok=True)
        (d / page.name).symlink_to(page)
    env = dict(os.environ, MANPATH=str(manpath), SYSTEMD_LOG_COLOR="0")
    man = "yes" if shutil.which("man") else "no"
    proc = _run([analyze, "verify", f"--root={root}", f"--man={man}", "--recursive-errors=no",
                 "s3ssefs@example.service"], env=env)
    output = (proc.stdout + proc.stderr).strip()
    ours = [line for line in output.splitlines() if "s3ssefs" in line]
    assert proc.returncode == 0 and not ours, f"systemd-analyze verify:\n{output}"


def test_unit_keeps_host_mount_namespace() -> None:
    """Options that give the unit its own mount namespace would hide the FUSE mount from the
    host; the unit must not use any of them."""
    forbidden = {"PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectSystem", "ProtectHome",
                 "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths",
                 "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
                 "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory",
                 "RootImage", "MountFlags", "DynamicUser", "PrivateUsers", "MountAPIVFS",
                 "NetworkNamespacePath"}
    used = {k for k, v in _unit_lines() if k in forbidden and v.lower() not in ("no", "false")}
    assert not used, f"the unit would get a private mount namespace through {sorted(used)}"


def test_unit_contract() -> None:
    lines = _unit_lines()
    kv: dict[str, list[str]] = {}
    for k, v in lines:
        kv.setdefault(k, []).append(v)
    assert kv["Type"] == ["notify"]
    assert kv["NotifyAccess"] == ["main"]
    assert kv["TimeoutStopSec"] == ["15min"]
    assert kv["Restart"] == ["on-failure"]
    assert kv["LimitCORE"] == ["0"]
    assert "/dev/fuse rw" in kv["DeviceAllow"]
    assert kv["NoNewPrivileges"] == ["yes"]
    assert "network-online.target" in " ".join(kv["After"])
    assert "network-online.target" in " ".join(kv["Wants"])
    assert sorted(kv["LoadCredential"]) == ["aws-credentials:/etc/s3ssefs/%i.aws",
                                            "keyfile:/etc/s3ssefs/%i.key"]
    (start,) = kv["ExecStart"]
    argv = start.split()
    assert argv[:2] == ["/usr/local/bin/s3ssefs", "mount"]
    assert "--foreground" in argv
    assert argv[argv.index("--instance-config") + 1] == "/etc/s3ssefs/%i.conf"
    assert argv[argv.index("--keyfile") + 1] == "${CREDENTIALS_DIRECTORY}/keyfile"
    assert argv[argv.index("--keyfile-source") + 1] == "/etc/s3ssefs/%i.key"
    assert kv["RestartPreventExitStatus"] == ["78"]
    assert argv[argv.index("--credentials-file") + 1] == "${CREDENTIALS_DIRECTORY}/aws-credentials"
    # secrets only through credentials: nothing secret-looking in the environment
    for k, v in lines:
        if k in ("Environment", "EnvironmentFile", "PassEnvironment", "SetCredential"):
            pytest.fail(f"{k}={v}: secrets go through LoadCredential= only")


def test_example_instance_file() -> None:
    """systemd/example.conf holds bucket, mountpoint and valid name=value option lines."""
    values: dict[str, str] = {}
    for n, raw in enumerate(EXAMPLE_CONF.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        assert name not in values, f"example.conf:{n}: {name} given twice"
        values[name] = value if eq else "true"
    bucket = values.pop("bucket")
    mountpoint = values.pop("mountpoint")
    assert "keyfile" not in values and "credentials_file" not in values, (
        "secrets come through LoadCredential=, not the instance file")
    cfg = MountConfig.from_options(bucket, Path(mountpoint),
                                   {**values, "keyfile": "/run/credentials/x/keyfile"})
    assert cfg.bucket and cfg.mountpoint == Path(mountpoint)


# --- command-line help -----------------------------------------------------------------------

def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the CLI and of the mount helper, by the command it parses."""
    from s3ssefs.cli import build_helper_parser, build_parser

    out = [("mount.s3ssefs", build_helper_parser())]
    todo = [("s3ssefs", build_parser())]
    while todo:
        name, parser = todo.pop()
        out.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return out


def test_every_option_has_a_help_line() -> None:
    missing = [f"{name} {action.option_strings[0]}" for name, parser in _parsers()
               for action in parser._actions
               if action.option_strings and not action.help]
    assert not missing, f"options without a help line: {missing}"


@pytest.mark.parametrize("command, only", [
    ("rekey", {"--to", "--dry-run", "--jobs", "-o", "--keyfile", "--part-size"}),
    ("cleanup", {"--older-than", "--dry-run", "-o"}),
])
def test_s3_commands_list_only_the_options_they_use(command: str, only: set[str]) -> None:
    """rekey and cleanup talk to S3 without mounting: their help lists the connection options
    and their own, no FUSE or cache option; and they refuse the others, also given with -o."""
    from s3ssefs.config import CONNECTION_OPTIONS

    want = only | {"--" + o.replace("_", "-") for o in CONNECTION_OPTIONS} | {"-h"}
    proc = _run([sys.executable, "-m", "s3ssefs", command, "--help"])
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"^  (-[-\w]+)", proc.stdout, re.M))
    assert listed == want, f"{command} --help: extra {listed - want}, missing {want - listed}"
    for argv in (["--allow-other"], ["-o", "cache_size=1G"]):
        proc = _run([sys.executable, "-m", "s3ssefs", command, "bucket", *argv])
        assert proc.returncode == 2, (argv, proc.stderr)


def test_mount_source_as_mount_lists_it() -> None:
    """``s3ssefs:BUCKET/PREFIX`` (the source /proc/self/mounts shows) means BUCKET/PREFIX."""
    for source in ("bkt/p/q", "s3ssefs:bkt/p/q"):
        cfg = MountConfig.from_options(source, Path("/mnt"), {"keyfile": "/k"})
        assert (cfg.bucket, cfg.prefix) == ("bkt", "p/q/"), source


# --- README and docs -------------------------------------------------------------------------

README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def test_readme_is_a_user_guide() -> None:
    """README stays short, with the sections users and the other docs point at; the record of
    measurements is docs/benchmarks.md, and every bench result it names is committed."""
    text = README.read_text()
    assert len(text.splitlines()) <= 420
    headings = re.findall(r"^##+ (.+)$", text, re.M)
    for title in ("Install", "The two commands", "Using it", "The key file", "Semantics",
                  "Security", "Reliability", "Encryption modes", "Tested servers",
                  "Performance"):
        assert any(h.startswith(title) for h in headings), f"README has no section {title!r}"
    perf = text.split("## Performance", 1)[1].split("\n## ", 1)[0]
    assert len(perf.strip().splitlines()) <= 24 and "docs/benchmarks.md" in perf
    bench = BENCHMARKS.read_text()
    names = set(re.findall(r"results-[\w.-]+?\.json", bench)) - {"results-DATE.json"}
    assert names, "docs/benchmarks.md names no bench results"
    missing = sorted(n for n in names if not (ROOT / "tests" / "bench" / n).exists())
    assert not missing, f"docs/benchmarks.md names results not in tests/bench: {missing}"


def test_docstrings_hold_no_timings() -> None:
    """Module, class and function docstrings say why, not how fast one machine was: figures
    such as '320 MiB/s' or '0.23 ms' belong in docs/benchmarks.md."""
    import ast

    figure = re.compile(r"\d[\d.,]*\s?(?:[KMG]i?B/s|ops/s|ms|µs|CPU s)\b")
    found = []
    for path in sorted((ROOT / "s3ssefs").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                          | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                found += [f"{path.name}: {m.group(0)}" for m in figure.finditer(doc)]
    assert not found, f"timings in docstrings: {found}"
