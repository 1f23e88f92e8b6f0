"""Every benchmark runs in its quick form, so none of them can rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, run_py

BENCH = ROOT / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,result",
    [
        ("bench_stall", "stall_quick"),
        ("bench_io", "io_quick"),
        ("bench_overhead", "overhead_quick"),
        ("bench_load", "load_quick"),
        ("bench_watch", "watch_quick"),
        ("bench_sharded", "sharded_2ranks_quick"),
        ("bench_sharded --fsdp", "sharded_fsdp_2ranks_quick"),
        ("bench_auto", "auto_quick"),
        ("bench_remote", "remote_quick"),
        ("bench_finetune", "finetune_quick"),
        ("bench_resume", "resume_quick"),
        ("bench_multilevel", "multilevel_quick"),
        ("bench_multihost", "multihost_quick"),
    ],
)
def test_benchmark_smoke(name: str, result: str, tmp_path: Path) -> None:
    env = {
        "CKPTD_BENCH_RESULTS": str(tmp_path / "results"),
        "CKPTD_BENCH_DIR": str(tmp_path),
        "CKPTD_BENCH_PORTS": ",".join(str(free_port()) for _ in range(4)),
    }
    name, *args = name.split()
    r = run_py(str(BENCH / f"{name}.py"), "--quick", *args, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / f"{result}.json").read_text())
    assert doc["benchmark"] == result and doc["machine"]["cpus"]
    if name == "bench_load":
        assert doc["lost"] == 0 and doc["corrupt"] == 0 and doc["failed"] == 0
    if name == "bench_sharded":
        assert doc["ranks"] == 2 and all(len(r["ckptd commit"]) == 3 for r in doc["per_rank"])
    if name == "bench_auto":  # auto runs the daemon's own function: near the hindsight optimum, under the bound
        for row in doc["results"]:
            assert row["auto_overhead"] < 0.02 and row["waste"]["auto"] < row["waste"]["1 h"], row
    if name == "bench_remote":  # every upload verified and committed, and the lag run saw every save
        assert len(doc["lag"]["samples"]) == doc["lag"]["saves"] and doc["ratio_s3_vs_upload_file"] > 0
    if name == "bench_finetune":  # the base is written once: later saves cost about the trainable state
        assert doc["bytes_goal_met"] and doc["ckptd"]["kept_files"] == 3, doc
    if name == "bench_resume":  # every way back measured, the memory tier's included
        assert all(len(doc["results"][0][k]) == 2 for k in ("memory", "disk (cold)", "remote", "memcpy")), doc
    if name == "bench_multilevel":  # no memory saves where the disk keeps up; fewer losses where it cannot
        for row in doc["rows"]:
            assert row["ratio"] == 1.0 if row["two_tiers"]["memory"] is None else row["ratio"] < 0.9, row
        assert sum(row["two_tiers"]["memory"] is not None for row in doc["rows"]) == 2
    if name == "bench_stall":  # the overlapped copy measured beside a short and a long training step
        overlap = doc["results"][0]["overlap"]
        assert set(overlap) == {"64", "256"} and all(o["step_beside_copy"] > 0 for o in overlap.values()), doc
    if name == "bench_io":
        assert doc["verify_peak_rss_bytes"] < 300 * 2**20
    if name == "bench_multihost":  # a lost host's part back from the store (both hosts' parts) and from its disk
        assert all(len(v) == 1 for v in doc["series"].values()) and doc["ratio_store_vs_disk"] > 0, doc
