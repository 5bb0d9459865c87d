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
The same filter escapes control characters: object names come from the bucket, and a name
holding a newline would otherwise forge a log line of its own.

A daemon in the background never logs into the void: without a syslog socket it logs to a
file (the command that starts it picks one in the cache directory and says so).  Log files
are created mode 0600: at debug level they hold object names and the access key id.
"""

from __future__ import annotations

import base64
import logging
import logging.handlers
import os
import re
import socket
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


# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and the lone
# surrogates that stand for undecodable bytes of a name (they cannot even be written out)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """``text`` with every control character as a ``\\xNN`` (or ``\\uNNNN``) escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


class RedactingFilter(logging.Filter):
    """Formats the record once, redacts it, escapes its control characters, and freezes the
    result into ``msg`` (a traceback keeps its line breaks, each line escaped and indented)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not leak args either
            message = str(record.msg)
        record.msg = escape_controls(redact(message))
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # indented, so no line of it (an exception text may quote a name) passes for a
            # record of its own
            text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_text = "\n".join("  | " + escape_controls(line)
                                         for line in text.split("\n"))
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
def open_log_file(path: Path) -> int:
    """Open (create mode 0600) ``path`` for appending; the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def syslog_available(address: str = "/dev/log") -> bool:
    """Whether a syslog daemon (or journald) listens on ``address``."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as s:
                s.connect(address)
                return True
        except OSError:
            continue
    return False


def setup_logging(level: str = "INFO", log_file: Path | None = None,
                  foreground: bool = True) -> None:
    """stderr in the foreground (with priorities when it is the journal), a file or syslog
    otherwise."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file is not None:
        os.close(open_log_file(log_file))
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    elif foreground or not syslog_available():
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
