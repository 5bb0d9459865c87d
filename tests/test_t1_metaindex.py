"""Layer 1: the metadata index file on its own (s3ssefs.metaindex), no server.

An entry comes back only for the object as the listing showed it when it was kept; a file
that was cut short, scribbled on, has entries swapped, or was sealed with another key file
gives nothing back (and is replaced), never a wrong answer; the size bound holds.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import assert_no_key_material, new_key

from s3ssefs.keys import KeyFile
from s3ssefs.metaindex import Entry, MetaIndex, index_path

SCOPE = "https://s3.example\0bucket\0prefix/"


def keyfile(*ids: str) -> KeyFile:
    kf = KeyFile.generate("x")
    kf.keys.clear()
    for i in ids:
        kf.keys[i] = new_key(i)
    kf.current = ids[0]
    return kf


def entry(i: int) -> Entry:
    t = 1_700_000_000 + i
    return Entry(f'"{i:032x}"', 100 + i, t + 0.25, float(t), "k1", None,
                 {"mode": "33188", "uid": str(i), "gid": "7", "mtime": str(t)})


def name(i: int) -> str:
    """Object ``i``'s key: a hundred objects per directory."""
    return f"d{i // 100:02d}/f{i:05d}"


def shown(i: int) -> tuple[str, str, int, float]:
    """How a listing shows object ``i`` unchanged."""
    e = entry(i)
    return (name(i), e.etag, e.size, e.listed_mtime)


def run(fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return await fn()
    return trio.run(main)


def fill(path: Path, kf: KeyFile, n: int, bound: int = 1 << 30) -> None:
    idx = MetaIndex(path, kf, SCOPE, bound)

    async def go() -> None:
        for i in range(n):
            if idx.note(name(i), entry(i)):
                await idx.flush()
        await idx.flush()
    run(go)
    idx.close()


def lookup(path: Path, kf: KeyFile, items: list[tuple[str, str, int, float]],
           bound: int = 1 << 30) -> dict[str, Entry]:
    idx = MetaIndex(path, kf, SCOPE, bound)
    try:
        return run(lambda: idx.lookup(items))  # type: ignore[no-any-return]
    finally:
        idx.close()


def test_an_entry_is_used_only_for_the_object_as_it_was_listed(tmp_path: Path) -> None:
    kf = keyfile("k1")
    path = index_path(tmp_path, SCOPE)
    fill(path, kf, 50)
    got = lookup(path, kf, [shown(i) for i in range(60)])
    assert got == {name(i): entry(i) for i in range(50)}
    key, etag, size, mtime = shown(3)
    assert lookup(path, kf, [(key, '"other"', size, mtime), (key, etag, size + 1, mtime),
                             (key, etag, size, mtime + 0.001), ("d00/f3", etag, size, mtime),
                             ("other/f00003", etag, size, mtime)]) == {}
    # another bucket (or prefix) cannot read this one's entries
    idx = MetaIndex(path, kf, SCOPE + "x", 1 << 30)
    try:
        assert run(lambda: idx.lookup([shown(3)])) == {}
    finally:
        idx.close()
    data = b"".join(p.read_bytes() for p in path.parent.iterdir())
    assert b"f00003" not in data and b"33188" not in data  # names hashed, entries sealed
    assert_no_key_material(data, str(path))


@pytest.mark.parametrize("other", ["same id, other key", "key gone"])
def test_an_index_sealed_with_another_key_file_is_discarded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, other: str) -> None:
    path = index_path(tmp_path, SCOPE)
    fill(path, keyfile("k1"), 20)
    kf = keyfile("k1") if other == "same id, other key" else keyfile("k2")
    with caplog.at_level(logging.INFO, "s3ssefs.metaindex"):
        assert lookup(path, kf, [shown(i) for i in range(20)]) == {}
    assert "discarded" in caplog.text
    fill(path, kf, 5)  # the new index works with the new key file
    assert len(lookup(path, kf, [shown(i) for i in range(20)])) == 5


@pytest.mark.parametrize("damage", ["truncated", "garbled", "swapped", "headless", "emptied"])
def test_a_damaged_index_gives_nothing_wrong(tmp_path: Path, damage: str) -> None:
    kf = keyfile("k1")
    path = index_path(tmp_path, SCOPE)
    fill(path, kf, 300)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2 + 123])
    elif damage == "garbled":
        data = bytearray(path.read_bytes())
        for i in range(4096, len(data), 61):
            data[i] ^= 0xA5
        path.write_bytes(data)
    elif damage == "swapped":  # sealed entries exchanged between two objects
        db = sqlite3.connect(path)
        (a, va), (b, vb) = db.execute("SELECT id, sealed FROM entries LIMIT 2").fetchall()
        db.execute("UPDATE entries SET sealed=? WHERE id=?", (vb, a))
        db.execute("UPDATE entries SET sealed=? WHERE id=?", (va, b))
        db.commit()
        db.close()
    elif damage == "headless":  # what says which key sealed it is gone
        db = sqlite3.connect(path)
        db.execute("DELETE FROM meta WHERE name='key_id'")
        db.commit()
        db.close()
    else:
        path.write_bytes(b"")
    got = lookup(path, kf, [shown(i) for i in range(300)])
    assert all(e == entry(int(k[-5:])) for k, e in got.items())
    if damage != "garbled":  # scribbles may miss every entry; these cannot
        assert got == {}
    fill(path, kf, 10)  # whatever was left is usable again
    assert len(lookup(path, kf, [shown(i) for i in range(10)])) == 10


def test_the_index_stays_within_its_bound_and_keeps_what_was_used(tmp_path: Path) -> None:
    kf = keyfile("k1")
    path = index_path(tmp_path, SCOPE)
    bound = 256 << 10
    fill(path, kf, 500, bound)
    # a later session lists the first directory (its 100 entries): they outlive those of
    # directories never read again
    assert len(lookup(path, kf, [shown(i) for i in range(100)], bound)) == 100
    idx = MetaIndex(path, kf, SCOPE, bound)

    async def more() -> None:
        for i in range(500, 5000):
            if idx.note(name(i), entry(i)):
                await idx.flush()
        await idx.flush()
    run(more)
    idx.close()
    assert path.stat().st_size <= bound * 1.25
    got = lookup(path, kf, [shown(i) for i in range(5000)], bound)
    assert 0 < len(got) < 5000
    assert all(name(i) in got for i in range(4900, 5000))  # the newest
    assert not any(name(i) in got for i in range(100, 500))  # never used again
