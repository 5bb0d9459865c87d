"""CPU per hand-off of a blocking call to a worker thread and back: trio.to_thread.run_sync
against s3ssefs.workers.run_sync (why s3ssefs has its own, see that module's docstring).

    .venv/bin/python tests/bench/handoff.py [--calls N] [--runs R]

Each run starts N calls at once (a trivial function, a limiter of 16 as the store uses), and
prints the median over R runs of process CPU and wall time per call, interleaved.  No S3, no
FUSE: it measures the hand-off alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from s3ssefs import workers


def work() -> int:
    return 1


def spawn_only(limiter: trio.CapacityLimiter) -> Awaitable[object]:
    return trio.sleep(0)


def via_trio(limiter: trio.CapacityLimiter) -> Awaitable[object]:
    return trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)


def via_workers(limiter: trio.CapacityLimiter) -> Awaitable[object]:
    return workers.run_sync(work, limiter=limiter, abandon_on_cancel=True)


WAYS: dict[str, Callable[[trio.CapacityLimiter], Awaitable[object]]] = {
    "task only (no thread)": spawn_only,
    "trio.to_thread.run_sync": via_trio,
    "s3ssefs.workers.run_sync": via_workers,
}


def one_run(way: Callable[[trio.CapacityLimiter], Awaitable[object]], calls: int,
            ) -> tuple[float, float]:
    async def main() -> None:
        limiter = trio.CapacityLimiter(16)

        async def call() -> None:
            await way(limiter)

        async with trio.open_nursery() as n:
            for _ in range(calls):
                n.start_soon(call)

    cpu, wall = time.process_time(), time.perf_counter()
    trio.run(main)
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(args.runs):
        for name, way in WAYS.items():
            got[name].append(one_run(way, args.calls))
    print(f"{args.calls} calls at once, median of {args.runs} interleaved runs")
    print(f"{'hand-off':<28}{'CPU µs/call':>12}{'wall µs/call':>14}")
    for name, runs in got.items():
        cpu = statistics.median(c for c, _ in runs) * 1e6
        wall = statistics.median(w for _, w in runs) * 1e6
        print(f"{name:<28}{cpu:>12.0f}{wall:>14.0f}")


if __name__ == "__main__":
    main()
