#!/usr/bin/env python3
"""The headline of a benchmark run, computed from its JSON (tests/bench/bench.py --json).

A figure in the README must be one this script prints from a committed results file, never a
number copied by hand: so the comparison rules live here, once, and bench.py prints the same
table at the end of a run.

The rules:
- a ratio is the median of per-round *paired* ratios: s3ssefs's run of round r against the
  other system's run of the same round (the two ran back to back, so they met the same load on
  a shared machine); not a ratio of two medians, which pairs figures of different rounds;
- against the libraries, the baseline of each workload is the better (by median) of boto3 and
  the AWS CRT client; against the mounts, the better of the s3fs and rclone configurations;
  a peer whose object for that workload was not stored SSE-C is not a candidate;
- fewer than MIN_ROUNDS paired rounds give a figure but no verdict, and the table says so.

    python tests/bench/summary.py tests/bench/results-DATE.json   # markdown on stdout

Files written before per-round pairing (no "rounds" lists) are paired by position, which is
what their run order was, when every system has one value per run; otherwise not at all.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MIN_ROUNDS = 5
LIBRARIES = ("boto3", "crt")
PEER_PREFIXES = ("s3fs", "rclone")

# the workload (CPU figures, encryption check) behind each metric
METRIC_WORKLOAD = {
    "write_close": "write", "write_durable": "write", "read_cold": "read-cold",
    "read_warm": "read-warm", "rand_cold": "rand-cold", "rand_warm": "rand-warm",
    "small_close": "small", "small_durable": "small", "ls_cold": "ls",
    "rename_return": "rename", "rename_durable": "rename", "par_read": "par-read",
    "meta_ls": "meta", "meta_find": "meta", "meta_du": "meta", "meta_rsync": "meta",
}
# the object whose encryption each written metric depends on (bench.py's check_enc labels)
METRIC_ENCRYPTION = {
    "write_close": "big file", "write_durable": "big file", "small_close": "small file",
    "small_durable": "small file", "rename_return": "renamed file",
    "rename_durable": "renamed file",
}


CPU_METHODS = {
    "cgroup": "user + system time of every process of the system's client side (daemon and "
              "workload process, so the kernel's FUSE copies too), one cgroup v2 per system",
    "proc": "user + system time of the daemon's process tree and of the workload processes",
    "": "as that run recorded it (mounts: the daemon's process tree only; libraries: the "
        "worker process)",
}


def rounds_of(res: dict, name: str, key: str) -> list[float | None] | None:
    """Per-round values of one metric of one system (None where that round has none)."""
    m = res["systems"].get(name, {}).get("metrics", {}).get(key)
    if not m:
        return None
    if "rounds" in m:
        return m["rounds"]
    vals = m.get("values", [])
    return list(vals) if len(vals) == res.get("meta", {}).get("runs") else None


def higher_better(res: dict, key: str) -> bool:
    return bool(res["meta"]["metrics"][key]["higher_better"])


def paired(res: dict, base: str, other: str, key: str) -> list[float | None]:
    """base's advantage over other in each round (>1: base better; times are inverted)."""
    a, b = rounds_of(res, base, key), rounds_of(res, other, key)
    if a is None or b is None:
        return []
    hb = higher_better(res, key)
    out: list[float | None] = []
    for x, y in zip(a, b, strict=False):
        if x is None or y is None or x <= 0 or y <= 0:
            out.append(None)
        else:
            out.append(x / y if hb else y / x)
    return out


def paired_median(ratios: list[float | None]) -> tuple[float | None, int]:
    got = [r for r in ratios if r is not None]
    return (statistics.median(got) if got else None), len(got)


def median_of(res: dict, name: str, key: str) -> float | None:
    m = res["systems"].get(name, {}).get("metrics", {}).get(key)
    return m["median"] if m else None


def stored_encrypted(res: dict, name: str, key: str) -> bool:
    what = METRIC_ENCRYPTION.get(key)
    if what is None:
        return True
    st = res["systems"][name].get("encryption", {}).get(what)
    return st is None or st == "sse-c"


def best_of(res: dict, names: list[str], key: str) -> str | None:
    """The candidate with the better median of key (only SSE-C-stored results count)."""
    cands = [(median_of(res, n, key), n) for n in names
             if median_of(res, n, key) and stored_encrypted(res, n, key)]
    if not cands:
        return None
    pick = max if higher_better(res, key) else min
    return pick(cands)[1]


def cpu_median(res: dict, name: str, key: str) -> tuple[float, str] | None:
    c = res["systems"].get(name, {}).get("cpu", {}).get(METRIC_WORKLOAD.get(key, ""))
    return (c["median"], c["unit"]) if c else None


def headline(res: dict, base: str = "s3ssefs") -> list[dict]:
    """One row per metric the base system has: its median, the best library and the best peer
    with the paired ratio against each (per-round list kept for printing)."""
    names = list(res["systems"])
    libs = [n for n in names if n in LIBRARIES]
    peers = [n for n in names if n.startswith(PEER_PREFIXES)]
    rows = []
    for key, meta in res["meta"]["metrics"].items():
        if median_of(res, base, key) is None:
            continue
        row: dict = {"key": key, "label": meta["label"], "unit": meta["unit"],
                     "higher_better": meta["higher_better"], "base": median_of(res, base, key),
                     "base_cpu": cpu_median(res, base, key)}
        for side, group in (("lib", libs), ("peer", peers)):
            who = best_of(res, group, key)
            rr = paired(res, base, who, key) if who else []
            med, n = paired_median(rr)
            row[side] = {"name": who, "median": median_of(res, who, key) if who else None,
                         "ratio": med, "n": n, "rounds": rr,
                         "cpu": cpu_median(res, who, key) if who else None}
        rows.append(row)
    return rows


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio_cell(side: dict) -> str:
    if side["name"] is None or side["ratio"] is None:
        return "-"
    s = f"**{side['ratio']:.2f}×** {side['name']}"
    return s + " †" if side["n"] < MIN_ROUNDS else s


def cpu_cell(c: tuple[float, str] | None) -> str:
    return "-" if c is None else f"{fmt(c[0])} {c[1]}"


def markdown(res: dict, base: str = "s3ssefs") -> str:
    meta = res["meta"]
    sizes = meta.get("sizes", {})
    cmd = meta.get("command") or "(command not recorded)"
    git = meta.get("versions", {}).get("s3ssefs_git", "?")
    lines = [
        f"Benchmark of {meta['date']} at s3ssefs `{git}`, {meta['runs']} rounds, "
        f"big file {sizes.get('big', 0) >> 20} MiB: `{cmd}`",
        "",
        f"Ratio = median over rounds of {base}'s run / the baseline's run of the same round "
        "(>1: s3ssefs better; times inverted). Baseline: the better of boto3 and the AWS CRT "
        "client, and the better of the s3fs and rclone configurations, per workload. "
        f"Client CPU: {CPU_METHODS.get(meta.get('cpu_method', ''), CPU_METHODS[''])}.",
        "",
        f"| workload | unit | {base} | vs best library | vs best mount peer "
        f"| CPU {base} | CPU library |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = headline(res, base)
    for r in rows:
        unit = r["unit"] + ("" if r["higher_better"] else " (lower=better)")
        lines.append(f"| {r['label']} | {unit} | {fmt(r['base'])} | {ratio_cell(r['lib'])} "
                     f"| {ratio_cell(r['peer'])} | {cpu_cell(r['base_cpu'])} "
                     f"| {cpu_cell(r['lib']['cpu'])} |")
    short = sorted({s["n"] for r in rows for s in (r["lib"], r["peer"])
                    if s["name"] and s["n"] < MIN_ROUNDS})
    if short:
        lines += ["", f"† {', '.join(map(str, short))} paired rounds, fewer than {MIN_ROUNDS}: "
                      "a figure, not a verdict."]
    plain = sorted({f"{n} ({w})" for n, s in res["systems"].items()
                    for w, st in s.get("encryption", {}).items() if st != "sse-c"})
    if plain:
        lines += ["", "Not candidates (object not stored SSE-C): " + ", ".join(plain) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        print("usage: summary.py RESULTS.json [BASE_SYSTEM]", file=sys.stderr)
        return 2
    res = json.loads(Path(argv[0]).read_text())
    print(markdown(res, argv[1] if len(argv) > 1 else res.get("ratio_base", "s3ssefs")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
