"""Every field of a message the daemon reads is typed and checked (issue 37): a required one
missing or of the wrong type, and an optional one present with the wrong type, are refused
with an error naming the message and the field; unknown fields are ignored."""

from __future__ import annotations

from typing import Any

import pytest

from ckptd.wire.protocol import OPTIONAL, SCHEMAS, ProtocolError, validate

SAVE: dict[str, Any] = {
    "type": "save",
    "id": 1,
    "step": 10,
    "trigger": "step",
    "rule": "every_steps",
    "filename": "a",
    "length": 8,
    "epoch": 0.5,
    "stall": 0.01,
    "cost": 0.02,
    "memory_only": False,
}
COMMITTED: dict[str, Any] = {
    "type": "committed",
    "step": 10,
    "path": "/r/u",
    "trigger": "step",
    "ok": False,
    "reason": "uncommitted",
    "error": None,
    "stall": 0.0,
    "persist": 0.1,
}
HELLO: dict[str, Any] = {
    "type": "hello",
    "job": "j",
    "directory": "/r",
    "settings": {},
    "pid": 7,
    "step": 0,
    "version": "3.0",
    "template": None,
    "rank": 0,
    "world_size": 2,
    "sharded": True,
    "state_bytes": None,
}


@pytest.mark.parametrize(
    "msg",
    [
        SAVE,
        COMMITTED,
        HELLO,
        {"type": "gc", "job": None, "dry_run": True},
        {"type": "heartbeat", "step": 3, "epoch": None},
        {"type": "list", "job": "j"},
    ],
)
def test_what_the_hook_and_the_cli_send_is_accepted(msg: dict[str, Any]) -> None:
    assert validate(dict(msg)) == msg


@pytest.mark.parametrize(
    ("msg", "key", "bad"),
    [
        (SAVE, "memory_only", "yes"),
        (SAVE, "stall", True),
        (SAVE, "cost", "1"),
        (SAVE, "epoch", [1]),
        (COMMITTED, "ok", 1),
        (COMMITTED, "error", 3),
        (COMMITTED, "reason", None),
        (HELLO, "world_size", 2.0),
        (HELLO, "sharded", 1),
        (HELLO, "version", None),
        (HELLO, "template", 5),
        ({"type": "gc"}, "dry_run", "no"),
        ({"type": "heartbeat", "step": 1}, "epoch", "1"),
    ],
)
def test_an_optional_field_of_the_wrong_type_is_named(msg: dict[str, Any], key: str, bad: Any) -> None:
    with pytest.raises(ProtocolError, match=f"{msg['type']}: field '{key}' must be"):
        validate({**msg, key: bad})


@pytest.mark.parametrize(
    ("msg", "key"),
    [(SAVE, "length"), (SAVE, "stall"), (SAVE, "cost"), (HELLO, "rank"), (HELLO, "state_bytes"), (COMMITTED, "step")],
)
def test_counts_and_durations_are_never_negative(msg: dict[str, Any], key: str) -> None:
    with pytest.raises(ProtocolError, match=f"field '{key}' must not be negative"):
        validate({**msg, key: -1})


def test_a_required_field_missing_is_named_and_unknown_fields_are_ignored() -> None:
    with pytest.raises(ProtocolError, match="save: field 'filename' must be str"):
        validate({k: v for k, v in SAVE.items() if k != "filename"})
    assert validate({**SAVE, "from_a_newer_hook": object()})["step"] == 10
    assert set(OPTIONAL) <= set(SCHEMAS)
