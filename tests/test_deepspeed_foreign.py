"""DeepSpeed's own checkpoints as foreign units: ``global_stepN/`` (and an HF ``checkpoint-N/``
holding one) verified, listed, named by ``latest`` and retained as one unit each.

The tags are real: DeepSpeed 0.19 on CPU (gloo, 2 ranks under torchrun) writes them once per
module, ZeRO-2 and ZeRO-3 through ``engine.save_checkpoint`` and HF Trainer + DeepSpeed ZeRO-2
through its own ``checkpoint-N/``; each test damages a copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import PYTHON, ROOT, ckptd_cli, free_port, project_env, run_py, wait_until

pytest.importorskip("deepspeed")

TORCHRUN = str(Path(PYTHON).parent / "torchrun")
DS_ENV = project_env(DS_ACCELERATOR="cpu", CKPTD_SOCKET="/nonexistent/ckptd.sock", OMP_NUM_THREADS="1")
# one worker for the module (its fixture is shared); a module fixture runs three 2-rank DeepSpeed
# jobs at once, which on a loaded 2-CPU machine can take longer than the suite's 300 s default
pytestmark = [pytest.mark.xdist_group("deepspeed"), pytest.mark.slow, pytest.mark.timeout(900)]


def torchrun(*args: str) -> list[str]:
    return [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", *args]


@pytest.fixture(scope="module")
def tags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ZeRO-2 and ZeRO-3 tags at steps 4, 8, 12 and an HF Trainer + ZeRO-2 output with
    checkpoint-4/8/12, each written by DeepSpeed itself (the three runs at once)."""
    root = tmp_path_factory.mktemp("ds-foreign")
    script = str(ROOT / "examples" / "deepspeed_train.py")
    runs = {
        "zero2": torchrun(script, "--dir", str(root / "zero2"), "--stage", "2", "--native", "4", "--steps", "12"),
        "zero3": torchrun(script, "--dir", str(root / "zero3"), "--stage", "3", "--native", "4", "--steps", "12"),
        "hf": torchrun(str(ROOT / "tests" / "scripts" / "hf_ds_train.py"), str(root / "hf"), "12", "--native"),
    }
    procs = {
        k: subprocess.Popen(v, env=DS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, v in runs.items()
    }
    for k, p in procs.items():
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{k}: {out[-3000:]}"
    return {k: root / k for k in runs}


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return ckptd_cli("verify", *map(str, paths), timeout=300)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# -- healthy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_healthy_tags_are_units_with_the_step_of_their_tag(tags: dict[str, Path], stage: str) -> None:
    d = tags[stage]
    r = verify(d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["ok"] * 3
    assert "UNSAFE" not in r.stdout
    listing = json.loads(ckptd_cli("list", str(d), "--json").stdout)
    assert [(Path(c["path"]).name, c["step"], c["trigger"]) for c in listing] == [
        (f"global_step{s}", s, "deepspeed") for s in (4, 8, 12)
    ]
    assert ckptd_cli("latest", str(d)).stdout.strip() == str(d / "global_step12")


def test_deepspeed_objects_load_as_inert_data_without_deepspeed(tags: dict[str, Path]) -> None:
    """The loss scaler and ZeRO stage enum are read, but DeepSpeed is never imported to read them."""
    shard = tags["zero2"] / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    code = (
        "import sys; from ckptd.foreign.picklesafe import safe_load, verify_torch\n"
        f"r = verify_torch({str(shard)!r}); o = safe_load({str(shard)!r})['optimizer_state_dict']\n"
        "print(r.ok, r.tensors, type(o['loss_scaler']).__mro__[1].__name__, o['loss_scaler'].state,"
        " o['zero_stage'].args, 'deepspeed' in sys.modules)"
    )
    out = run_py("-c", code, env={"DS_ACCELERATOR": "cpu"}).stdout.split(" ", 3)
    assert out[0] == "True" and int(out[1]) > 0
    assert out[2] == "Inert" and "cur_scale" in out[3] and "(2,)" in out[3]
    assert out[3].rstrip().endswith("False")  # deepspeed not imported


def test_a_deepspeed_name_cannot_smuggle_a_call(tmp_path: Path) -> None:
    """A file that rebuilds "DeepSpeed's LossScaler" with os.system's argument runs nothing: the name
    maps to an inert record; a global outside the allowlist is still refused as unsafe."""
    import torch

    sentinel = tmp_path / "RAN"

    class Fake:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {sentinel}",))

    for module, name, expect in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler", "ok"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine", "UNSAFE"),
    ):
        path = tmp_path / f"{name}.pt"
        torch.save({"w": torch.ones(2), "x": Fake()}, path)
        _rename_global(path, b"posix\nsystem", f"{module}\n{name}".encode())
        r = verify(path)
        assert r.stdout.split()[0] == expect, r.stdout
        assert not sentinel.exists()


def _rename_global(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite the GLOBAL opcode of a torch zip's pickle (CRCs recomputed: only the name differs)."""
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            z.writestr(info, data)
    path.write_bytes(buf.getvalue())


# -- damaged ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_truncated_shard_fails_and_latest_takes_the_tag_before(
    tags: dict[str, Path], tmp_path: Path, stage: str
) -> None:
    d = copy(tags[stage], tmp_path)
    truncate(d / "global_step12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    r = verify(d / "global_step12")
    assert r.returncode == 1
    assert r.stdout.startswith("CORRUPT") and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in r.stdout
    r = ckptd_cli("latest", str(d))
    assert r.returncode == 0 and r.stdout.strip() == str(d / "global_step8")
    assert "latest names this tag" in r.stderr  # DeepSpeed's own latest file points at the bad one


@pytest.mark.parametrize(
    "stage,victim",
    [("zero2", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), ("zero3", "zero_pp_rank_1_mp_rank_00_model_states.pt")],
)
def test_a_missing_rank_is_incomplete(tags: dict[str, Path], tmp_path: Path, stage: str, victim: str) -> None:
    d = copy(tags[stage], tmp_path)
    (d / "global_step12" / victim).unlink()
    r = verify(d)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "ok", "CORRUPT"]
    assert "1 rank file(s) missing" in lines[2] and victim in lines[2] and "2 ranks" in lines[2]
    assert ckptd_cli("latest", str(d)).stdout.strip() == str(d / "global_step8")


# -- HF Trainer + DeepSpeed: checkpoint-N/ holding global_stepN/ ---------------------------------


def test_hf_checkpoint_with_deepspeed_state_is_verified_whole(tags: dict[str, Path], tmp_path: Path) -> None:
    d = copy(tags["hf"], tmp_path)
    ckpts = [d / f"checkpoint-{s}" for s in (4, 8, 12)]
    assert all((c / f"global_step{s}").is_dir() for c, s in zip(ckpts, (4, 8, 12)))
    r = verify(d)
    assert r.returncode == 0, r.stdout
    truncate(ckpts[2] / "global_step12" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    r = verify(ckpts[2])
    assert r.returncode == 1 and "global_step12/zero_pp_rank_0_mp_rank_00_optim_states.pt" in r.stdout
    assert ckptd_cli("latest", str(d)).stdout.strip() == str(ckpts[1])
    (ckpts[1] / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    r = verify(ckpts[1])
    assert r.returncode == 1 and "rank file(s) missing" in r.stdout
    assert ckptd_cli("latest", str(d)).stdout.strip() == str(ckpts[0])


@pytest.fixture
def watch_tree(tags: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Path, str]]:
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copytree(tags["hf"], tree / "hf")
    shutil.copytree(tags["zero3"], tree / "zero3")
    truncate(tree / "hf" / "checkpoint-12" / "global_step12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (tree / "zero3" / "global_step12" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    ckptd_cli("pin", str(tree / "zero3" / "global_step4"))
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
            "ds",
            "--settle",
            "0.5s",
            "--rescan-every",
            "2s",
            "--keep-last",
            "1",
            "--abandon-after",
            "1s",
            "--metrics-listen",
            f"127.0.0.1:{free_port()}",
            "--socket",
            sock,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=project_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: os.path.exists(sock), 60, "ckptd watch to start")
        yield tree, sock
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_watch_keep_last_1_keeps_the_good_tag_over_a_corrupt_or_incomplete_newer_one(
    watch_tree: tuple[Path, str],
) -> None:
    tree, sock = watch_tree

    def listed() -> dict[str, dict]:
        r = ckptd_cli("list", "ds", "--json", "--socket", sock)
        return {str(Path(x["path"]).relative_to(tree)): x for x in json.loads(r.stdout)} if r.returncode == 0 else {}

    wait_until(lambda: not (tree / "hf" / "checkpoint-4").exists(), 180, "keep_last 1 to delete checkpoint-4")
    wait_until(lambda: {"zero3/global_step8", "zero3/global_step12"} <= set(listed()), 120, "the ZeRO-3 tags judged")
    rows = listed()
    assert rows["hf/checkpoint-8"]["verified"] and rows["hf/checkpoint-8"]["step"] == 8
    assert not rows["hf/checkpoint-12"]["verified"]
    assert rows["zero3/global_step8"]["verified"] and not rows["zero3/global_step12"]["verified"]
    assert (tree / "hf" / "checkpoint-8").is_dir() and (tree / "zero3" / "global_step8").is_dir()
    assert (tree / "zero3" / "global_step4").is_dir()  # pinned
    assert (tree / "hf" / "checkpoint-12").is_dir()  # corrupt is kept (on_corrupt = keep), never counted as good
