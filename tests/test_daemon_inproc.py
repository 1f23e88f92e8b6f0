"""The daemon's logic with the daemon in this process and a client without torch: milliseconds.

Each path here also has a real-process test (test_daemon.py, test_protocol.py, test_security.py).
"""

from __future__ import annotations

import os
import struct

from ckptd.store.verify import verify_file
from tests.wire_client import Client, snapshot


def hello(c: Client, job: str, directory: str) -> dict:  # type: ignore[type-arg]
    return c.ask({"type": "hello", "job": job, "directory": directory, "settings": {"keep_last": 2}, "pid": os.getpid(),
                  "step": 0})


def test_save_lifecycle_in_process(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    run = os.path.join(inproc_daemon.roots[0], "fast")
    os.mkdir(run)
    c = Client(inproc_daemon.socket_path)
    try:
        assert hello(c, "fast", run)["type"] == "welcome"
        for step in (1, 2, 3):
            fd, length = snapshot("fast", step, {"w": struct.pack("<4f", step, 2, 3, 4)})
            try:
                assert c.ask({"type": "save", "id": step, "step": step, "trigger": "step", "rule": "r",
                              "filename": f"fast-step{step}.safetensors", "length": length}, fd=fd)["type"] == "accepted"
                saved = c.recv()
            finally:
                os.close(fd)
            assert saved["ok"] is True, saved
        assert sorted(os.listdir(run)) == ["fast-step2.safetensors", "fast-step3.safetensors"]  # keep_last=2
        assert verify_file(os.path.join(run, "fast-step3.safetensors")).ok
        labels = {"training_job": "fast", "directory": run, "trigger": "step", "outcome": "ok"}
        assert inproc_daemon.metrics.registry.get_sample_value("ckptd_saves_total", labels) == 3
    finally:
        c.close()


def test_a_snapshot_for_another_job_is_refused_before_it_is_written(inproc_daemon) -> None:  # type: ignore[no-untyped-def]
    run = os.path.join(inproc_daemon.roots[0], "liar")
    os.mkdir(run)
    c = Client(inproc_daemon.socket_path)
    try:
        hello(c, "liar", run)
        fd, length = snapshot("victim", 7, {"w": b"\0" * 16})
        try:
            c.ask({"type": "save", "id": 1, "step": 7, "trigger": "step", "rule": "r",
                   "filename": "liar-step7.safetensors", "length": length}, fd=fd)
            saved = c.recv()
        finally:
            os.close(fd)
        assert saved["ok"] is False and saved["reason"] == "invalid_snapshot"
        assert os.listdir(run) == []
    finally:
        c.close()
