"""One error type that carries its errno, so every failure maps to exactly one errno here.

The store raises :class:`FsError` for every S3 failure after its retries; the filesystem layer
turns it into ``pyfuse3.FUSEError(err.errno)`` and nothing else. Messages name objects, never
keys.

An error is also *permanent* or not: whether the same request, sent again later, can succeed.
A throttled, timed-out or 5xx request may; a 403, a refused SSE-C request (RGW's 400 for SSE-C
over plain HTTP, a bucket that blocks SSE-C) or a missing bucket gets the same answer however
often it is sent.  The store decides which (its one error map); whoever retries in the
background (the upload retry loop) reads it here instead of looking at status codes again.
"""

from __future__ import annotations

import errno as _errno


class FsError(Exception):
    """A failure with the errno the user should see and a one-line reason for the log."""

    def __init__(self, errno: int, message: str, status: int | None = None, *,
                 permanent: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.status = status  # the HTTP status of the S3 answer it came from, if any
        self.permanent = permanent  # sending the same request again cannot succeed

    def __str__(self) -> str:
        return f"{super().__str__()} [{_errno.errorcode.get(self.errno, self.errno)}]"


class MountError(Exception):
    """The mount (or another command) cannot start; the message is one line for the user."""


def enoent(message: str) -> FsError:
    return FsError(_errno.ENOENT, message)


def eio(message: str) -> FsError:
    return FsError(_errno.EIO, message)
