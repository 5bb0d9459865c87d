"""Layer 1: the key file, with no S3 at all.

The key file guards the data: a bad one must be refused with one clear line, never half-used,
never rewritten, and never echo a key.  These tests pin each refusal, the lookup order of
DESIGN §3, atomic saving and the s3fs-fuse import, and fuzz the loader with hypothesis.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3ssefs.keys import Key, KeyFile, KeyFileError, MapEntry, sse_c_params

log = logging.getLogger(__name__)

RAW = [bytes([i]) * 16 + os.urandom(16) for i in range(1, 5)]
B64 = [base64.b64encode(r).decode() for r in RAW]


def _write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return path


def _valid_text(**over: str) -> str:
    parts = {
        "version": "version = 1\n",
        "current": 'current = "b"\n',
        "keys": f'[keys]\na = "{B64[0]}"\nb = "{B64[1]}"\n',
        "map": '[[map]]\npath = "x/y.pdf"\nversion = "v1"\nkey = "a"\n',
    }
    parts.update(over)
    return "".join(parts.values())


def _secrets_in(text: str, kf: KeyFile | None = None) -> list[str]:
    """Every encoding of any key that must never show up in ``text``."""
    raws = list(RAW) + ([k.raw for k in kf.keys.values()] if kf else [])
    found = []
    for raw in raws:
        for form in (
            base64.b64encode(raw).decode(),
            raw.hex(),
            repr(raw),
            raw.decode("latin-1"),
        ):
            if form in text:
                found.append(form)
    return found


# -- round trip ---------------------------------------------------------------------------------


def test_generate_save_load_round_trip(tmp_path: Path) -> None:
    kf = KeyFile.generate("k1")
    assert kf.current == "k1" and len(kf.current_key.raw) == 32
    kf.add(RAW[0], "old")
    kf.add_map("reports/q3.pdf", "v1", "old")
    kf.add_map("reports/q3.pdf", None, "old")
    path = tmp_path / "keys.toml"
    kf.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kf.path == path
    back = KeyFile.load(path)
    assert back.path == path
    assert back.version == 1
    assert back.current == "k1"
    assert list(back.keys) == ["k1", "old"]
    assert back.keys == kf.keys
    assert (
        back.map
        == kf.map
        == [
            MapEntry("reports/q3.pdf", "v1", "old"),
            MapEntry("reports/q3.pdf", None, "old"),
        ]
    )
    assert back.to_toml() == kf.to_toml()
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temp file left over


def test_generate_default_id_is_today() -> None:
    import datetime

    kf = KeyFile.generate()
    assert kf.current == datetime.date.today().isoformat()
    assert KeyFile.generate().current_key.raw != kf.current_key.raw


def test_fingerprint_is_what_s3_echoes() -> None:
    key = Key("a", RAW[0])
    assert key.fingerprint == base64.b64encode(hashlib.md5(RAW[0]).digest()).decode()


def test_sse_c_params() -> None:
    key = Key("a", RAW[0])
    assert sse_c_params(None) == {}
    assert sse_c_params(None, copy_source=True) == {}
    assert sse_c_params(key) == {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": RAW[0]}
    assert sse_c_params(key, copy_source=True) == {
        "CopySourceSSECustomerAlgorithm": "AES256",
        "CopySourceSSECustomerKey": RAW[0],
    }


def test_add_set_current_and_map(tmp_path: Path) -> None:
    kf = KeyFile.generate("first")
    k = kf.add(RAW[0])
    assert k.id not in ("first",) and kf.current == "first"
    k2 = kf.add(RAW[1])
    assert k2.id != k.id  # default ids never collide
    kf.add(RAW[2], "new", make_current=True)
    assert kf.current == "new" and list(kf.keys)[-1] == "new"
    with pytest.raises(KeyFileError, match="32 bytes, got 31"):
        kf.add(RAW[3][:31])
    with pytest.raises(KeyFileError, match="already in the key file"):
        kf.add(RAW[3], "new")
    with pytest.raises(KeyFileError, match="already in the key file as 'new'"):
        kf.add(RAW[2], "again")
    kf.set_current("first")
    with pytest.raises(KeyFileError, match="no key 'zz'"):
        kf.set_current("zz")
    kf.add_map("p", None, "new")
    kf.add_map("p", None, "first")  # replaces
    assert kf.map == [MapEntry("p", None, "first")]
    with pytest.raises(KeyFileError, match="no key 'zz'"):
        kf.add_map("p", "v", "zz")
    assert kf.by_id("new") is kf.keys["new"]
    assert kf.by_id("zz") is None
    assert kf.by_fingerprint(kf.keys["new"].fingerprint) is kf.keys["new"]
    assert kf.by_fingerprint("nope") is None


# -- refusals -------------------------------------------------------------------------------------


def _mode(mode: int) -> Callable[[Path], Path]:
    return lambda p: _write(p, _valid_text(), mode)


def _text(text: str) -> Callable[[Path], Path]:
    return lambda p: _write(p, text)


def _chown(p: Path) -> Path:
    _write(p, _valid_text())
    os.chown(p, 65534, 65534)
    return p


def _symlink(p: Path) -> Path:
    real = _write(p.with_name("real.toml"), _valid_text())
    p.symlink_to(real)
    return p


MALFORMED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "mode 0644": (_mode(0o644), "mode 0644, which lets others read it; run: chmod 600"),
    "mode 0640": (_mode(0o640), "has mode 0640"),
    "wrong owner": (_chown, "owned by uid 65534"),
    "bad toml": (_text("version = 1\ncurrent = \n"), "not valid TOML at line 2, column"),
    "version 2": (_text(_valid_text(version="version = 2\n")), "version 2 is not supported"),
    "version missing": (_text(_valid_text(version="")), "missing 'version = 1'"),
    "version bool": (_text(_valid_text(version="version = true\n")), "True is not supported"),
    "key not base64": (
        _text(_valid_text(keys=f'[keys]\na = "{B64[0]}"\nb = "@@not base64@@"\n')),
        "key 'b' is not valid base64",
    ),
    "key 31 bytes": (
        _text(
            _valid_text(
                keys=f'[keys]\na = "{B64[0]}"\nb = "{base64.b64encode(RAW[1][:31]).decode()}"\n'
            )
        ),
        "key 'b' decodes to 31 bytes",
    ),
    "key 33 bytes": (
        _text(
            _valid_text(
                keys=f'[keys]\na = "{B64[0]}"\nb = "{base64.b64encode(RAW[1] + b"x").decode()}"\n'
            )
        ),
        "key 'b' decodes to 33 bytes",
    ),
    "duplicate fingerprints": (
        _text(_valid_text(keys=f'[keys]\na = "{B64[0]}"\nb = "{B64[0]}"\n')),
        "keys 'a' and 'b' are the same key",
    ),
    "duplicate ids": (
        _text(_valid_text(keys=f'[keys]\na = "{B64[0]}"\nb = "{B64[1]}"\na = "{B64[2]}"\n')),
        "defined twice at line 6",
    ),
    "no keys": (_text(_valid_text(keys="[keys]\n", map="")), "no keys"),
    "current names no key": (
        _text(_valid_text(current='current = "zz"\n')),
        "current = 'zz' names no key",
    ),
    "current missing": (_text(_valid_text(current="")), "missing 'current"),
    "map names no key": (
        _text(_valid_text(map='[[map]]\npath = "x"\nkey = "zz"\n')),
        "names key 'zz', which is not in [keys]",
    ),
    "map without path": (
        _text(_valid_text(map='[[map]]\nversion = "v"\nkey = "a"\n')),
        "[[map]] entry 1 needs 'path'",
    ),
    "map without key": (_text(_valid_text(map='[[map]]\npath = "x"\n')), "needs 'key'"),
    "map version not string": (
        _text(_valid_text(map='[[map]]\npath = "x"\nversion = 3\nkey = "a"\n')),
        "'version' must be a non-empty string",
    ),
    "map unknown field": (
        _text(_valid_text(map='[[map]]\npath = "x"\nversoin = "v"\nkey = "a"\n')),
        "unknown field(s) 'versoin'",
    ),
    "unknown top-level field": (
        _text("extra = 1\n" + _valid_text()),
        "unknown field(s) 'extra'",
    ),
    "empty key id": (
        _text(_valid_text(keys=f'[keys]\n"" = "{B64[0]}"\nb = "{B64[1]}"\n')),
        "key id must not be empty",
    ),
    "not utf-8": (lambda p: _write(p, b"version = 1\n\xff\xfe"), "not UTF-8"),
    "symlink": (_symlink, "is a symlink"),
    "missing file": (lambda p: p, "does not exist"),
    "directory": (lambda p: (p.mkdir(mode=0o700), p)[1], "not a regular file"),
}


def _snapshot(path: Path) -> tuple[bytes, int, int] | None:
    if not path.exists() or path.is_dir():
        return None
    st_ = os.lstat(path)
    return path.read_bytes(), st_.st_mode, st_.st_uid


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_key_file_refused(tmp_path: Path, case: str) -> None:
    make, fragment = MALFORMED[case]
    path = make(tmp_path / "keys.toml")
    before = _snapshot(path)
    with pytest.raises(KeyFileError) as info:
        KeyFile.load(path)
    msg = str(info.value)
    assert fragment in msg
    assert str(path) in msg
    assert "\n" not in msg
    assert not _secrets_in(msg)
    # no chained exception carries file content into a traceback
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert _snapshot(path) == before
    # every case is told apart by its own fragment
    others = [f for c, (_, f) in MALFORMED.items() if c != case]
    assert not any(f in msg for f in others if f not in fragment), msg


def test_root_owned_file_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "k.toml", _valid_text())
    os.chown(path, 0, 0)
    assert KeyFile.load(path).current == "b"


def test_mode_0400_is_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path / "k.toml", _valid_text(), 0o400)
    assert KeyFile.load(path).current == "b"


# -- lookup order ---------------------------------------------------------------------------------


def test_candidate_order_all_tiers_and_dedup() -> None:
    keys = {i: Key(i, RAW[n]) for n, i in enumerate(["k1", "k2", "k3", "k4"])}
    extra = Key("k5", os.urandom(32))
    keys["k5"] = extra
    kf = KeyFile(keys, current="k3")
    kf.add_map("a.txt", "v1", "k1")
    kf.add_map("a.txt", None, "k2")
    ids = lambda ks: [k.id for k in ks]  # noqa: E731

    # all five tiers: exact version, path, learned, current, the rest newest first
    assert ids(kf.candidates("a.txt", "v1", learned="k4")) == ["k1", "k2", "k4", "k3", "k5"]
    # another version of a mapped path skips the exact tier
    assert ids(kf.candidates("a.txt", "v2", learned="k4")) == ["k2", "k4", "k3", "k5", "k1"]
    # unmapped path: learned, current, newest first
    assert ids(kf.candidates("b.txt", learned="k1")) == ["k1", "k3", "k5", "k4", "k2"]
    assert ids(kf.candidates("b.txt")) == ["k3", "k5", "k4", "k2", "k1"]
    # duplicates collapse to the first place: map, learned and current all say k3
    kf.add_map("c.txt", "v", "k3")
    kf.add_map("c.txt", None, "k3")
    assert ids(kf.candidates("c.txt", "v", learned="k3")) == ["k3", "k5", "k4", "k2", "k1"]
    # a learned id that no longer exists is skipped
    assert ids(kf.candidates("b.txt", learned="gone")) == ["k3", "k5", "k4", "k2", "k1"]
    for cands in (kf.candidates("a.txt", "v1", "k4"), kf.candidates("zzz")):
        assert len(cands) == len(set(ids(cands))) == len(kf.keys)


# -- secrecy --------------------------------------------------------------------------------------


def test_repr_str_and_errors_hold_no_key_material(tmp_path: Path) -> None:
    kf = KeyFile({f"k{i}": Key(f"k{i}", r) for i, r in enumerate(RAW)}, current="k0")
    kf.add_map("p", None, "k1")
    texts = [repr(kf), str(kf), repr(kf.keys), str(list(kf.keys.values())), repr(kf.map)]
    for key in kf.keys.values():
        texts += [repr(key), str(key), f"{key}", f"{key!r}", str([key]), str({"k": key})]
        assert repr(key) == f"Key(id={key.id!r}, fingerprint={key.fingerprint!r})"
    errors: list[str] = []
    for attempt in (
        lambda: kf.add(RAW[0], "dup"),
        lambda: kf.add(RAW[0][:31]),
        lambda: kf.add(RAW[0] + b"!"),
        lambda: Key("x", RAW[1][:5]),
    ):
        with pytest.raises(KeyFileError) as info:
            attempt()
        errors.append(str(info.value))
    for make, _ in MALFORMED.values():
        path = tmp_path / f"f{len(errors)}" / "keys.toml"
        path.parent.mkdir()
        make(path)
        with pytest.raises(KeyFileError) as info:
            KeyFile.load(path)
        errors.append(str(info.value))
    # the TOML error for a bad character inside a key value must not quote the character
    path = _write(
        tmp_path / "ctl.toml", f'version = 1\n[keys]\na = "{B64[0][:10]}\x01{B64[0][11:]}"\n'
    )
    with pytest.raises(KeyFileError) as info:
        KeyFile.load(path)
    errors.append(str(info.value))
    assert "\\x01" not in errors[-1]
    for text in texts + errors:
        assert not _secrets_in(text, kf), text
    for msg in errors:
        assert "\n" not in msg


# -- atomic save ----------------------------------------------------------------------------------


def test_failed_validation_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    kf = KeyFile.generate("a")
    kf.save(path)
    before = path.read_bytes()
    kf.add(RAW[0], "b")
    kf.current = "nope"  # made invalid behind the API's back
    with pytest.raises(KeyFileError, match="not saved: current = 'nope' names no key"):
        kf.save()
    kf.current = "a"
    kf.keys["c"] = Key("c", RAW[0])  # same key twice under two ids
    with pytest.raises(KeyFileError, match="not saved: keys 'b' and 'c' are the same key"):
        kf.save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.toml"]
    assert KeyFile.load(path).current == "a"


def test_save_replaces_atomically_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    KeyFile.generate("a").save(path)
    inode = path.stat().st_ino
    kf = KeyFile.load(path)
    kf.add(RAW[0], "b", make_current=True)
    old_umask = os.umask(0o000)
    try:
        kf.save()
    finally:
        os.umask(old_umask)
    assert path.stat().st_ino != inode  # a new file renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyFile.load(path).current == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.toml"]


def test_save_without_path() -> None:
    with pytest.raises(KeyFileError, match="no path"):
        KeyFile.generate("a").save()


def test_to_toml_is_plain_toml() -> None:
    import tomllib

    kf = KeyFile.generate("new")
    kf.add(RAW[0], "old")
    kf.add_map("a b/c.txt", "v1", "old")
    doc = tomllib.loads(kf.to_toml())
    assert doc["version"] == 1 and doc["current"] == "new"
    assert doc["keys"]["old"] == B64[0]
    assert doc["map"] == [{"path": "a b/c.txt", "version": "v1", "key": "old"}]


# -- s3fs-fuse import -----------------------------------------------------------------------------


@pytest.mark.allow_warnings
def test_import_s3fs_first_key_is_current(tmp_path: Path) -> None:
    raw_text_key = b"0123456789abcdef0123456789ABCDEF"  # s3fs: <= 32 chars is the key itself
    src = _write(
        tmp_path / "sse.keys",
        b"# s3fs keys\n\n  " + B64[0].encode() + b"  \r\n" + raw_text_key + b"\n" + B64[0].encode(),
    )
    kf = KeyFile.import_s3fs(src)
    assert kf.current == "s3fs-1"
    assert kf.current_key.raw == RAW[0]
    assert kf.keys["s3fs-2"].raw == raw_text_key
    assert len(kf.keys) == 2  # the repeated key is skipped
    # fallback order is s3fs's own order: first key first
    assert [k.id for k in kf.candidates("x")] == ["s3fs-1", "s3fs-2"]
    out = tmp_path / "keys.toml"
    kf.save(out)
    assert KeyFile.load(out).keys == kf.keys


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\n# only a comment\n", "holds no key"),
        (b"# c\nshort\n", "line 2: a raw key must be exactly 32 characters"),
        (b"!" * 40 + b"\n", "line 1: neither a 32-character key nor valid base64"),
        (base64.b64encode(b"y" * 40) + b"\n", "line 1: base64 of 40 bytes"),
    ],
)
def test_import_s3fs_errors_name_the_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    src = _write(tmp_path / "sse.keys", content)
    with pytest.raises(KeyFileError, match=fragment) as info:
        KeyFile.import_s3fs(src)
    assert "short" not in str(info.value) and "!!!!" not in str(info.value)


def test_import_s3fs_refuses_loose_mode(tmp_path: Path) -> None:
    src = _write(tmp_path / "sse.keys", B64[0], 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyFile.import_s3fs(src)


# -- fuzzing --------------------------------------------------------------------------------------

_toml_scalar = st.one_of(
    st.integers(-3, 3),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from([*B64, "", "a", "b", "zz", base64.b64encode(b"q" * 31).decode()]),
)
_field_names = st.sampled_from(["version", "current", "keys", "map", "path", "key", "a", "b", ""])
_toml_value = st.recursive(
    _toml_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.dictionaries(_field_names, inner, max_size=4), max_size=3),
        st.dictionaries(_field_names, inner, max_size=4),
    ),
    max_leaves=12,
)
_toml_doc = st.dictionaries(_field_names, _toml_value, max_size=5).map(tomli_w.dumps)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300), _toml_doc))
def test_any_content_loads_or_raises_keyfileerror(tmp_path: Path, content: bytes | str) -> None:
    path = _write(tmp_path / "fuzz.toml", content)
    try:
        kf = KeyFile.load(path)
    except KeyFileError as e:
        assert "\n" not in str(e)
        return
    assert kf.current in kf.keys
    assert all(len(k.raw) == 32 for k in kf.keys.values())
    assert all(e.key in kf.keys for e in kf.map)
    kf.save(tmp_path / "again.toml")
    assert KeyFile.load(tmp_path / "again.toml").keys == kf.keys


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    current=st.sampled_from(["a", "b", "zz"]),
    keys=st.dictionaries(st.sampled_from(["a", "b", "c", ""]), st.sampled_from([*B64[:3], "x"])),
    entries=st.lists(
        st.fixed_dictionaries(
            {"path": st.sampled_from(["p", ""]), "key": st.sampled_from(["a", "zz"])},
            optional={"version": st.one_of(st.text(max_size=3), st.integers())},
        ),
        max_size=3,
    ),
)
def test_structured_documents_load_or_raise(
    tmp_path: Path, current: str, keys: dict[str, str], entries: list[dict[str, object]]
) -> None:
    doc: dict[str, object] = {"version": 1, "current": current, "keys": keys, "map": entries}
    path = _write(tmp_path / "s.toml", tomli_w.dumps(doc))
    try:
        kf = KeyFile.load(path)
    except KeyFileError as e:
        assert "\n" not in str(e) and not _secrets_in(str(e))
        return
    assert kf.current == current and set(kf.keys) == set(keys)


# -- valid documents, and every way to spoil one ---------------------------------------------------
# Random bytes almost never make a key file, so the fuzzing above mostly checks refusals.  Here
# hypothesis builds valid key files (ids, 32-byte keys, current, a map), which must load as
# written and survive load -> save -> load unchanged; then spoils each one in one place, which
# must be refused with one line that holds no key.

_printable = st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" ")
_ids = st.text(_printable, min_size=1, max_size=20).filter(lambda s: bool(s.strip()))
# 32 bytes that look random (a real key does; a run of one byte could pass for a path)
_raw_keys = st.binary(max_size=8).map(lambda b: hashlib.sha256(b).digest())
_paths = st.text(min_size=1, max_size=30)  # any string: the TOML writer escapes it
_versions = st.one_of(st.none(), st.text(min_size=1, max_size=12))


@st.composite
def _valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A key file as a TOML document (a dict), valid by construction."""
    ids = draw(st.lists(_ids, min_size=1, max_size=4, unique=True))
    raws = draw(st.lists(_raw_keys, min_size=len(ids), max_size=len(ids), unique=True))
    doc: dict[str, Any] = {"version": 1, "current": draw(st.sampled_from(ids)),
                           "keys": {i: base64.b64encode(r).decode() for i, r in zip(ids, raws,
                                                                                  strict=True)}}
    entries = draw(st.lists(st.tuples(_paths, _versions, st.sampled_from(ids)), max_size=4,
                            unique_by=lambda e: (e[0], e[1])))
    if entries or draw(st.booleans()):
        doc["map"] = [{"path": p, **({"version": v} if v is not None else {}), "key": k}
                      for p, v, k in entries]
    return doc


def _raws(doc: dict[str, Any]) -> list[bytes]:
    keys = doc.get("keys")
    out = []
    for v in (keys.values() if isinstance(keys, dict) else []):
        with contextlib.suppress(TypeError, ValueError):
            out.append(base64.b64decode(v, validate=True))
    return out


def _key_in(text: str, raws: list[bytes]) -> bool:
    return any(form in text for raw in raws
               for form in (base64.b64encode(raw).decode(), raw.hex(), repr(raw),
                            raw.decode("latin-1")))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_valid_docs())
def test_a_valid_key_file_loads_as_written_and_saves_back_the_same(
        tmp_path: Path, doc: dict[str, Any]) -> None:
    path = _write(tmp_path / "valid.toml", tomli_w.dumps(doc))
    kf = KeyFile.load(path)
    assert kf.current == doc["current"]
    assert {i: k.raw for i, k in kf.keys.items()} == \
        {i: base64.b64decode(v) for i, v in doc["keys"].items()}
    assert list(kf.keys) == list(doc["keys"])  # file order is age order
    assert sorted(kf.map, key=repr) == sorted(
        (MapEntry(e["path"], e.get("version"), e["key"]) for e in doc.get("map", [])), key=repr)
    kf.save(tmp_path / "again.toml")
    again = KeyFile.load(tmp_path / "again.toml")
    assert (again.current, again.keys, sorted(again.map, key=repr)) == \
        (kf.current, kf.keys, sorted(kf.map, key=repr))
    assert again.to_toml() == kf.to_toml()
    assert not _key_in(repr(again), _raws(doc))


def _spoil(doc: dict[str, Any], how: str, data: st.DataObject) -> dict[str, Any] | str:
    """``doc`` spoilt in one place: a document, or TOML text for faults a dict cannot hold."""
    d = copy.deepcopy(doc)
    ids = list(d["keys"])
    some_id = data.draw(st.sampled_from(ids))
    if how.startswith("drop "):
        del d[how[5:]]
    elif how == "version 2":
        d["version"] = 2
    elif how == "version as text":
        d["version"] = "1"
    elif how == "current not text":
        d["current"] = 1
    elif how == "keys not a table":
        d["keys"] = list(d["keys"].values())
    elif how == "no keys":
        d["keys"] = {}
    elif how == "key not text":
        d["keys"][some_id] = 12345
    elif how == "bad base64":
        d["keys"][some_id] = d["keys"][some_id][:-2] + "!="
    elif how == "short key":
        d["keys"][some_id] = base64.b64encode(data.draw(st.binary(max_size=31))).decode()
    elif how == "long key":
        d["keys"][some_id] = base64.b64encode(data.draw(st.binary(min_size=33, max_size=64))
                                              ).decode()
    elif how == "same key twice":
        d["keys"][data.draw(_ids.filter(lambda i: i not in ids))] = d["keys"][some_id]
    elif how == "blank id":
        d["keys"][data.draw(st.sampled_from(["", " ", "\t"]))] = base64.b64encode(
            os.urandom(32)).decode()
    elif how == "unknown field":
        d[data.draw(st.sampled_from(["versoin", "Current", "key", "maps", "x"]))] = 1
    elif how == "dangling current":
        d["current"] = data.draw(_ids.filter(lambda i: i not in ids))
    elif how == "map not a list":
        d["map"] = {"path": "p", "key": some_id}
    elif how.startswith("map "):  # spoil the map: add an entry if there is none
        entries = d.setdefault("map", [])
        if not entries:
            entries.append({"path": "p", "key": some_id})
        e = entries[data.draw(st.integers(0, len(entries) - 1))]
        if how == "map entry not a table":
            entries[entries.index(e)] = "p"
        elif how == "map unknown field":
            e[data.draw(st.sampled_from(["Path", "versions", "id", "keys"]))] = "v"
        elif how == "map drop path":
            del e["path"]
        elif how == "map empty path":
            e["path"] = ""
        elif how == "map path not text":
            e["path"] = 7
        elif how == "map empty version":
            e["version"] = ""
        elif how == "map version not text":
            e["version"] = 3
        elif how == "map drop key":
            del e["key"]
        elif how == "map dangling key":
            e["key"] = data.draw(_ids.filter(lambda i: i not in ids))
        elif how == "map duplicate":
            entries.append(dict(e))
        else:
            raise AssertionError(how)
    if how == "id twice in the text":  # TOML itself refuses a repeated table key
        text = tomli_w.dumps(d)
        line = next(ln for ln in text.splitlines() if ln.endswith(f'= "{d["keys"][some_id]}"'))
        return text.replace(line, f"{line}\n{line}", 1)
    if how == "cut short":
        text = tomli_w.dumps(d)
        cut = text.index(d["keys"][some_id]) + data.draw(st.integers(1, 40))
        return text[:cut]
    return d


SPOILS = ["drop version", "drop current", "drop keys", "version 2", "version as text",
          "current not text", "keys not a table", "no keys", "key not text", "bad base64",
          "short key", "long key", "same key twice", "blank id", "unknown field",
          "dangling current", "map not a list", "map entry not a table", "map unknown field",
          "map drop path", "map empty path", "map path not text", "map empty version",
          "map version not text", "map drop key", "map dangling key", "map duplicate",
          "id twice in the text", "cut short"]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_valid_docs(), how=st.sampled_from(SPOILS), data=st.data())
def test_every_spoilt_key_file_is_refused_in_one_line_without_its_keys(
        tmp_path: Path, doc: dict[str, Any], how: str, data: st.DataObject) -> None:
    spoilt = _spoil(doc, how, data)
    text = spoilt if isinstance(spoilt, str) else tomli_w.dumps(spoilt)
    path = _write(tmp_path / "spoilt.toml", text)
    with pytest.raises(KeyFileError) as info:
        KeyFile.load(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"key file {path}: "), msg
    assert not _key_in(msg, _raws(doc)), f"{how}: key material in {msg!r}"
