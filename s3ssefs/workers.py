"""Blocking calls in worker threads, handed to and from trio at less cost than trio.to_thread.

Every S3 request (boto3 or the lean wire client) and every disk-cache and spill read or write
blocks, so it runs in a worker thread while the trio thread goes on.  ``trio.to_thread.run_sync``
does that with a cancel scope per call, a lock and a condition per hand-off in its thread cache,
a rename of the OS thread for every job, and the result brought back through two callbacks.

:func:`run_sync` keeps the same contract (a ``CapacityLimiter`` held until the thread is done,
by default trio's own; a call abandoned on cancel if asked; the caller's exception re-raised)
with idle threads waiting on one queue, named once, and the result brought back with one
``run_sync_soon``.  ``tests/bench/handoff.py`` measures the hand-off alone; ``ls -l`` of
1,000 files is 1,000 HEADs, and writing 1,000 small files 1,000 PUTs, so its cost shows in
both (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

IDLE_SECONDS = 10.0  # an idle thread ends after this long without a job


class _Job:
    """One call: what to run, the task waiting for it, and whether that task gave up."""

    __slots__ = ("abandoned", "args", "fn", "limiter", "task", "token")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 limiter: trio.CapacityLimiter) -> None:
        self.fn = fn
        self.args = args
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.limiter = limiter
        self.abandoned = False  # read and written on the trio thread only


class _Threads:
    """Worker threads shared by every trio run in the process (each job names its own run):
    a new thread only when none is idle, and an idle one ends after IDLE_SECONDS."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, less the jobs queued for them
        self.made = 0  # threads started, ever (what the tests check reuse by)

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
            self.made += 1
            name = f"s3ssefs-worker-{self.made}"
        threading.Thread(target=self._work, args=(job,), name=name, daemon=True).start()

    def _work(self, job: _Job | None) -> None:
        while True:
            if job is not None:
                result = outcome.capture(job.fn, *job.args)
                # idle before the caller hears: its next call then finds this thread
                with self._lock:
                    self._idle += 1
                _deliver_soon(job, result)
                job = None
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # a job put while the wait timed out is this thread's: take it
                    if not self._jobs.empty():
                        continue
                    self._idle -= 1
                return


def _deliver_soon(job: _Job, result: outcome.Outcome[Any]) -> None:
    # the run may have ended while the call ran: then nobody waits for it
    with contextlib.suppress(trio.RunFinishedError):
        job.token.run_sync_soon(_deliver, job, result)


def _deliver(job: _Job, result: outcome.Outcome[Any]) -> None:
    """On the trio thread: free the limiter's token, then wake the task unless it gave up."""
    job.limiter.release_on_behalf_of(job)
    if not job.abandoned:
        trio.lowlevel.reschedule(job.task, result)


_threads = _Threads()


async def run_sync(fn: Callable[..., T], *args: Any,
                   limiter: trio.CapacityLimiter | None = None,
                   abandon_on_cancel: bool = False) -> T:
    """``fn(*args)`` in a worker thread, as ``trio.to_thread.run_sync`` would: ``limiter``
    (trio's default one if None) is held until the thread has finished, even by a call
    abandoned on cancel; without ``abandon_on_cancel`` the caller waits for the thread."""
    if limiter is None:
        limiter = trio.to_thread.current_default_thread_limiter()
    job = _Job(fn, args, limiter)
    await limiter.acquire_on_behalf_of(job)  # a checkpoint: a cancelled caller stops here
    try:
        _threads.submit(job)
    except BaseException:
        limiter.release_on_behalf_of(job)
        raise

    def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
        if not abandon_on_cancel:
            return trio.lowlevel.Abort.FAILED
        job.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
