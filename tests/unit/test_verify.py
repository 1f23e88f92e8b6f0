"""Verification against damaged files, in-process: every corruption is caught, none crashes."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ckptd.core.format import FormatError, parse_header, read_header  # noqa: E402
from ckptd.disk.verify import verify_file
from tests.helpers import small_checkpoint


@pytest.fixture
def good(tmp_path: Path) -> str:
    return small_checkpoint(tmp_path)


def damaged(good: str, tmp_path: Path, name: str, edit) -> str:  # type: ignore[no-untyped-def]
    data = bytearray(Path(good).read_bytes())
    out = tmp_path / name
    out.write_bytes(bytes(edit(data)))
    return str(out)


def test_good_file_verifies(good: str) -> None:
    from safetensors import safe_open

    with safe_open(good, framework="pt") as f:  # what the file really holds (CUDA adds an RNG state)
        names = list(f.keys())
    r = verify_file(good)
    assert r.ok and r.tensors == len(names) and r.reason == ""
    assert sum(n.startswith("model/") for n in names) == 4 and any("rng" in n for n in names)


def test_truncation_at_20_random_offsets(good: str, tmp_path: Path) -> None:
    size = os.path.getsize(good)
    rng = random.Random(42)
    offsets = sorted(rng.sample(range(0, size), 20))
    for off in offsets:
        p = damaged(good, tmp_path, f"trunc{off}.safetensors", lambda d: d[:off])
        r = verify_file(p)
        assert not r.ok, off
        assert any(w in r.reason for w in ("truncated", "too short", "past the end", "not valid JSON")), (off, r.reason)


def test_single_byte_flips_in_data_are_caught(good: str, tmp_path: Path) -> None:
    with open(good, "rb") as f:
        start = read_header(f, os.path.getsize(good)).data_start
    size = os.path.getsize(good)
    rng = random.Random(7)
    for i in range(30):
        off = rng.randrange(start, size)
        bit = 1 << rng.randrange(8)
        p = damaged(good, tmp_path, f"flip{i}.safetensors", lambda d: d.__setitem__(off, d[off] ^ bit) or d)
        r = verify_file(p)
        assert not r.ok and "digest mismatch" in r.reason, (off, r.reason)


def test_single_byte_flips_in_header_are_caught(good: str, tmp_path: Path) -> None:
    with open(good, "rb") as f:
        end = read_header(f, os.path.getsize(good)).data_start
    rng = random.Random(9)
    for i in range(100):
        off = rng.randrange(0, end)
        bit = 1 << rng.randrange(8)
        p = damaged(good, tmp_path, f"hflip{i}.safetensors", lambda d: d.__setitem__(off, d[off] ^ bit) or d)
        r = verify_file(p)
        assert not r.ok and r.reason, (off, bit)


def test_zero_length_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    r = verify_file(p)
    assert not r.ok and "too short" in r.reason


def test_header_length_2_pow_63(good: str, tmp_path: Path) -> None:
    p = damaged(good, tmp_path, "huge.safetensors", lambda d: struct.pack("<Q", 2**63) + d[8:])
    r = verify_file(p)
    assert not r.ok and "exceeds" in r.reason


def _rewrite_header(good: str, tmp_path: Path, name: str, change) -> str:  # type: ignore[no-untyped-def]
    data = Path(good).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    doc = json.loads(data[8 : 8 + n])
    change(doc)
    raw = json.dumps(doc).encode()
    raw += b" " * (-len(raw) % 8)
    out = tmp_path / name
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return str(out)


def test_overlapping_offsets(good: str, tmp_path: Path) -> None:
    def overlap(doc: dict) -> None:
        names = sorted((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])
        a, b = doc[names[0]], doc[names[1]]
        shift = a["data_offsets"][1] - b["data_offsets"][0] + 4
        b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]
        assert shift

    r = verify_file(_rewrite_header(good, tmp_path, "overlap.safetensors", overlap))
    assert not r.ok and ("overlaps" in r.reason or "gap" in r.reason or "bytes" in r.reason)


def test_offsets_past_the_end(good: str, tmp_path: Path) -> None:
    def past(doc: dict) -> None:
        last = max((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][1])
        b, e = doc[last]["data_offsets"]
        doc[last]["data_offsets"] = [b, e + 10**12]

    r = verify_file(_rewrite_header(good, tmp_path, "past.safetensors", past))
    assert not r.ok and r.reason


def test_missing_digest_and_garbage_metadata(good: str, tmp_path: Path) -> None:
    def drop(doc: dict) -> None:
        doc["__metadata__"]["ckptd.digests"] = "{}"

    r = verify_file(_rewrite_header(good, tmp_path, "nodigest.safetensors", drop))
    assert not r.ok and "no digest" in r.reason

    def garbage(doc: dict) -> None:
        doc["__metadata__"]["ckptd.digests"] = "{not json"

    r = verify_file(_rewrite_header(good, tmp_path, "garbage.safetensors", garbage))
    assert not r.ok and "not valid JSON" in r.reason


def test_appended_garbage(good: str, tmp_path: Path) -> None:
    r = verify_file(damaged(good, tmp_path, "tail.safetensors", lambda d: d + b"garbage"))
    assert not r.ok and "trailing" in r.reason


def test_a_flipped_bit_in_the_format_key_does_not_make_the_file_foreign(good: str, tmp_path: Path) -> None:
    """Found by the 10,000-corruption soak: "ckptd.format" -> "ckptd.fovmat" once passed as a
    foreign safetensors file, whose digests nobody checks."""
    data = Path(good).read_bytes()
    i = data.index(b"ckptd.format") + len("ckptd.fo")
    p = damaged(good, tmp_path, "fovmat.safetensors", lambda d: d.__setitem__(i, d[i] ^ 0x04) or d)
    assert b"ckptd.fovmat" in Path(p).read_bytes()
    r = verify_file(p)
    assert not r.ok and "ckptd.format" in r.reason


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=12),
    lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=8), k, max_size=4),
    max_leaves=20,
)


_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "BOOL", "F8_E4M3", "X9", 7]) | _json,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-5, 2**50), min_size=0, max_size=3) | _json,
    }
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(_json, st.dictionaries(st.text(max_size=10), _entry, max_size=5)), st.integers(0, 2**20))
@example({"": {"dtype": []}}, 0)  # found by this test in CI: an unhashable dtype raised TypeError
@example({"t": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}, 0)
@example({"t": {"dtype": "F32", "shape": {"a": 1}, "data_offsets": {"b": 2}}}, 0)
def test_parse_header_never_fails_except_with_a_format_error(doc: object, file_size: int) -> None:
    import json as _j

    raw = _j.dumps(doc).encode()
    try:
        h = parse_header(raw, len(raw), max(file_size, 8 + len(raw)))
    except FormatError as exc:
        assert str(exc)
    else:
        assert h.data_start + h.data_len == max(file_size, 8 + len(raw))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_verify_never_raises_on_random_files(tmp_path_factory, data: bytes) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path_factory.mktemp("rnd") / "r.safetensors"
    p.write_bytes(data)
    r = verify_file(p)
    assert r.ok is False or r.tensors >= 0
