"""Layer 1 units: the worker threads every S3 request and cache read runs in (no S3, no FUSE).

What a user cares about here: a call's answer or error comes back to the caller that made it;
a call that times out frees the caller at once but still counts against the request limit
until its thread is done, so a stuck server cannot make the mount open threads without end;
a call that must not be abandoned is waited for; idle threads are reused, not made anew.
"""

from __future__ import annotations

import threading

import pytest
import trio

from s3ssefs import workers

DEADLINE = 30  # seconds: only a broken hand-off takes this long


async def test_the_answer_and_the_error_come_back_to_the_caller() -> None:
    assert await workers.run_sync(lambda a, b: a * b, 6, 7) == 42

    def fail() -> None:
        raise PermissionError("no key opens it")

    with pytest.raises(PermissionError, match="no key opens it"):
        await workers.run_sync(fail)

    # many at once, each gets its own answer
    got: dict[int, int] = {}

    async def one(i: int) -> None:
        got[i] = await workers.run_sync(lambda: i * i)

    async with trio.open_nursery() as n:
        for i in range(200):
            n.start_soon(one, i)
    assert got == {i: i * i for i in range(200)}


async def _cancel_once_started(started: threading.Event, scope: trio.CancelScope,
                               then: threading.Event | None = None) -> None:
    """Cancel ``scope`` once the call under test has started in its thread; then set ``then``."""
    await workers.run_sync(started.wait, DEADLINE)
    scope.cancel()
    if then is not None:
        then.set()


async def test_an_abandoned_call_holds_its_limiter_token_until_its_thread_ends() -> None:
    limiter = trio.CapacityLimiter(1)
    started, release = threading.Event(), threading.Event()

    def stuck() -> str:
        started.set()
        release.wait(DEADLINE)
        return "late"

    with trio.fail_after(DEADLINE):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(_cancel_once_started, started, scope)
                await workers.run_sync(stuck, limiter=limiter, abandon_on_cancel=True)
        assert scope.cancelled_caught  # the caller was freed while the thread still ran
        assert limiter.borrowed_tokens == 1
        release.set()
        async with limiter:  # free again once the thread has ended
            pass


async def test_a_call_not_to_be_abandoned_is_waited_for_on_cancel() -> None:
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def write() -> None:
        started.set()
        release.wait(DEADLINE)
        done.append("written")

    with trio.fail_after(DEADLINE):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(_cancel_once_started, started, scope, release)
                await workers.run_sync(write)
                await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught
        assert done == ["written"]  # the cancel did not return before the thread finished


async def test_idle_threads_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = workers._Threads()  # none idle from the tests before
    monkeypatch.setattr(workers, "_threads", threads)
    idents = {await workers.run_sync(threading.get_ident) for _ in range(100)}
    # one call at a time: the thread that answered the last one is idle for the next
    assert len(idents) == 1
    assert threads.made == 1
    assert threading.get_ident() not in idents


async def test_an_idle_thread_ends_and_the_next_call_starts_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threads = workers._Threads()
    monkeypatch.setattr(workers, "_threads", threads)
    monkeypatch.setattr(workers, "IDLE_SECONDS", 0.05)
    first = await workers.run_sync(threading.current_thread)
    # the thread ends on its own once idle (joined from another thread, with a deadline)
    await trio.to_thread.run_sync(first.join, DEADLINE)
    assert not first.is_alive()
    # and no call is left waiting for it: the next one gets a new thread and its answer
    with trio.fail_after(DEADLINE):  # a job queued for a thread that is gone fails here
        second = await workers.run_sync(threading.current_thread, abandon_on_cancel=True)
    assert second is not first
    assert threads.made == 2
