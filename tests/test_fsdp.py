"""FSDP2 (``fully_shard``, DTensor) state through sharded saves planned by torch.distributed.checkpoint.

Real ``torchrun`` jobs (gloo, CPU) of ``examples/fsdp_train.py``: the units they write
reshard (4 -> 2 -> 4, and 2 -> 1 rank) to the same gathered state, open with ``dcp.load``
in a script that never imports ckptd, hold a replicated tensor once, and a rank killed
mid-save commits nothing (the previous unit resumes, bit-exact on the same rank count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors import safe_open

from ckptd.core.meta import DCP_SHARDING_INFO
from ckptd.core.settings import Settings
from ckptd.disk import manifest as mf
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_unit
from ckptd.remote.fetch import fetch
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import COMMIT, committed
from ckptd.remote.prune import prune_remote
from ckptd.remote.stores import Store, open_store
from ckptd.remote.upload import replicate
from ckptd.remote.verify import verify_remote
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, free_port, tmpfs_at, wait_until
from tests.test_integrations import ENV, run
from tests.test_remote import corrupt
from tests.test_sharded import TORCHRUN, kill_mid_write, unit

SCRIPT = str(ROOT / "examples" / "fsdp_train.py")
LOADER = str(ROOT / "tests" / "scripts" / "dcp_load_unit.py")
JOB = "fsdp-demo"


def torchrun(n: int, directory: Path, *extra: str) -> list[str]:
    return [TORCHRUN, f"--nproc_per_node={n}", f"--master_port={free_port()}", SCRIPT, "--dir", str(directory), *extra]


def printed(out: str, what: str) -> set[str]:
    """What every rank printed after ``what`` (a gathered fingerprint: one value when all agree)."""
    return set(re.findall(rf"rank \d {what} ([0-9a-f]{{64}})", out))  # (ranks print concurrently)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Four ranks with a daemon: rank 0 reports each committed unit, the daemon catalogues it
    and replicates it to the job's remote tier."""
    base = tmp_path_factory.mktemp("fsdp")
    remote = f"file://{base}/remote"
    os.makedirs(f"{base}/remote")
    daemon = DaemonProc(base, extra_config=f'remote_allow = ["{remote}"]\n').start()
    try:
        d = daemon.root / "ckpt"
        out = run(
            torchrun(4, d, "--steps", "20", "--every", "10"),
            {**ENV, "CKPTD_SOCKET": daemon.socket, "CKPTD_REMOTE": remote},
        )
        status = {j["job"]: j for j in json.loads(ckptd_cli("status", "--json", "--socket", daemon.socket).stdout)}
        assert status[JOB]["world_size"] == 4 and status[JOB]["checkpoints"] == 2, status
        assert daemon.metric("ckptd_saves_total", training_job=JOB, trigger="final", outcome="ok") == 1
        pre = job_prefix(JOB, os.path.realpath(d), os.getuid())  # the job's owner and directory
        wait_until(lambda: len(committed(open_store(remote), pre)) == 2, 60, "the daemon to replicate both units")
        assert [len(c.shards) for c in committed(open_store(remote), pre)] == [4, 4]
        yield d, out
    finally:
        daemon.stop()


@pytest.mark.slow
def test_each_rank_writes_its_chunks_and_a_replicated_tensor_once(four_ranks: tuple[Path, str]) -> None:
    d, out = four_ranks
    units = scan(str(d), JOB)
    assert [(c.step, c.ok, c.shards) for c in units] == [(10, True, 4), (20, True, 4)]
    assert mf.read(str(unit(d, 20, JOB))).layout == mf.DCP and verify_unit(str(unit(d, 20, JOB))).ok
    assert ckptd_cli("verify", str(unit(d, 20, JOB))).returncode == 0
    rows, scales = [], 0
    for r in range(4):
        with safe_open(str(unit(d, 20, JOB) / mf.shard_name(r, 4)), framework="pt") as f:
            offsets = json.loads((f.metadata() or {})[DCP_SHARDING_INFO])
            rows.append(offsets["model.inp.weight"]["saved_offsets"][0])
            assert f.get_slice("model.inp.weight").get_shape() == [16, 32]  # 64 rows over 4 ranks
            scales += "model.scale" in f.keys()
    assert rows == [0, 16, 32, 48] and scales == 1  # the replicated buffer: written by one rank


@pytest.mark.slow
def test_a_unit_reshards_4_to_2_to_4_and_to_1_with_the_same_gathered_state(
    four_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    d, out = four_ranks
    (saved,) = printed(out, "FINGERPRINT")
    two = tmp_path / "two"
    shutil.copytree(d, two)
    out2 = run(torchrun(2, two, "--steps", "25", "--every", "10"))  # resumes at 20, trains 5 steps, saves 25
    assert printed(out2, "RESUMED") == {saved}
    (at25,) = printed(out2, "FINGERPRINT")
    for ranks in (4, 1):
        again = tmp_path / f"again{ranks}"
        shutil.copytree(two, again)
        resumed = run(torchrun(ranks, again, "--steps", "27", "--every", "10"))  # and two optimizer steps after
        assert printed(resumed, "RESUMED") == {at25}, resumed
        assert re.findall(r"starting at step (\d+)", resumed) == ["25"] * ranks
        assert scan(str(again), JOB)[-1].step == 27 and scan(str(again), JOB)[-1].shards == ranks


@pytest.mark.slow
def test_hsdp_writes_each_chunk_from_one_replica_and_reshards_to_plain_fsdp(tmp_path: Path) -> None:
    """A 2-D mesh (2 replicas x 2 shards, HSDP): the parameters are replicated over the first mesh
    dimension, so only the ranks of replica 0 write chunks (no collective decides it: the rule
    in ``dcpio._writes``). Two ranks of plain FSDP resume the unit to the same gathered state."""
    d = tmp_path / "ckpt"
    out = run(torchrun(4, d, "--steps", "20", "--every", "10", "--hsdp"))
    (saved,) = printed(out, "FINGERPRINT")
    planned = []
    for r in range(4):
        with safe_open(str(unit(d, 20, JOB) / mf.shard_name(r, 4)), framework="pt") as f:
            planned.append(sorted(k for k in f.keys() if k.startswith(("model.", "optimizer."))))
    assert planned[0] and planned[1] and planned[2] == planned[3] == []  # replica 1 writes none of them
    assert {k for k in planned[0] if k.endswith("weight")} == {k for k in planned[1] if k.endswith("weight")}
    resumed = run(torchrun(2, d, "--steps", "22", "--every", "10"))
    assert printed(resumed, "RESUMED") == {saved}


@pytest.mark.slow
def test_constructing_a_checkpointer_leaves_a_fresh_optimizer_untouched(tmp_path: Path) -> None:
    """torch's get_optimizer_state_dict initialises an optimizer that has not stepped by stepping it
    (its step count moves): the Checkpointer must not call it before training does."""
    script = str(ROOT / "tests" / "scripts" / "fsdp_untouched.py")
    out = run([TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", script, str(tmp_path / "ckpt")])
    assert re.findall(r"OPTIMIZER STATE (\d+)", out) == ["0", "0"], out


@pytest.mark.slow
def test_dcp_load_opens_a_unit_in_a_script_that_does_not_import_ckptd(four_ranks: tuple[Path, str]) -> None:
    d, out = four_ranks
    loaded = run([PYTHON, LOADER, str(unit(d, 20, JOB))])
    assert set(re.findall(r"saves 2 MODEL ([0-9a-f]{64})", out)) == set(re.findall(r"^MODEL (\w+)$", loaded, re.M))


@pytest.mark.slow
def test_ckptd_export_consolidates_a_unit_of_four_ranks_into_the_model(
    four_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    """``ckptd export`` of a unit that four FSDP2 ranks wrote: one ``model.safetensors`` of whole
    tensors under the model's own keys, the same model the training run and ``dcp.load`` saw."""
    import hashlib

    from safetensors.torch import load_file

    d, out = four_ranks
    r = ckptd_cli("export", str(unit(d, 20, JOB)), str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(tensors) == {"inp.weight", "inp.bias", "out.weight", "out.bias", "scale"}, sorted(tensors)
    h = hashlib.sha256()  # as tests/scripts/dcp_load_unit.py and the training run fingerprint the model
    for k in sorted(tensors):
        h.update(f".model.{k}".encode())
        h.update(tensors[k].reshape(-1).view(torch.uint8).numpy().tobytes())
    assert set(re.findall(r"saves 2 MODEL ([0-9a-f]{64})", out)) == {h.hexdigest()}
    hf = ckptd_cli("export", str(unit(d, 20, JOB)), str(tmp_path / "hf"), "--format", "hf")
    assert hf.returncode == 1 and "exports as --format safetensors" in hf.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ranks,victim", [(2, 1), (4, 3)])
def test_a_rank_killed_mid_save_commits_nothing_and_resume_is_bit_exact(
    tmp_path: Path, ranks: int, victim: int
) -> None:
    straight = run(torchrun(ranks, tmp_path / "a", "--steps", "25", "--every", "5"))
    b = tmp_path / "b"
    kill_mid_write(
        torchrun(
            ranks,
            b,
            "--steps",
            "25",
            "--every",
            "5",
            "--step-sleep",
            "0.05",
            "--ballast-rank",
            str(victim),
            "--ballast-mib",
            "128",
        ),
        ENV,
        b,
        ranks,
        victim,
        tmp_path / "run.log",
        job=JOB,
    )
    assert not (unit(b, 15, JOB) / mf.MANIFEST).exists()
    out = run(torchrun(ranks, b, "--steps", "25", "--every", "5", "--ballast-rank", str(victim), "--ballast-mib", "1"))
    assert set(re.findall(r"starting at step (\d+)", out)) == {"10"}, out
    assert printed(out, "FINGERPRINT") == printed(straight, "FINGERPRINT")
    assert [c.step for c in scan(str(b), JOB) if not c.pending] == [5, 10, 15, 20, 25]


def test_ckptd_verify_accepts_a_checkpoint_written_by_dcp_save(tmp_path: Path) -> None:
    """Another tool's DCP checkpoint (its own ``.metadata`` and ``.distcp`` files): read, not unpickled."""
    import torch
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp-step7"
    dcp.save({"w": torch.ones(8), "b": torch.zeros(2), "lr": 0.1}, checkpoint_id=str(d), no_dist=True)
    r = ckptd_cli("verify", str(d))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    (d / "__0_0.distcp").write_bytes(b"")  # its data gone
    assert ckptd_cli("verify", str(d)).returncode != 0


# -- the remote tier: a unit goes as a directory of objects, committed last ---------------------


@pytest.mark.slow
def test_a_unit_replicates_verifies_and_fetches_and_a_flipped_byte_is_never_fetched(
    four_ranks: tuple[Path, str], store: Store, tmp_path: Path
) -> None:
    d, _ = four_ranks
    for step in (10, 20):
        c = replicate(store, JOB, str(unit(d, step, JOB)))
        assert c.shards == tuple(mf.shard_name(r, 4) for r in range(4))
    listed = committed(store, JOB)
    assert [(c.step, len(c.shards)) for c in listed] == [(10, 4), (20, 4)]
    assert all(verify_remote(store, c).ok for c in listed)
    got = fetch(store, JOB, str(tmp_path / "host2"))
    assert got == str(tmp_path / "host2" / unit(d, 20, JOB).name) and verify_unit(got).ok
    assert all((Path(got) / f).read_bytes() == (unit(d, 20, JOB) / f).read_bytes() for f in os.listdir(got))
    corrupt(store, f"{listed[1].key}/{mf.shard_name(2, 4)}")
    bad = verify_remote(store, listed[1])
    assert not bad.ok and bad.reason.startswith(f"shard {mf.shard_name(2, 4)}: digest mismatch"), bad.reason
    older = fetch(store, JOB, str(tmp_path / "host3"))
    assert older is not None and older.endswith(unit(d, 10, JOB).name)  # the newest one that verifies
    prune_remote(store, JOB, Settings(remote_keep_last=1), time.time())  # a deletion takes every object of the unit
    assert sorted(store.list(f"{JOB}/")) == sorted([listed[1].key + COMMIT, *listed[1].objects])


@pytest.mark.slow
def test_a_new_host_resumes_a_sharded_run_from_the_remote_tier_on_another_rank_count(tmp_path: Path) -> None:
    """Rank 0 replicates each committed unit; the host's disk is lost; four ranks on a new host
    fetch the newest unit from the remote tier and reshard it to the state the two ranks saved."""
    with tmpfs_at(tmp_path / "shared", "64m") as shared:
        env = {**ENV, "CKPTD_REMOTE": f"file://{shared}/ckpt"}
        first = run(torchrun(2, tmp_path / "host1", "--steps", "20", "--every", "10"), env)
        (saved,) = printed(first, "FINGERPRINT")
        store = open_store(f"file://{shared}/ckpt")
        pre = job_prefix(JOB, os.path.realpath(tmp_path / "host1"), os.getuid())
        assert [(c.step, len(c.shards)) for c in committed(store, pre)] == [(10, 2), (20, 2)]
        shutil.rmtree(tmp_path / "host1")  # a new host: the same job (uid, directory path), four ranks
        r = subprocess.run(
            torchrun(4, tmp_path / "host1", "--steps", "20", "--every", "10"),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert re.findall(r"starting at step (\d+)", r.stdout) == ["20"] * 4
        assert printed(r.stdout, "RESUMED") == {saved}  # host2 started empty: the state came from the remote
