"""T1: a recoverable spill and its journal, without a server.

A spill made with a key file's key must be readable by a later process that holds the key file
(and no one else), whole or not at all; a spill another process holds is never taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_no_key_material, new_key

from s3ssefs.crypto import CorruptBlock, LocalCipher
from s3ssefs.spill import Spill, sweep

BS = 4096


def test_journal_reopens_with_the_key_only(tmp_path: Path) -> None:
    key, other = new_key("a"), new_key("b")
    spill = Spill(tmp_path, LocalCipher(), BS, key=key)
    spill.write_block(0, b"x" * BS)
    spill.write_block(3, b"tail")
    spill.write_journal({"s3key": "dir/f", "size": 3 * BS + 4})
    spill.release()  # the process ends without uploading
    journal = spill.journal_path
    for p in tmp_path.iterdir():
        assert_no_key_material(p.read_bytes(), str(p))
        assert b"dir/f" not in p.read_bytes()  # names are sealed too
    with pytest.raises(LookupError):
        Spill.reopen(journal, {other.fingerprint: other}.get)
    again, info = Spill.reopen(journal, {key.fingerprint: key}.get)
    assert info["s3key"] == "dir/f" and info["blocks"] == [0, 3]
    assert again.read_block(0) == b"x" * BS and again.read_block(3) == b"tail"
    assert again.read_block(1) is None
    again.close()
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_journal_does_not_open(tmp_path: Path) -> None:
    key = new_key("a")
    spill = Spill(tmp_path, LocalCipher(), BS, key=key)
    spill.write_block(0, b"data")
    spill.write_journal({"s3key": "f"})
    spill.release()
    raw = bytearray(spill.journal_path.read_bytes())
    raw[-1] ^= 1
    spill.journal_path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlock):
        Spill.reopen(spill.journal_path, {key.fingerprint: key}.get)


def test_a_spill_in_use_is_neither_taken_nor_swept(tmp_path: Path) -> None:
    key = new_key("a")
    held = Spill(tmp_path, LocalCipher(), BS, key=key)
    held.write_block(0, b"held")
    held.write_journal({"s3key": "f"})
    loose = Spill(tmp_path, LocalCipher(), BS)  # no journal: owes nothing
    loose.write_block(0, b"loose")
    # another process looks at the directory while both are open here
    code = ("import sys; from pathlib import Path; from s3ssefs.spill import Spill, sweep\n"
            "sweep(Path(sys.argv[1]))\n"
            "try:\n    Spill.reopen(Path(sys.argv[2]), lambda fp: object())\n"
            "except BlockingIOError:\n    print('busy')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(held.journal_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "busy", r.stderr
    assert held.path.exists() and loose.path.exists()
    loose.release()  # its process ended: nothing is owed, the next sweep removes it
    held.release()
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [held.path.name, held.journal_path.name])
    os.stat(held.journal_path)
