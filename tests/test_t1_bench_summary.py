"""The benchmark's comparison rules (tests/bench/summary.py), on hand-made results.

The README's performance claims are printed by summary.py from a results file, so its rules are
what a reader is told: a ratio is the median of per-round paired ratios (not a ratio of
medians), the baseline is the better library and the better mount peer per workload, a peer
that stored plaintext is not a baseline, and fewer than five rounds are no verdict.  No server.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent / "bench" / "summary.py"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("bench_summary", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = mod
    spec.loader.exec_module(mod)
    return mod


def metric(rounds: list[float | None]) -> dict:
    vals = [v for v in rounds if v is not None]
    vals_sorted = sorted(vals)
    mid = len(vals_sorted) // 2
    med = (vals_sorted[mid] if len(vals_sorted) % 2
           else (vals_sorted[mid - 1] + vals_sorted[mid]) / 2)
    return {"unit": "MiB/s", "rounds": rounds, "values": vals, "median": med,
            "min": min(vals), "max": max(vals)}


def results(systems: dict[str, dict[str, list[float | None]]], runs: int,
            encryption: dict[str, dict[str, str]] | None = None) -> dict:
    enc = encryption or {}
    return {
        "meta": {"date": "2026-12-07T00:00:00+00:00", "runs": runs, "sizes": {"big": 1 << 30},
                 "command": "tests/bench/bench.py --runs 5", "cpu_method": "cgroup",
                 "versions": {"s3ssefs_git": "abc1234"},
                 "metrics": {
                     "read_cold": {"label": "seq read 1 GiB, cold", "unit": "MiB/s",
                                   "higher_better": True},
                     "write_close": {"label": "seq write 1 GiB, to close", "unit": "MiB/s",
                                     "higher_better": True},
                     "ls_cold": {"label": "ls -l of 1000 files, cold", "unit": "s",
                                 "higher_better": False}}},
        "systems": {n: {"metrics": {k: metric(v) for k, v in ms.items()}, "cpu": {},
                        "encryption": enc.get(n, {}), "errors": []}
                    for n, ms in systems.items()},
    }


def row(summary, res: dict, key: str) -> dict:
    return next(r for r in summary.headline(res) if r["key"] == key)


def test_the_ratio_is_the_median_of_per_round_pairs_not_a_ratio_of_medians(summary):
    # the cold reads of results-2026-12-04x.json: medians 344 / 379 = 0.91, pairs 0.87
    res = results({"s3ssefs": {"read_cold": [327.9, 376.6, 344.4]},
                   "boto3": {"read_cold": [378.5, 463.9, 353.8]}}, runs=3)
    r = row(summary, res, "read_cold")
    assert r["lib"]["name"] == "boto3"
    assert [round(x, 2) for x in r["lib"]["rounds"]] == [0.87, 0.81, 0.97]
    assert round(r["lib"]["ratio"], 2) == 0.87


def test_fewer_than_five_rounds_are_marked_as_no_verdict(summary):
    three = results({"s3ssefs": {"read_cold": [1.0, 2.0, 3.0]},
                     "boto3": {"read_cold": [1.0, 2.0, 3.0]}}, runs=3)
    five = results({"s3ssefs": {"read_cold": [1.0, 2.0, 3.0, 4.0, 5.0]},
                    "boto3": {"read_cold": [1.0, 2.0, 3.0, 4.0, 5.0]}}, runs=5)
    assert "not a verdict" in summary.markdown(three)
    assert "not a verdict" not in summary.markdown(five)


def test_a_round_one_side_lacks_is_not_paired(summary):
    res = results({"s3ssefs": {"read_cold": [100.0, 100.0, 100.0]},
                   "boto3": {"read_cold": [50.0, None, 200.0]}}, runs=3)
    r = row(summary, res, "read_cold")
    assert r["lib"]["rounds"] == [2.0, None, 0.5]
    assert r["lib"]["n"] == 2
    assert r["lib"]["ratio"] == pytest.approx(1.25)


def test_the_library_baseline_is_the_faster_of_boto3_and_crt(summary):
    res = results({"s3ssefs": {"read_cold": [100.0] * 5},
                   "boto3": {"read_cold": [120.0] * 5},
                   "crt": {"read_cold": [160.0] * 5}}, runs=5)
    r = row(summary, res, "read_cold")
    assert r["lib"]["name"] == "crt"
    assert r["lib"]["ratio"] == pytest.approx(100 / 160)


def test_times_are_inverted_so_above_one_means_s3ssefs_is_better(summary):
    res = results({"s3ssefs": {"ls_cold": [0.5] * 5},
                   "rclone-full": {"ls_cold": [1.0] * 5},
                   "s3fs": {"ls_cold": [2.0] * 5}}, runs=5)
    r = row(summary, res, "ls_cold")
    assert r["peer"]["name"] == "rclone-full"  # the better peer: the shorter time
    assert r["peer"]["ratio"] == pytest.approx(2.0)


def test_a_peer_that_stored_plaintext_is_not_a_baseline(summary):
    res = results({"s3ssefs": {"write_close": [100.0] * 5},
                   "s3fs": {"write_close": [300.0] * 5},
                   "rclone-writes": {"write_close": [50.0] * 5}}, runs=5,
                  encryption={"s3fs": {"big file": "PLAINTEXT"},
                              "rclone-writes": {"big file": "sse-c"}})
    r = row(summary, res, "write_close")
    assert r["peer"]["name"] == "rclone-writes"
    assert "s3fs (big file)" in summary.markdown(res)


def test_old_files_without_rounds_pair_by_position_only_when_complete(summary):
    res = results({"s3ssefs": {"read_cold": [100.0, 100.0]},
                   "boto3": {"read_cold": [50.0, 200.0]}}, runs=2)
    for s in res["systems"].values():
        del s["metrics"]["read_cold"]["rounds"]
    assert row(summary, res, "read_cold")["lib"]["rounds"] == [2.0, 0.5]
    res["meta"]["runs"] = 3  # a run is missing: positions no longer say which round
    assert row(summary, res, "read_cold")["lib"]["name"] == "boto3"
    assert row(summary, res, "read_cold")["lib"]["ratio"] is None
