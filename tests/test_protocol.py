"""Hostile and malformed socket input: an error reply or a disconnect, never a dead daemon."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.disk.scan import scan
from ckptd.wire import protocol
from tests.conftest import DaemonProc
from trainer_hooks import Checkpointer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("fuzz")).start()
    try:
        yield d
    finally:
        d.stop()


def exchange(path: str, raw: bytes, fds: list[int] | None = None) -> list[dict[str, Any]]:
    """Send raw bytes; collect replies until the daemon closes or goes quiet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    s.connect(path)
    replies: list[dict[str, Any]] = []
    try:
        if fds:
            socket.send_fds(s, [raw[:1]], fds)
            raw = raw[1:]
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        while True:
            msg, got = protocol.recv(s)
            protocol.close_fds(got)
            replies.append(msg)
    except (EOFError, socket.timeout, ConnectionResetError, BrokenPipeError, protocol.ProtocolError):
        pass
    finally:
        s.close()
    return replies


def frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def test_specific_hostile_messages(shared_daemon: DaemonProc, tmp_path: Path) -> None:
    path = shared_daemon.socket
    cases = {
        "oversized length": struct.pack(">I", 2**31) + b"{}",
        "just over 1 MiB": frame({"type": "status", "pad": "x" * (1 << 20)}),
        "not json": struct.pack(">I", 5) + b"nope!",
        "not an object": frame([1, 2, 3]),
        "no type": frame({"job": "x"}),
        "unknown type": frame({"type": "rm -rf"}),
        "wrong field type": frame({"type": "hello", "job": 5, "directory": "/", "settings": {}, "pid": 1, "step": 0}),
        "bool as int": frame({"type": "hello", "job": "j", "directory": "/", "settings": {}, "pid": True, "step": 0}),
        "negative step": frame({"type": "heartbeat", "step": -1}),
        "save before hello": frame(
            {
                "type": "save",
                "id": 1,
                "step": 1,
                "trigger": "step",
                "rule": "r",
                "filename": "x.safetensors",
                "length": 10,
            }
        ),
        "truncated": frame({"type": "status"})[:-2],
    }
    for name, raw in cases.items():
        replies = exchange(path, raw)
        assert all(r.get("type") in ("error", "reply") for r in replies), (name, replies)
        assert shared_daemon.healthy(), name


def test_fds_that_are_not_memfds_are_refused(shared_daemon: DaemonProc) -> None:
    run = shared_daemon.root / "fd"
    run.mkdir()
    hello = frame({"type": "hello", "job": "fdjob", "directory": str(run), "settings": {}, "pid": 1, "step": 0})
    save = frame(
        {"type": "save", "id": 1, "step": 1, "trigger": "step", "rule": "r", "filename": "x.safetensors", "length": 4}
    )
    regular = os.open("/etc/hostname", os.O_RDONLY)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(shared_daemon.socket)
        s.sendall(hello)
        assert protocol.recv(s)[0]["type"] == "welcome"
        socket.send_fds(s, [save[:1]], [regular])
        s.sendall(save[1:])
        reply, _ = protocol.recv(s)
        assert reply["type"] == "error" and "memfd" in reply["error"]
        with pytest.raises((EOFError, ConnectionResetError)):
            protocol.recv(s)
        s.close()
    finally:
        os.close(regular)
    assert shared_daemon.healthy()


def test_a_snapshot_that_lies_about_its_contents_is_refused(shared_daemon: DaemonProc) -> None:
    run = shared_daemon.root / "liar"
    run.mkdir()
    fd = protocol.snapshot_memfd("liar")
    os.write(fd, struct.pack("<Q", 2**60) + b"garbage")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(shared_daemon.socket)
        protocol.send(s, {"type": "hello", "job": "liar", "directory": str(run), "settings": {}, "pid": 1, "step": 0})
        assert protocol.recv(s)[0]["type"] == "welcome"
        protocol.send(
            s,
            {
                "type": "save",
                "id": 7,
                "step": 1,
                "trigger": "step",
                "rule": "r",
                "filename": "liar-step1.safetensors",
                "length": 15,
            },
            fd=fd,
        )
        assert protocol.recv(s)[0]["type"] == "accepted"
        saved, _ = protocol.recv(s)
        assert saved["type"] == "saved" and saved["ok"] is False and saved["reason"] == "invalid_snapshot"
    finally:
        s.close()
        os.close(fd)
    assert os.listdir(run) == []
    assert shared_daemon.metric("ckptd_save_failures_total", training_job="liar", reason="invalid_snapshot") == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: frame(v)),
    st.fixed_dictionaries(
        {"type": st.sampled_from(sorted(protocol.SCHEMAS) + ["bogus"])},
        optional={
            "job": json_values,
            "directory": json_values,
            "settings": json_values,
            "pid": json_values,
            "step": json_values,
            "id": json_values,
            "length": json_values,
            "filename": json_values,
            "path": json_values,
        },
    ).map(frame),
)


@settings(
    max_examples=100_000 if os.environ.get("CKPTD_SOAK") == "1" else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(messages, min_size=1, max_size=3))
def test_fuzzed_messages_never_hurt_the_daemon(shared_daemon: DaemonProc, msgs: list[bytes]) -> None:
    replies = exchange(shared_daemon.socket, b"".join(msgs))
    assert all(isinstance(r, dict) for r in replies)


def test_a_good_client_carries_on_through_the_fuzzing(shared_daemon: DaemonProc) -> None:
    run = shared_daemon.root / "good"
    ckpt = Checkpointer("good", run, model=torch.nn.Linear(8, 8), every_steps=1, socket=shared_daemon.socket)
    try:
        assert ckpt.mode == "daemon"
        for _ in range(20):
            exchange(shared_daemon.socket, struct.pack(">I", 3) + b"{{{")
            ckpt.step()
        ckpt.wait()
    finally:
        ckpt.close()
    assert ckpt.stats["verified"] == 20 and ckpt.stats["failed"] == 0
    assert len(scan(str(run), "good")) == 20
    assert shared_daemon.healthy()
