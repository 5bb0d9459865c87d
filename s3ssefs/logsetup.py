"""Logging set-up, with SSE-C key redaction that holds at every level.

botocore's DEBUG logging prints request headers and parameters, the customer key included.
A filter on every handler rewrites any record whose text carries a key header or parameter,
and a second line of defence replaces the base64 and hex forms of every loaded key wherever
they appear.  The filter is installed on handlers (not loggers) so records from any library
pass through it.

Under systemd, stderr is a stream to the journal (systemd sets ``JOURNAL_STREAM`` to its device
and inode).  Each line then starts with its syslog priority (``<3>`` error … ``<7>`` debug),
which journald strips and keeps as the entry's level, so ``journalctl -p warning`` and the
colours of ``journalctl -u`` work; journald adds the time and the unit's name itself.
"""

from __future__ import annotations

import base64
import logging
import logging.handlers
import os
import re
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Header and parameter spellings botocore uses in its debug output.
_KEY_FIELD = re.compile(
    r"""(?ix)
    (x-amz-(?:copy-source-)?server-side-encryption-customer-key(?!-md5)
     |(?:CopySource)?SSECustomerKey(?!MD5))
    (['"]?\s*[:=]\s*b?['"]?)
    ([^'",}\s]+)
    """
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(raw: bytes) -> None:
    """Remember a key's printable forms so they are scrubbed from any log line."""
    forms = {base64.b64encode(raw).decode(), raw.hex(), repr(raw)[2:-1]}
    with _secrets_lock:
        _secrets.update(f for f in forms if len(f) >= 16)


def redact(text: str) -> str:
    text = _KEY_FIELD.sub(lambda m: m.group(1) + m.group(2) + "<redacted>", text)
    with _secrets_lock:
        secrets = tuple(_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, "<redacted>")
    return text


class RedactingFilter(logging.Filter):
    """Formats the record once, redacts it, and freezes the result into ``msg``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not leak args either
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_PRIORITY = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))  # else 7 (debug)


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (``JOURNAL_STREAM=dev:ino``)."""
    try:
        dev, ino = (int(v) for v in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: 3 err, 4 warning, 6 info, 7 debug."""
    return next((p for level, p in _PRIORITY if levelno >= level), 7)


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) prefixed with the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(level: str = "INFO", log_file: Path | None = None,
                  foreground: bool = True) -> None:
    """stderr in the foreground (with priorities when it is the journal), a file or syslog
    otherwise."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    elif foreground or not Path("/dev/log").exists():
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        fmt = "s3ssefs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    journal = type(handler) is logging.StreamHandler and stderr_is_journal()
    handler.setFormatter(JournalFormatter(fmt) if journal else logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
    if level != "DEBUG":
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
