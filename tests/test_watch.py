"""Watch mode: foreign formats recognised and verified safely, and a real `ckptd watch`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

from ckptd.foreign import formats as foreign
from tests.conftest import PYTHON, ROOT, ckptd_cli, free_port, project_env, wait_until
from tests.helpers import small_checkpoint


class Evil:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.sentinel}",))


def test_torch_zip_crc_corruption_is_caught(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, p)
    found = foreign.classify(str(p))
    assert found is not None and found.kind == "torch" and foreign.verify(found).ok
    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    data = bytearray(p.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF  # inside the tensor bytes
    p.write_bytes(bytes(data))
    r = foreign.verify(found)
    assert not r.ok and "CRC-32 mismatch" in r.reason


def test_a_malicious_pickle_is_flagged_and_never_executed(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil(str(sentinel))}, p)
    r = foreign.verify(foreign.classify(str(p)))  # type: ignore[arg-type]
    assert not r.ok and r.reason.startswith("unsafe") and "system" in r.reason
    assert not sentinel.exists()


def test_numpy_rng_state_files_load_weights_only(tmp_path: Path) -> None:
    import numpy as np

    p = tmp_path / "rng_state.pth"
    torch.save({"numpy": np.random.get_state(), "cpu": torch.get_rng_state()}, p)
    assert foreign.verify(foreign.classify(str(p))).ok  # type: ignore[arg-type]


def test_sharded_safetensors_completeness(tmp_path: Path) -> None:
    save_file({"a": torch.ones(10)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    found = foreign.classify(str(index))
    assert found is not None and found.kind == "safetensors-sharded"
    assert foreign.classify(str(tmp_path / "model-00001-of-00002.safetensors")) is None  # judged with its index
    assert "does not exist yet" in (foreign.incomplete(found) or "")
    half = tmp_path / "model-00002-of-00002.safetensors"
    save_file({"b": torch.ones(1000)}, str(half))
    half.write_bytes(half.read_bytes()[:-100])  # still being written
    assert "size does not match" in (foreign.incomplete(found) or "")
    save_file({"b": torch.ones(1000)}, str(half))
    assert foreign.incomplete(found) is None and foreign.verify(found).ok


def test_hf_directory_markers_and_contents(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint-500"
    ck.mkdir()
    save_file({"w": torch.ones(3)}, str(ck / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    (ck / "checkpoint-is-incomplete.txt").write_text("")
    found = foreign.classify(str(ck))
    assert found is not None and found.kind == "hf" and found.step == 500
    assert "incomplete" in (foreign.incomplete(found) or "")
    (ck / "checkpoint-is-incomplete.txt").unlink()
    assert foreign.incomplete(found) is None and foreign.verify(found).ok
    (ck / "trainer_state.json").write_text("{broken")
    assert "trainer_state.json" in foreign.verify(found).reason
    assert foreign.classify(str(ck / "model.safetensors")) is None  # the directory is the unit


def test_dcp_directory(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp-step7"
    dcp.save({"w": torch.ones(8), "b": torch.zeros(2)}, checkpoint_id=str(d), no_dist=True)
    found = foreign.classify(str(d))
    assert found is not None and found.kind == "dcp" and found.step == 7
    assert foreign.incomplete(found) is None and foreign.verify(found).ok
    shard = next(p for p in d.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    assert "missing" in foreign.verify(found).reason
    (d / ".metadata").unlink()
    assert ".metadata" in (foreign.incomplete(found) or "")


def test_lightning_and_onetrainer_names(tmp_path: Path) -> None:
    p = tmp_path / "epoch=3-step=1200.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "global_step": 1200}, p)
    found = foreign.classify(str(p))
    assert found is not None and found.kind == "lightning" and found.step == 1200 and foreign.verify(found).ok
    save = tmp_path / "workspace" / "save"
    save.mkdir(parents=True)
    ot = save / "2026-11-22_05-00-00-save-1500-3-100.pt"
    torch.save({"w": torch.ones(1)}, ot)
    assert foreign.classify(str(ot)) is not None


# --- a real `ckptd watch` --------------------------------------------------------------------


@pytest.fixture
def watcher(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str, int]]:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    port = free_port()
    sock = str(tmp_path / "w.sock")
    log = open(tmp_path / "watch.log", "wb")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "ckptd.cli",
            "watch",
            str(tree),
            "--job",
            "ext",
            "--settle",
            "0.5s",
            "--rescan-every",
            "2s",
            "--keep-last",
            "2",
            "--expect-every",
            "4s",
            "--abandon-after",
            "3s",
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--socket",
            sock,
            "--state-dir",
            str(tmp_path / "state"),
            *getattr(request, "param", []),
        ],
        env=project_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: os.path.exists(sock), 30, "ckptd watch to start")
        yield tree, sock, port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def listed(sock: str) -> dict[str, dict]:
    r = ckptd_cli("list", "ext", "--json", "--socket", sock)
    return {Path(x["path"]).name: x for x in json.loads(r.stdout)} if r.returncode == 0 else {}


def metric(port: int, name: str, **labels: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.mark.slow
# abandon_after well past the paused write below: the fixture's 3 s is one slow `ckptd list` away
# from judging the half-written file as abandoned (CI did, rightly), which is not what this asks
@pytest.mark.parametrize("watcher", [["--abandon-after", "60s"]], indirect=True, ids=["slow-writer"])
def test_watch_adopts_verifies_retains_and_alerts(watcher: tuple[Path, str, int], tmp_path: Path) -> None:
    tree, sock, port = watcher
    sentinel = tmp_path / "SENTINEL"
    # a file written slowly is not judged until it is complete (settle is 0.5 s: it is not the wait)
    slow = tree / "model-step100.safetensors"
    save_file({"w": torch.ones(100000)}, str(tmp_path / "full.safetensors"))
    full = (tmp_path / "full.safetensors").read_bytes()
    with open(slow, "wb") as f:
        f.write(full[: len(full) // 2])
        f.flush()
        time.sleep(2.0)
        assert "model-step100.safetensors" not in listed(sock)
        f.write(full[len(full) // 2 :])
    wait_until(lambda: listed(sock).get("model-step100.safetensors", {}).get("verified"), 20, "adoption")
    assert metric(port, "ckptd_verify_total", training_job="ext", outcome="corrupt") == 0
    # ours, a move from outside (a move event), and a malicious pickle
    small_checkpoint(tree, "ours-step200.safetensors", step=200)
    staged = tmp_path / "model-step300.pt"
    torch.save({"w": torch.ones(3)}, staged)
    shutil.move(str(staged), tree / "model-step300.pt")
    torch.save({"x": Evil(str(sentinel))}, tree / "evil.pt")
    wait_until(
        lambda: metric(port, "ckptd_verify_total", training_job="ext", outcome="unsafe") == 1, 20, "the evil pickle"
    )
    wait_until(lambda: not (tree / "model-step100.safetensors").exists(), 20, "keep_last=2 to delete the oldest")
    names = set(os.listdir(tree))
    assert {"ours-step200.safetensors", "model-step300.pt", "evil.pt"} <= names  # unsafe is kept, never run
    assert not sentinel.exists()
    # the deletion is recorded once its unlink has returned: wait for the count, not for the file alone
    wait_until(
        lambda: metric(port, "ckptd_deleted_total", training_job="ext", rule="retention") == 1,
        20,
        "the deletion to be counted",
    )
    # no new checkpoint for expect_every: missed, time_overdue (at least once: under load the gap
    # before the first adoption, or between two, can be past 4 s too, and each such gap is one)
    wait_until(
        lambda: metric(port, "ckptd_missed_saves_total", training_job="ext", reason="time_overdue") >= 1, 20, "overdue"
    )


@pytest.mark.slow
def test_hf_best_model_checkpoint_is_never_deleted(watcher: tuple[Path, str, int]) -> None:
    tree, sock, port = watcher
    run = tree / "hf"
    run.mkdir()
    for step in (10, 20, 30, 40):
        ck = run / f"checkpoint-{step}"
        ck.mkdir()
        save_file({"w": torch.ones(3) * step}, str(ck / "model.safetensors"))
        (ck / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "best_model_checkpoint": str(run / "checkpoint-10")})
        )
        time.sleep(0.7)
    wait_until(lambda: not (run / "checkpoint-20").exists(), 30, "checkpoint-20 to go (keep_last=2)")
    assert (run / "checkpoint-10").exists(), "the trainer's best_model_checkpoint was deleted"
    assert (run / "checkpoint-30").exists() and (run / "checkpoint-40").exists()


@pytest.fixture
def pre_existing(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    for i in range(30):
        torch.save({"w": torch.ones(2) * i}, tree / "a" / "b" / f"model-step{i}.pt")
    (tree / "a" / "bad-step99.pt").write_bytes(b"PK\x03\x04 this is no zip")
    return tree


@pytest.mark.slow
@pytest.mark.parametrize("watcher", [[], ["--on-corrupt", "delete"]], indirect=True, ids=["keep", "delete"])
def test_startup_scan_adopts_an_existing_tree(
    pre_existing: Path, watcher: tuple[Path, str, int], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tree, sock, port = watcher
    wait_until(
        lambda: metric(port, "ckptd_verify_total", training_job="ext", outcome="ok") == 30, 60, "the startup scan"
    )
    wait_until(
        lambda: metric(port, "ckptd_verify_total", training_job="ext", outcome="corrupt") == 1,
        30,
        "the incomplete file judged once it stays incomplete with no writes for abandon_after",
    )
    # ...and not before: incomplete is not corrupt (the log says it was held, then judged; a metric read
    # between the two would race abandon_after's 3 s on a loaded machine)
    assert "bad-step99.pt has been incomplete for" in (tmp_path / "watch.log").read_text()
    wait_until(lambda: len(list((tree / "a" / "b").iterdir())) == 2, 30, "keep_last=2 over the adopted tree")
    if "delete" in request.node.callspec.id:  # on_corrupt = "delete": it goes
        wait_until(lambda: not (tree / "a" / "bad-step99.pt").exists(), 10, "the corrupt file to be removed")
    else:  # the default: a damaged foreign checkpoint may be the only one left; kept, and alerted on
        time.sleep(1.5)
        assert (tree / "a" / "bad-step99.pt").exists(), "a corrupt foreign checkpoint was deleted by default"
        assert metric(port, "ckptd_deleted_total", training_job="ext", rule="corrupt") == 0


# --- real trainers writing into a watched directory -------------------------------------------


@pytest.mark.slow
def test_a_real_hf_trainer_under_watch(watcher: tuple[Path, str, int]) -> None:
    tree, sock, port = watcher
    pytest.importorskip("transformers")
    r = subprocess.run(
        [PYTHON, str(ROOT / "tests" / "scripts" / "hf_train.py"), str(tree / "hf"), "25"],
        capture_output=True,
        text=True,
        timeout=600,
        env=project_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]  # load_best_model_at_end read its best checkpoint back: not deleted
    best = Path(r.stdout.split("BEST ", 1)[1].split()[0]).name
    wait_until(lambda: metric(port, "ckptd_verify_total", training_job="ext", outcome="ok") >= 5, 60, "all 5 verified")
    assert metric(port, "ckptd_verify_total", training_job="ext", outcome="corrupt") == 0
    wait_until(lambda: len(list((tree / "hf").glob("checkpoint-*"))) <= 3, 30, "retention")
    left = sorted(p.name for p in (tree / "hf").glob("checkpoint-*"))
    assert {"checkpoint-20", "checkpoint-25", best} <= set(left), left


@pytest.mark.slow
def test_a_real_lightning_model_checkpoint_under_watch(watcher: tuple[Path, str, int]) -> None:
    tree, sock, port = watcher
    pytest.importorskip("lightning")
    r = subprocess.run(
        [PYTHON, str(ROOT / "tests" / "scripts" / "lightning_train.py"), str(tree / "pl"), "30"],
        capture_output=True,
        text=True,
        timeout=600,
        env=project_env(),
    )
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr[-3000:]
    wait_until(lambda: metric(port, "ckptd_verify_total", training_job="ext", outcome="ok") >= 6, 60, "all 6 verified")
    assert metric(port, "ckptd_verify_total", training_job="ext", outcome="unsafe") == 0
    wait_until(
        lambda: (
            sorted(p.name for p in (tree / "pl").glob("*.ckpt")) == ["epoch=0-step=25.ckpt", "epoch=0-step=30.ckpt"]
        ),
        30,
        "keep_last=2 over Lightning's files",
    )


@pytest.mark.slow
def test_many_roots_and_a_root_that_disappears_and_comes_back(tmp_path: Path) -> None:
    base = tmp_path / "d"
    from tests.conftest import DaemonProc

    d = DaemonProc(base)
    roots = [d.root / f"w{i}" for i in range(3)]
    d.config.write_text(
        d.config.read_text()
        + "".join(
            f'[[watch]]\npath = "{r}"\njob = "w{i}"\nsettle = "0.3s"\nrescan_every = "1s"\n'
            for i, r in enumerate(roots)
        )
    )
    d.start()
    try:
        for i, r in enumerate(roots):
            torch.save({"w": torch.ones(2)}, r / f"m-step{i + 1}.pt")
        for i in range(3):
            wait_until(
                lambda i=i: d.metric("ckptd_verify_total", training_job=f"w{i}", outcome="ok") == 1, 20, f"root {i}"
            )
        shutil.rmtree(roots[1])
        time.sleep(2.5)  # a rescan notices
        assert d.healthy()
        roots[1].mkdir()
        time.sleep(2.5)  # a rescan notices it is back and watches it again
        torch.save({"w": torch.ones(2)}, roots[1] / "m-step9.pt")
        wait_until(
            lambda: d.metric("ckptd_verify_total", training_job="w1", outcome="ok") == 2, 20, "the root that came back"
        )
        listed = json.loads(ckptd_cli("list", "w1", "--json", "--socket", d.socket).stdout)
        assert [Path(x["path"]).name for x in listed] == ["m-step9.pt"]
    finally:
        d.stop()


@pytest.mark.slow
def test_rot_in_an_adopted_hf_checkpoint_is_found_by_scrub(tmp_path: Path) -> None:
    """safetensors stores no digests, so a flipped byte in an HF model file verifies "ok";
    the digests watch mode takes at adoption catch it at the next scrub."""
    from tests.conftest import DaemonProc

    tree = tmp_path / "d" / "roots" / "hf"
    d = DaemonProc(tmp_path / "d", f'scrub_every = "1s"\n[[watch]]\npath = "{tree}"\njob = "hf"\nsettle = "0.2s"\n')
    ck = tree / "checkpoint-10"
    ck.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(ck / "model.safetensors"))
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    d.start()
    try:
        wait_until(lambda: d.metric("ckptd_verify_total", training_job="hf", outcome="ok") >= 1, 30, "adoption")
        model = ck / "model.safetensors"
        st = model.stat()
        data = bytearray(model.read_bytes())
        data[-7] ^= 0x10  # one bit of one float: the file still parses and loads
        model.write_bytes(bytes(data))
        os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # rot does not touch the mtime
        assert foreign.verify(foreign.classify(str(ck))).ok  # the format alone cannot tell
        wait_until(
            lambda: d.metric("ckptd_verify_total", training_job="hf", outcome="corrupt") >= 1,
            30,
            "the scrub to find it",
        )
        assert "changed since it was adopted" in d.log.read_text()
    finally:
        d.stop()
