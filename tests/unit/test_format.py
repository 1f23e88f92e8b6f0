"""The checkpoint format's pure checks: unserialisable state, alignment, header gaps, bad snapshots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckptd.core.format import FormatError, encode_header, layout, parse_header
from ckptd.disk.persist import PersistError, persist
from trainer_hooks._state.state import StateError, flatten


def test_unserialisable_state_names_the_path() -> None:
    with pytest.raises(StateError, match="extra/callback"):
        flatten({"extra": {"callback": object()}})
    with pytest.raises(StateError, match="dict key"):
        flatten({"extra": {(1, 2): 3}})


def test_layout_aligns_every_tensor() -> None:
    entries = layout([("a", "U8", (3,)), ("b", "F64", (2,)), ("c", "F32", (1,)), ("d", "BF16", (3,))])
    for e in entries:
        assert e.begin % {"U8": 1, "F64": 8, "F32": 4, "BF16": 2}[e.dtype] == 0
    header = encode_header(entries, {})
    assert len(header) % 8 == 0


def test_parse_header_rejects_gaps_and_wrong_sizes() -> None:
    entries = layout([("a", "F32", (2,))])
    raw = encode_header(entries, {})
    with pytest.raises(FormatError, match="truncated"):
        parse_header(raw[8:], len(raw) - 8, len(raw) + 4)
    bad = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    with pytest.raises(FormatError, match="needs 12"):
        parse_header(bad, len(bad), 8 + len(bad) + 8)


def test_persist_rejects_a_bad_snapshot(tmp_path: Path) -> None:
    fd = os.memfd_create("bad")
    try:
        os.write(fd, (2**63).to_bytes(8, "little") + b"{}")
        with pytest.raises(PersistError) as err:
            persist(fd, 10, str(tmp_path), "x.safetensors")
        assert err.value.reason == "invalid_snapshot"
        assert os.listdir(tmp_path) == []
    finally:
        os.close(fd)
