"""Small trio helpers shared by the store, the files and rekey.

trio nurseries raise ``ExceptionGroup`` even for one failing child; the layers above want the
one :class:`~s3ssefs.errors.FsError` that says which errno to return, so :func:`gather` turns
a group back into its first real error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio


def first_error(eg: BaseExceptionGroup) -> BaseException:
    """The first leaf of a (nested) exception group that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(eg)
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return leaves[0] if leaves else eg


async def gather(jobs: Iterable[Callable[[], Awaitable[object]]], limit: int | None = None,
                 ) -> None:
    """Run every job concurrently (at most ``limit`` at once); raise the first failure."""
    sem = trio.Semaphore(limit) if limit else None

    async def run(job: Callable[[], Awaitable[object]]) -> None:
        if sem is None:
            await job()
            return
        async with sem:
            await job()

    try:
        async with trio.open_nursery() as n:
            for job in jobs:
                n.start_soon(run, job)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
