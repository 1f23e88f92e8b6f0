"""Sharded checkpoints: every rank writes its shard, a manifest commits them, a dead rank commits nothing.

The runs are real ``torchrun`` jobs (gloo, CPU) of ``examples/sharded_train.py`` with 2 and
4 processes; the units they write are then tampered with on disk to check that
verification, listing and retention treat manifest and shards as one checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ckptd.core.settings import Settings
from ckptd.disk import manifest as mf
from ckptd.disk.persist import TEMP_MARK
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_file, verify_unit
from ckptd.save.keep import collect
from tests.conftest import PYTHON, ROOT, DaemonProc, ckptd_cli, free_port, preempt_group, run_py, wait_until
from tests.test_integrations import ENV, run
from tests.test_overlap import assert_one_step, at_step

TORCHRUN = str(Path(PYTHON).parent / "torchrun")


SCRIPT = str(ROOT / "examples" / "sharded_train.py")


JOB = "sharded-demo"


def torchrun(n: int, directory: Path, *extra: str) -> list[str]:
    return [TORCHRUN, f"--nproc_per_node={n}", f"--master_port={free_port()}", SCRIPT, "--dir", str(directory), *extra]


def fingerprints(out: str) -> dict[str, str]:
    return dict(re.findall(r"rank (\d) FINGERPRINT (\w+)", out))


def unit(directory: Path, step: int, job: str = JOB) -> Path:
    return directory / f"{job}-step{step:08d}"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sharded") / "ckpt"
    run(torchrun(2, d, "--steps", "20"))
    return d


def test_each_rank_writes_its_shard_and_the_manifest_names_them(two_rank_run: Path) -> None:
    units = scan(str(two_rank_run), JOB)
    assert [c.step for c in units] == [5, 10, 15, 20] and all(c.ok and c.shards == 2 for c in units)
    m = mf.read(str(unit(two_rank_run, 20)))
    assert m.trigger == "final" and [s.file for s in m.shards] == [mf.shard_name(0, 2), mf.shard_name(1, 2)]
    shard0 = (unit(two_rank_run, 20) / mf.shard_name(0, 2)).read_bytes()
    shard1 = (unit(two_rank_run, 20) / mf.shard_name(1, 2)).read_bytes()
    assert shard0 != shard1  # each rank saved its own slice
    r = verify_unit(str(unit(two_rank_run, 20)))
    assert r.ok and r.tensors > 0 and r.bytes == sum(s.bytes for s in m.shards)
    out = ckptd_cli("verify", "--json", str(two_rank_run))
    assert out.returncode == 0 and [x["step"] for x in json.loads(out.stdout)] == [5, 10, 15, 20]


def test_a_swapped_truncated_or_missing_shard_fails_the_unit(two_rank_run: Path, tmp_path: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(two_rank_run, d)
    a, b, c = unit(d, 5), unit(d, 10), unit(d, 15)
    shutil.copy(b / mf.shard_name(1, 2), a / mf.shard_name(1, 2))  # a shard of another step
    r = verify_file(str(a))
    assert not r.ok and mf.shard_name(1, 2) in r.reason and "manifest" in r.reason
    with open(b / mf.shard_name(0, 2), "r+b") as f:
        f.truncate(1000)
    assert not verify_file(str(b)).ok and "bytes" in verify_file(str(b)).reason
    os.unlink(c / mf.shard_name(1, 2))
    assert not verify_file(str(c)).ok
    listed = {x.step: x for x in scan(str(d), JOB)}
    assert listed[10].problem and listed[15].problem  # sizes are checked by the cheap scan too
    out = ckptd_cli("verify", str(d))
    assert out.returncode == 1 and out.stdout.count("CORRUPT") == 3
    latest = ckptd_cli("latest", str(d))
    assert latest.stdout.strip() == str(unit(d, 20))


def test_a_unit_without_manifest_is_pending_until_a_later_save_commits(two_rank_run: Path, tmp_path: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(two_rank_run, d)
    os.unlink(unit(d, 20) / mf.MANIFEST)  # the newest save never committed
    listed = scan(str(d), JOB)
    assert listed[-1].pending and listed[-1].step == 20 and listed[-1].ok
    assert not verify_file(str(unit(d, 20))).ok
    verdicts, _ = collect(str(d), JOB, Settings(keep_last=1), 0.0, [str(d)], dry_run=True)
    assert {v.item.step: v.keep for v in verdicts} == {5: False, 10: False, 15: True, 20: True}
    os.unlink(unit(d, 10) / mf.MANIFEST)  # an older one did not commit either: abandoned, goes
    verdicts, removals = collect(str(d), JOB, Settings(keep_last=2), 0.0, [str(d)])
    assert {v.item.step: (v.keep, v.reasons) for v in verdicts if v.item.step == 10} == {10: (False, ("partial",))}
    assert not unit(d, 10).exists() and unit(d, 20).exists() and unit(d, 15).exists()


@pytest.mark.slow
def test_a_quota_refusal_reaches_every_rank_before_any_shard_is_written(tmp_path: Path) -> None:
    """max_bytes fits one unit: the next saves fail ``no_space`` on all ranks, training goes on,
    the unit already there is untouched and no rank leaves a stray shard behind."""
    env = {**ENV, "CKPTD_MAX_BYTES": "50KiB"}
    out = run(torchrun(2, tmp_path, "--steps", "20"), env)
    assert len(fingerprints(out)) == 2  # both ranks trained to the end
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{JOB}-step00000005"]
    assert verify_unit(str(unit(tmp_path, 5))).ok
    assert re.findall(r"rank \d FINGERPRINT \w+ saves (\d+)", out) == ["1", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks,victim", [(2, 1), (4, 2)])
def test_a_rank_killed_mid_save_commits_nothing_and_resume_takes_the_previous(
    tmp_path: Path, ranks: int, victim: int
) -> None:
    d = DaemonProc(tmp_path / "d").start()
    try:
        env = {**ENV, "CKPTD_SOCKET": d.socket}
        straight = fingerprints(run(torchrun(ranks, d.root / "a", "--steps", "25"), env))
        assert len(straight) == ranks and len(set(straight.values())) == ranks  # every rank its own state
        status = {j["job"]: j for j in json.loads(ckptd_cli("status", "--json", "--socket", d.socket).stdout)}
        assert status[JOB]["world_size"] == ranks and status[JOB]["checkpoints"] == 5
        assert d.metric("ckptd_saves_total", training_job=JOB, trigger="final", outcome="ok") == 1
        listed = json.loads(ckptd_cli("list", JOB, "--json", "--socket", d.socket).stdout)
        assert [x["path"] for x in listed] == [str(unit(d.root / "a", s)) for s in (5, 10, 15, 20, 25)]
        d.stop()
        shutil.rmtree(d.state)  # the catalogue is rebuilt from the files: units, not their shards
        d.start()
        assert json.loads(ckptd_cli("list", JOB, "--json", "--socket", d.socket).stdout) == listed

        b = d.root / "b"
        kill_mid_write(
            torchrun(
                ranks, b, "--steps", "25", "--step-sleep", "0.05", "--ballast-rank", str(victim), "--ballast-mib", "128"
            ),
            env,
            b,
            ranks,
            victim,
            tmp_path / "run.log",
        )
        assert not (unit(b, 15) / mf.MANIFEST).exists()
        assert not (unit(b, 15) / mf.shard_name(victim, ranks)).exists()
        assert not verify_file(str(unit(b, 15))).ok

        out = run(torchrun(ranks, b, "--steps", "25", "--ballast-rank", str(victim), "--ballast-mib", "1"), env)
        assert set(re.findall(r"rank \d pid \d+ starting at step (\d+)", out)) == {"10"}, out
        assert fingerprints(out) == straight
        assert [c.step for c in scan(str(b), JOB) if not c.pending] == [5, 10, 15, 20, 25]
        assert verify_unit(str(unit(b, 15))).ok  # saved again after the resume, and committed
    finally:
        d.stop()


@pytest.mark.slow
def test_time_rule_saves_commit_on_every_rank(tmp_path: Path) -> None:
    """``every`` fires on rank 0's clock only; the flag exchange makes all ranks save at one step."""
    env = {**ENV, "CKPTD_EVERY": "1s"}
    run(torchrun(2, tmp_path, "--steps", "30", "--every", "1000", "--step-sleep", "0.1"), env)
    units = scan(str(tmp_path), JOB)
    timed = [c for c in units if c.trigger == "time"]
    assert len(timed) >= 2 and all(c.ok and c.shards == 2 for c in units), units
    assert units[-1].step == 30 and units[-1].trigger == "final"
    assert all(verify_unit(c.path).ok for c in units)


@pytest.mark.slow
def test_sigterm_to_the_whole_job_commits_a_preemption_checkpoint(tmp_path: Path) -> None:
    """As a scheduler preempts: SIGTERM to every process; the ranks agree on one step, save, then exit."""
    log = tmp_path / "run.log"
    d = tmp_path / "ckpt"
    with open(log, "wb") as out:
        p = subprocess.Popen(
            torchrun(2, d, "--steps", "200", "--every", "1000", "--step-sleep", "0.1"),
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    preempt_group(
        p, lambda: log.read_text().count("starting at step") == 2, 60, "both ranks to start training", 60, settle=1.0
    )  # SIGTERM a few steps in
    units = scan(str(d), JOB)
    assert [c.trigger for c in units] == ["preempt"] and units[0].ok and units[0].shards == 2, units
    assert verify_unit(units[0].path).ok and units[0].step > 0


def kill_mid_write(
    args: list[str], env: dict[str, str], b: Path, ranks: int, victim: int, log: Path, job: str = JOB
) -> None:
    """Run until the victim rank is writing its (large) shard of step 15 while rank 0's is
    written and waiting; SIGKILL the victim, then, as a launcher would, the rest."""
    with open(log, "wb") as out:
        p = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def writing() -> bool:
            names = os.listdir(unit(b, 15, job)) if unit(b, 15, job).is_dir() else []
            return mf.shard_name(0, ranks) in names and any(
                TEMP_MARK in n and mf.shard_name(victim, ranks) in n for n in names
            )

        wait_until(lambda: writing() or p.poll() is not None, 120, "the victim writing its shard of step 15")
        assert p.poll() is None, log.read_text()[-3000:]
        pid = int(dict(re.findall(r"rank (\d+) pid (\d+)", log.read_text()))[str(victim)])
        os.kill(pid, signal.SIGKILL)
        try:
            p.wait(60)  # torchrun sees a worker die and stops the others
        except subprocess.TimeoutExpired:
            pass
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.slow
def test_per_rank_units_do_not_reshard_and_say_why(two_rank_run: Path, tmp_path: Path) -> None:
    """Plain per-rank tensors (each rank its own slice) have no global shape to reshard from:
    four ranks do not load a two-rank unit, and the log says what would (DTensor state)."""
    d = tmp_path / "ckpt"
    shutil.copytree(two_rank_run, d)
    r = subprocess.run(torchrun(4, d, "--steps", "5"), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(re.findall(r"starting at step (\d+)", r.stdout)) == {"0"}
    assert "saved by 2 ranks, this run has 4" in r.stderr and "DTensor state, FSDP2, does" in r.stderr


def test_a_rank_never_writes_its_shard_through_a_link_at_the_units_name(tmp_path: Path) -> None:
    """Every rank's write goes through the save's guard (the unit's directory opened below the
    job directory's fd, no link followed): a link planted at the unit's name, pointing at a
    directory that even looks committed (a manifest in it, so the stale-attempt cleanup leaves
    it), fails the save; nothing is written where it points. (It was written through.)"""
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (outside / "ckptd-manifest.json").write_text("{}")
    os.symlink(outside, run / "linked-step00000002")
    r = run_py(str(ROOT / "tests" / "scripts" / "one_rank.py"), str(free_port()), str(run), "linked", "2", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["verified"] == 0 and stats["failed"] == 1 and stats["reason"] == "permission", stats
    assert sorted(os.listdir(outside)) == ["ckptd-manifest.json"], "a shard was written through the link"
    again = run_py(
        str(ROOT / "tests" / "scripts" / "one_rank.py"), str(free_port()), str(tmp_path / "clean"), "linked", "2", "2"
    )
    assert json.loads(again.stdout.strip().splitlines()[-1])["verified"] == 1, again.stderr[-3000:]


def test_export_of_a_unit_of_per_rank_state_takes_one_rank(tmp_path: Path) -> None:
    """Each rank of a per-rank unit saved its own tensors: ``ckptd export`` says to pick one, and
    exports that rank's model (``--rank``) like a single file's."""
    from safetensors.torch import load_file

    r = run_py(str(ROOT / "tests" / "scripts" / "one_rank.py"), str(free_port()), str(tmp_path / "run"), "pr", "2", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    path = str(tmp_path / "run" / "pr-step00000002")
    refused = ckptd_cli("export", path, str(tmp_path / "out"))
    assert refused.returncode == 1 and "export one rank's with --rank R" in refused.stderr, refused.stderr
    ok = ckptd_cli("export", path, str(tmp_path / "out"), "--rank", "0")
    assert ok.returncode == 0, ok.stderr
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == {"weight", "bias"}


def test_a_trigger_one_rank_sees_waits_for_the_exchange() -> None:
    """Sharded (and DeepSpeed engine) jobs: a time rule firing or a signal arriving on one rank
    must not send that rank alone into a save (its collectives would pair with the other ranks'
    training, or a `final` save past total_steps would run on one rank): it is only a flag for the
    next exchange. A single-process job acts on it at its next step()."""
    from ckptd.core.policy import SavePolicy
    from trainer_hooks._clock.triggers import Triggers

    policy = SavePolicy.from_settings({"every": 1.0, "total_steps": 10})
    sharded = Triggers(policy, "j", sharded=True)
    sharded.time_fired("every")
    sharded.raise_attention()
    assert not sharded.attention and sharded.time_due == "every"  # sent at the next exchange
    single = Triggers(policy, "j", sharded=False)
    single.time_fired("every")
    assert single.attention


def test_ranks_whose_directories_differ_resume_the_newest_unit_every_rank_holds(
    two_rank_run: Path, tmp_path: Path
) -> None:
    """Node-local disks: each rank lists its own directory. The ranks agree on the units they all
    hold before any is verified (else they enter mismatched collectives: a hang, or each rank
    resuming another step); with none in common, or one rank's directory not its own, they all stop
    at once with the same clear error (before, the other ranks waited for the refused one until
    ``shard_timeout``)."""
    steps = sorted(c.step for c in scan(str(two_rank_run), JOB) if c.ok)
    assert len(steps) >= 3, steps
    older, middle, newest = steps[-3:]
    for r in (0, 1):
        shutil.copytree(two_rank_run, tmp_path / f"r{r}")
    split = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}"]
    script = [str(ROOT / "tests" / "scripts" / "split_resume.py"), str(tmp_path / "r{rank}")]
    # rank 0 cannot read the newest unit's manifest (it lists it as the oldest, step -1): every
    # rank still walks one order, so both skip it together and take the middle one
    manifest = unit(tmp_path / "r0", newest) / mf.MANIFEST
    manifest.write_text("{damaged")
    out = run([*split, *script])
    assert sorted(re.findall(r"rank (\d) resumed at step (\d+)", out)) == [("0", str(middle)), ("1", str(middle))], out
    shutil.copy(unit(tmp_path / "r1", newest) / mf.MANIFEST, manifest)

    shutil.rmtree(unit(tmp_path / "r0", middle))  # rank 0's disk: older and newest
    shutil.rmtree(unit(tmp_path / "r1", newest))  # rank 1's disk: older and middle
    out = run([*split, *script])
    assert sorted(re.findall(r"rank (\d) resumed at step (\d+)", out)) == [("0", str(older)), ("1", str(older))], out

    for r, keep in ((0, newest), (1, middle)):  # now rank 0 holds the newest only, rank 1 the middle one
        for step in steps:
            if step != keep and unit(tmp_path / f"r{r}", step).exists():
                shutil.rmtree(unit(tmp_path / f"r{r}", step))
    r = subprocess.run([*split, *script], capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode != 0
    said = re.findall(r"rank (\d) ResumeError: (.*)", r.stdout)
    assert sorted(rank for rank, _ in said) == ["0", "1"], r.stdout + r.stderr[-3000:]
    assert all("no checkpoint is held and verified by all 2 ranks" in why for _, why in said), said
    assert f"step{newest:08d}" in said[0][1] and f"step{middle:08d}" in said[0][1], said

    os.chown(tmp_path / "r1", 65534, 65534)  # rank 1's directory is not its own (swapped under it?)
    r = subprocess.run([*split, *script], capture_output=True, text=True, timeout=600, env=ENV)
    said = re.findall(r"rank (\d) ResumeError: (.*)", r.stdout)
    assert sorted(rank for rank, _ in said) == ["0", "1"], r.stdout + r.stderr[-3000:]
    assert all("rank 1: the job directory" in why and "owned by uid 65534" in why for _, why in said), said


def test_overlapped_sharded_saves_hold_each_ranks_state_of_their_step_and_resume(tmp_path: Path) -> None:
    """``snapshot="overlap"`` with ``sharded=True`` (per-rank state): each rank's copy runs while
    the next optimizer step waits for it, the ranks commit each unit as before, and every shard
    holds its rank's state of the saving step, bit for bit (the weights and the momentum say
    their step: a shard that mixed two steps fails); the run then resumes from the newest unit."""
    script = str(ROOT / "tests" / "scripts" / "overlap_train.py")
    launch = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", script, str(tmp_path), "12", "--sharded"]
    assert run(launch).count(f"DONE 12 {at_step(12)[0]} overlap=True") == 2
    units = [c for c in scan(str(tmp_path), "ov") if c.ok]
    assert [c.step for c in units] == [10, 11, 12], units  # keep_last=3, every step saved
    for c in units:
        for r in range(2):
            assert assert_one_step(str(Path(c.path) / mf.shard_name(r, 2))) == c.step
    launch[2] = f"--master_port={free_port()}"
    launch[5] = "16"
    assert run(launch).count(f"DONE 16 {at_step(16)[0]} overlap=True") == 2


def test_rank0_proposes_about_a_tenth_of_a_second_between_trigger_exchanges() -> None:
    """(In-process; here, not in the unit tier: the module holding it imports torch.)"""
    from trainer_hooks._ranks.shards import MAX_INTERVAL, next_interval

    assert next_interval(None) == 1 and next_interval(0.0) == 1  # no measurement yet: every call
    assert next_interval(0.001) == 100 and next_interval(0.01) == 10
    assert next_interval(2.0) == 1  # slow steps: every step, a trigger waits one step
    assert next_interval(1e-9) == MAX_INTERVAL
