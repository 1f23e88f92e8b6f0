"""Many hosts on one machine (SPEC §15): node-local checkpoint directories.

Each simulated host is a mount and UTS namespace of its own (``unshare -m -u``: its own
hostname) in which the same checkpoint path is a bind mount of that host's own disk (a
directory of the test's), and a ``torchrun --nnodes=2`` node of the job runs there: two hosts
of two ranks, on loopback, with gloo. The job sees what it would on two machines with node-local disks: the same path, other
files. The trainers save embedded unless a test starts a daemon per host (``host_daemon``); the
disks stay when the hosts go, so the test reads them afterwards; the remote tier is moto on
loopback, which every host reaches.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.disk import manifest as mf
from ckptd.disk.scan import scan
from ckptd.disk.verify import verify_unit
from ckptd.remote.layout import job_prefix
from ckptd.remote.listing import committed
from ckptd.remote.stores import Store, open_store
from ckptd.remote.verify import verify_remote
from tests.conftest import PYTHON, S3_ENV, SLACK, DaemonProc, MotoServer, ckptd_cli, free_port, wait_until
from tests.test_integrations import ENV, _failure
from tests.test_sharded import JOB, SCRIPT, TORCHRUN, fingerprints, torchrun, unit

HOSTS, PER_HOST = 2, 2


def _namespaces_work() -> bool:
    r = subprocess.run(["unshare", "-m", "-u", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs root and unshare -m -u (namespaces)")


def start_hosts(
    tmp_path: Path,
    *args: str,
    shared: bool = False,
    daemons: list[DaemonProc] | None = None,
    env: dict[str, str] | None = None,
    swap: bool = False,
    host_env: list[dict[str, str]] | None = None,
) -> list[subprocess.Popen[str]]:
    """The 4-rank job as two hosts, each with its own disk at ``tmp_path/mnt`` (``shared``: one
    directory that both see, as a shared filesystem; ``daemons``: each host's, whose socket
    its ranks talk to; ``host_env``: each host's own variables); one ``torchrun`` node per host,
    started."""
    mnt, port = tmp_path / "mnt", free_port()
    mnt.mkdir(exist_ok=True)
    nodes = []
    for h in range(HOSTS):
        disk = tmp_path / f"disk{h}"
        disk.mkdir(exist_ok=True)
        launch = [
            TORCHRUN,
            f"--nnodes={HOSTS}",
            f"--node_rank={HOSTS - 1 - h if swap else h}",
            f"--nproc_per_node={PER_HOST}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            SCRIPT,
            "--dir",
            str(mnt / "ckpt"),
            *args,
        ]
        mount = "" if shared else f'mount --bind "{disk}" "{mnt}" && '
        inner = f'hostname host{h} && {mount}exec "$@"'
        nodes.append(
            subprocess.Popen(
                ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", inner, "host", *launch],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={
                    **ENV,
                    **(env or {}),
                    **(host_env[h] if host_env else {}),
                    **({"CKPTD_SOCKET": daemons[h].socket} if daemons else {}),
                },
            )
        )
    return nodes


def on_hosts(tmp_path: Path, *args: str, check: bool = True, **kw: Any) -> str:
    """``start_hosts``, then both nodes' output (stdout then stderr) once both ended."""
    return outputs(start_hosts(tmp_path, *args, **kw), check)


def outputs(nodes: list[subprocess.Popen[str]], check: bool = True) -> str:
    out = ""
    for p in nodes:
        stdout, stderr = p.communicate(timeout=600)
        if check:
            assert p.returncode == 0, _failure(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        out += stdout + stderr
    return out


def kill_host(node: subprocess.Popen[str]) -> None:
    """Every process of the host (all that share its mount namespace) at once, with SIGKILL,
    until none is left: what a host that loses power does to the job."""
    try:
        ns, killed = os.readlink(f"/proc/{node.pid}/ns/mnt"), set()
    except OSError:  # it has ended already
        return
    while True:  # until no new one appears (a killed one is a zombie until its parent reaps it)
        pids = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                if pid not in killed and os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                    pids.append(pid)
            except OSError:
                continue
        if not pids:
            return
        killed.update(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def disk(tmp_path: Path, h: int) -> Path:
    return tmp_path / f"disk{h}" / "ckpt"


def test_node_local_directories_keep_each_hosts_shards_and_resume_bit_identical(tmp_path: Path) -> None:
    """Each host keeps what its own ranks wrote and the same manifest, which names every shard's
    host and disk; any host tells a committed unit from a partial one; the job resumes on the
    newest unit committed on every host and ends bit-identical to a run never stopped."""
    straight = fingerprints(subprocess.run(torchrun(4, tmp_path / "straight", "--steps", "30"), **_run()).stdout)
    on_hosts(tmp_path, "--steps", "20")

    steps = [c.step for c in scan(str(disk(tmp_path, 0)), JOB) if c.ok]
    assert steps and steps == [c.step for c in scan(str(disk(tmp_path, 1)), JOB) if c.ok], steps
    newest = max(steps)
    manifests = [(unit(disk(tmp_path, h), newest) / mf.MANIFEST).read_bytes() for h in range(HOSTS)]
    assert manifests[0] == manifests[1], "every host writes the same manifest"
    shards = json.loads(manifests[0])["shards"]
    assert [s["rank"] for s in shards] == [0, 1, 2, 3]
    assert len({s["disk"] for s in shards[:2]}) == len({s["disk"] for s in shards[2:]}) == 1
    assert shards[0]["disk"] != shards[2]["disk"]
    assert [s["host"] for s in shards] == ["host0", "host0", "host1", "host1"]
    for h in range(HOSTS):
        held = sorted(p.name for p in unit(disk(tmp_path, h), newest).glob("rank*"))
        assert held == [mf.shard_name(r, 4) for r in range(h * PER_HOST, (h + 1) * PER_HOST)], held
        result = verify_unit(str(unit(disk(tmp_path, h), newest)))
        assert result.ok, result.reason
        assert result.metadata["ckptd.shards_elsewhere"] == ",".join(str(r) for r in range(4) if r // PER_HOST != h)

    # a host's own shard gone: that host knows its part is broken (the other's absence it expects)
    broken = tmp_path / "broken"
    shutil.copytree(unit(disk(tmp_path, 1), newest), broken / unit(disk(tmp_path, 1), newest).name)
    shutil.copy(disk(tmp_path, 1) / mf.DISK_ID, broken / mf.DISK_ID)
    (broken / unit(disk(tmp_path, 1), newest).name / mf.shard_name(3, 4)).unlink()
    assert not verify_unit(str(broken / unit(disk(tmp_path, 1), newest).name)).ok

    # the newest unit committed on host 0 only (host 1 lost its manifest): the job resumes before it
    (unit(disk(tmp_path, 1), newest) / mf.MANIFEST).unlink()
    out = on_hosts(tmp_path, "--steps", "30")
    starts = set(re.findall(r"rank \d pid \d+ starting at step (\d+)", out))
    assert starts == {str(sorted(steps)[-2])}, out
    assert fingerprints(out) == straight, "resumed across the hosts' own disks, bit-identical to a straight run"

    # the hosts swap node ranks: each rank's own shards are on the other host's disk. Every rank
    # refuses at once, the same way (before, each passed verification and then failed to load)
    out = on_hosts(tmp_path, "--steps", "40", swap=True, check=False)
    assert out.count("no checkpoint is held and verified by all 4 ranks") >= 4, out[-4000:]
    assert "starting at step" not in out


def test_hosts_that_share_one_directory_commit_as_on_one_host(tmp_path: Path) -> None:
    """Two hosts that see one directory (a shared filesystem): one disk id, so rank 0 alone
    prepares and commits, and the unit holds every shard, as on one host."""
    on_hosts(tmp_path, "--steps", "10", shared=True)
    shared = tmp_path / "mnt" / "ckpt"
    newest = unit(shared, 10)
    assert sorted(p.name for p in newest.glob("rank*")) == [mf.shard_name(r, 4) for r in range(4)]
    shards = json.loads((newest / mf.MANIFEST).read_text())["shards"]
    assert len({s["disk"] for s in shards}) == 1 and shards[0]["disk"] == (shared / mf.DISK_ID).read_text()
    result = verify_unit(str(newest))
    assert result.ok and "ckptd.shards_elsewhere" not in result.metadata, result


def test_a_lost_host_resumes_from_the_remote_tier_and_the_run_ends_bit_identical(
    tmp_path: Path, moto: MotoServer
) -> None:
    """With node-local directories and a remote tier, each host's lead uploads its own shards and
    its part commit; the unit counts in the store once both hosts' parts are there. A host is
    lost with its disk; on a fresh one, its lead fetches the newest unit that verifies in the
    store, the surviving host resumes its own part of the same unit from its disk, and the run
    ends where a run never stopped ends, bit for bit."""
    straight = fingerprints(subprocess.run(torchrun(4, tmp_path / "straight", "--steps", "20"), **_run()).stdout)
    remote = {"CKPTD_REMOTE": "s3://ckpt/fleet", "CKPTD_REMOTE_ENDPOINT": moto.endpoint, **S3_ENV}
    on_hosts(tmp_path, "--steps", "10", env=remote)
    store = open_store("s3://ckpt/fleet", moto.endpoint)
    units = committed(store, job_prefix(JOB, str(tmp_path / "mnt" / "ckpt"), os.getuid()))
    assert [c.step for c in units] == [5, 10], units
    assert all(len(c.parts) == HOSTS and len(c.shards) == HOSTS * PER_HOST for c in units), units
    assert all(verify_remote(store, c).ok for c in units)

    shutil.rmtree(tmp_path / "disk1")  # host 1 is gone with its disk; a fresh host takes its place
    out = on_hosts(tmp_path, "--steps", "20", env=remote)
    starts = set(re.findall(r"rank \d pid \d+ starting at step (\d+)", out))
    assert starts == {"10"}, out[-4000:]
    assert "resumed at step 10" in out and "(verified, from remote)" in out, out[-4000:]
    assert fingerprints(out) == straight, "resumed from the store and a surviving disk, bit-identical"
    fetched = sorted(p.name for p in unit(disk(tmp_path, 1), 10).glob("rank*"))
    assert fetched == [mf.shard_name(r, 4) for r in range(4)], "the fresh host holds the whole unit it fetched"
    assert sorted(p.name for p in unit(disk(tmp_path, 0), 10).glob("rank*")) == [mf.shard_name(r, 4) for r in (0, 1)]


def host_daemon(tmp_path: Path, h: int, extra: str = "") -> DaemonProc:
    """Host ``h``'s own daemon, in a namespace like its ranks': the same hostname, its disk at
    ``tmp_path/mnt`` (its root); its socket and state outside, where the test reaches them."""
    d = DaemonProc(tmp_path / f"daemon{h}", extra)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    (tmp_path / f"disk{h}").mkdir(exist_ok=True)
    d.config.write_text(d.config.read_text().replace(f'roots = ["{d.root}"]', f'roots = ["{mnt}"]'))
    serve = f'hostname host{h} && mount --bind "{tmp_path}/disk{h}" "{mnt}" && exec "$@"'
    d.proc = subprocess.Popen(
        ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", serve, "host"]
        + [PYTHON, "-m", "ckptd.cli", "serve", "--config", str(d.config)],
        stdout=open(d.log, "ab"),
        stderr=subprocess.STDOUT,
        env=d.env,
    )
    deadline = time.monotonic() + 30 * SLACK
    while not d.healthy():
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.05)
    return d


def test_each_hosts_daemon_catalogues_counts_and_retains_its_own_part(tmp_path: Path) -> None:
    """One daemon per host: each host's lead rank tells its own daemon, which verifies the host's
    part of every unit, catalogues it and counts the save, and uploads that part to the remote
    tier; neither sees a failure, and the store holds each unit whole, from both hosts' parts."""
    remote = tmp_path / "remote"
    remote.mkdir()
    daemons = [host_daemon(tmp_path, h, f'remote_allow = ["file://{remote}"]\n') for h in range(HOSTS)]
    try:
        on_hosts(tmp_path, "--steps", "20", daemons=daemons, env={"CKPTD_REMOTE": f"file://{remote}"})
        for d in daemons:  # each daemon's uploader: its host's part of each of the 4 units
            wait_until(lambda: d.metric("ckptd_remote_uploads_total", training_job=JOB, outcome="ok") == 4, 120)
        store = open_store(f"file://{remote}")
        units = committed(store, job_prefix(JOB, str(tmp_path / "mnt" / "ckpt"), os.getuid()))
        assert units and units[-1].step == 20 and all(len(c.parts) == HOSTS for c in units), units
        assert all(verify_remote(store, c).ok for c in units)
        ckpt = tmp_path / "mnt" / "ckpt"
        for h, d in enumerate(daemons):
            assert d.metric("ckptd_saves_total", training_job=JOB, trigger="final", outcome="ok") == 1, h
            assert d.metric("ckptd_saves_total", training_job=JOB, trigger="step", outcome="ok") == 3, h
            listed = json.loads(ckptd_cli("list", JOB, "--json", "--socket", d.socket).stdout)
            assert [x["path"] for x in listed] == [str(unit(ckpt, s)) for s in (5, 10, 15, 20)], (h, listed)
            assert _failures(d) == 0, d.log.read_text()[-3000:]
    finally:
        for d in daemons:
            d.stop()


def _failures(d: DaemonProc) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(d.metrics())
        for s in family.samples
        if s.name == "ckptd_save_failures_total" and s.labels.get("training_job") == JOB
    )


def _run() -> dict[str, object]:
    return {"capture_output": True, "text": True, "timeout": 600, "env": ENV, "check": True}


ROUNDS = 6 if os.environ.get("CKPTD_SOAK") else 1  # host losses in the campaign (make soak: the long one)


def test_hosts_killed_mid_run_and_replaced_resume_where_every_host_reached_the_store(
    tmp_path: Path, moto: MotoServer
) -> None:
    """A host loses power while the job trains and saves (every process in it SIGKILLed at a
    random moment, then its disk gone); the other host's ranks fail at their next collective
    with it. On a fresh host the job resumes from the newest unit whose every part reached the
    store (the surviving host from its own disk, the fresh one from the store, both verified):
    never one committed on one host only or half uploaded. ``ROUNDS`` losses,
    alternating hosts; the run then ends bit-identical to one never stopped."""
    straight = fingerprints(subprocess.run(torchrun(4, tmp_path / "straight", "--steps", "40"), **_run()).stdout)
    remote = {"CKPTD_REMOTE": "s3://ckpt/fleet", "CKPTD_REMOTE_ENDPOINT": moto.endpoint, **S3_ENV}
    store = open_store("s3://ckpt/fleet", moto.endpoint)
    prefix = job_prefix(JOB, str(tmp_path / "mnt" / "ckpt"), os.getuid())
    rng, expected = random.Random(38), "0"
    for round_ in range(ROUNDS):
        lost = (round_ + 1) % HOSTS  # host 1 first, then host 0, ...
        nodes = start_hosts(tmp_path, "--steps", "40", "--step-sleep", "0.4", env=remote)
        if _progress(store, prefix, int(expected) + 5, nodes):
            time.sleep(rng.uniform(0, 2.5))  # during a save or between two
            kill_host(nodes[lost])
        out = outputs(nodes, check=False)
        starts = set(re.findall(r"rank \d pid \d+ starting at step (\d+)", out))
        assert starts == {expected}, (round_, starts, expected, out[-4000:])
        if nodes[0].returncode == nodes[1].returncode == 0:  # the run ended before the loss landed
            assert fingerprints(out) == straight, "bit-identical to a run never stopped"
            return
        assert nodes[1 - lost].returncode != 0, "the surviving host trained on alone?"
        shutil.rmtree(tmp_path / f"disk{lost}")
        expected = str(max(c.step for c in committed(store, prefix)))  # the newest every host's part reached
    out = on_hosts(tmp_path, "--steps", "40", env=remote)
    starts = set(re.findall(r"rank \d pid \d+ starting at step (\d+)", out))
    assert starts == {expected}, (starts, expected, out[-4000:])
    assert fingerprints(out) == straight, "bit-identical to a run never stopped"


def _progress(store: Store, prefix: str, step: int, nodes: list[subprocess.Popen[str]]) -> bool:
    """Until a unit of ``step`` or later is whole in the store (True), or a host's node ended (False)."""
    deadline = time.monotonic() + 300 * SLACK
    while not any(c.step >= step for c in committed(store, prefix)):
        if any(p.poll() is not None for p in nodes):
            return False
        assert time.monotonic() < deadline, f"no unit of step {step} whole in the store"
        time.sleep(0.3)
    return True


def test_hosts_with_different_remote_tiers_stop_every_rank_at_start(tmp_path: Path) -> None:
    """Each host uploads its part under the job's remote prefix: a host without the remote tier
    (or with another one) would leave every unit incomplete in the store. Every rank stops at
    start with the same error, the host without ``remote=`` included (it takes part in the check)."""
    remote = {"CKPTD_REMOTE": f"file://{tmp_path / 'remote'}"}
    out = on_hosts(tmp_path, "--steps", "10", check=False, host_env=[remote, {}])
    said = out.count("every host must have the same remote tier")
    assert said >= HOSTS, out[-4000:]  # each host's ranks (torchrun may stop a sibling before it prints)
    assert "starting at step" not in out
