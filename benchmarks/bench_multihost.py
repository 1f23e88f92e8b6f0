"""Many hosts (SPEC §15, issue 38, item 7), the part that is built: how long a lost host's ranks
take to get their state back, from the remote tier against from a host's own disk, and both
against a memcpy of the same bytes.

The unit is what two hosts with node-local disks hold after a save: 4 ranks, each host its own 2
ranks' shards and the same manifest, each host's part uploaded to a loopback S3 server (moto in
server mode) as ckptd's uploader does it (the manifest, its shards, its part commit). Measured in
the same run, medians of ``--reps``:

- **store**: a fresh host's restore: ``fetch`` of the newest unit (every object downloaded, the
  unit verified tensor by tensor, renamed into place), then its two ranks' shards loaded;
- **own disk**: a host that kept its disk: its part verified tensor by tensor (``verify_unit``,
  what resume does), then its two ranks' shards loaded (the page cache is warm: a best case);
- **memcpy**: a copy of the same two shards' bytes, in memory, into the same allocated state.

Both restores copy every loaded byte into that state (a load alone maps the file lazily).

Not measured, because not built yet: the restore from a buddy's replica in memory and a
replica's cost to training (``replicas=N``); nor the time from the last shard verified to the
unit committed on every host, which needs two hosts' ranks (``tests/test_multihost.py`` runs
them, but as a test, not a benchmark).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MiB, on_moto, table, timed  # noqa: E402

RANKS, HOSTS = 4, 2
DISKS = ("a" * 32, "b" * 32)


def make_unit(root: Path, mib: int, step: int = 10) -> list[Path]:
    """Each host's copy of one unit (``root/hostH/ckpt/UNIT``): its ranks' shards of ``mib`` MiB
    each, written and verified by ckptd's persist, and the manifest every host writes."""
    import torch

    from ckptd.core.format import read_header
    from ckptd.disk import manifest as mf
    from ckptd.disk.persist import persist
    from trainer_hooks._snapshot.staging import StagingBuffer

    name, shards = f"bench-step{step:08d}", []
    units = [root / f"host{h}" / "ckpt" / name for h in range(HOSTS)]
    for r in range(RANKS):
        unit = units[r * HOSTS // RANKS]
        unit.mkdir(parents=True, exist_ok=True)
        tensors = {f"model/layer{i}": torch.randn(mib * MiB // 4 // 8) for i in range(8)}
        meta = {"ckptd.format": "1", "ckptd.job": "bench", "ckptd.step": str(step), "ckptd.trigger": "step"}
        buf = StagingBuffer()
        try:
            path = persist(buf.fd, buf.stage(tensors, meta), str(unit), mf.shard_name(r, RANKS)).path
        finally:
            buf.close()
        with open(path, "rb") as f:
            digest = read_header(f, os.path.getsize(path)).metadata["ckptd.meta_digest"]
        h = r * HOSTS // RANKS
        shards.append(mf.Shard(r, mf.shard_name(r, RANKS), os.path.getsize(path), digest, f"host{h}", DISKS[h]))
    for unit in units:
        mf.write(str(unit), mf.Manifest("bench", step, RANKS, tuple(shards), trigger="step"))
    return units


def upload_parts(store: object, units: list[Path], at: Path) -> str:
    """Each host's part, as its uploader sends it, from the job directory's one path ``at``."""
    from ckptd.remote.layout import job_prefix
    from ckptd.remote.upload import replicate

    prefix = job_prefix("bench", str(at), os.getuid())
    for unit in units:
        unit.parent.rename(at)
        try:
            replicate(store, "bench", str(at / unit.name), prefix=prefix)  # type: ignore[arg-type]
        finally:
            at.rename(unit.parent)
    return prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=128, help="MiB per rank's shard")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.mib, a.reps = 4, 1
    on_moto("multihost_quick" if a.quick else "multihost", lambda work, server: run(a, work, server))


def run(a: argparse.Namespace, work: Path, server: object) -> dict[str, object]:
    import torch

    from ckptd.disk import manifest as mf
    from ckptd.disk.verify import verify_unit
    from ckptd.remote.fetch import fetch
    from ckptd.remote.listing import committed
    from ckptd.remote.stores import open_store
    from trainer_hooks import load

    server.client().create_bucket(Bucket="bench")  # type: ignore[attr-defined]
    store = open_store("s3://bench/fleet", server.endpoint)  # type: ignore[attr-defined]
    units = make_unit(work, a.mib)
    prefix = upload_parts(store, units, work / "ckpt")
    (whole,) = committed(store, prefix)
    assert len(whole.parts) == HOSTS, whole
    mine = [mf.shard_name(r, RANKS) for r in range(RANKS // HOSTS, RANKS)]  # host 1's ranks
    nbytes = sum((units[1] / f).stat().st_size for f in mine)

    into = torch.empty(nbytes, dtype=torch.uint8)  # the ranks' state, allocated: a restore copies into it

    def restore(unit: str) -> None:
        """The two ranks' shards loaded and every byte copied into place (a load alone maps lazily)."""
        at = 0
        for f in mine:
            for t in _tensors(load(os.path.join(unit, f))):
                n = t.numel() * t.element_size()
                into[at : at + n].copy_(t.reshape(-1).view(torch.uint8))
                at += n

    def from_store() -> None:
        fresh = work / f"fresh{time.monotonic_ns()}"
        got = fetch(store, prefix, str(fresh))
        assert got is not None, "the unit did not fetch"
        restore(got)
        shutil.rmtree(fresh)

    def from_disk() -> None:
        assert verify_unit(str(units[1])).ok
        restore(str(units[1]))

    source = torch.empty(nbytes, dtype=torch.uint8)
    series: dict[str, list[float]] = {"store (fetch, verify, load)": [], "own disk (verify, load)": [], "memcpy": []}
    for _ in range(a.reps):
        series["store (fetch, verify, load)"].append(timed(from_store))
        series["own disk (verify, load)"].append(timed(from_disk))
        series["memcpy"].append(timed(lambda: into.copy_(source)))
    med = {k: statistics.median(v) for k, v in series.items()}
    base = med["memcpy"]
    rows = [[k, f"{med[k]:.3f} s", f"{med[k] / base:.1f}x"] for k in series]
    print(
        table(
            f"A lost host's 2 ranks of 4 ({nbytes / MiB:.0f} MiB of {RANKS * nbytes / (RANKS // HOSTS) / MiB:.0f}) "
            f"back, medians of {a.reps}",
            ["source", "time", "vs memcpy"],
            rows,
        )
    )
    store_vs_disk = med["store (fetch, verify, load)"] / med["own disk (verify, load)"]
    print(f"store / own disk: {store_vs_disk:.1f}x (the store's path downloads and verifies the whole unit)")
    return {
        "mib_per_rank": a.mib,
        "ranks": RANKS,
        "hosts": HOSTS,
        "host_bytes": nbytes,
        "reps": a.reps,
        "series": series,
        "medians": med,
        "ratio_store_vs_memcpy": med["store (fetch, verify, load)"] / base,
        "ratio_disk_vs_memcpy": med["own disk (verify, load)"] / base,
        "ratio_store_vs_disk": store_vs_disk,
    }


def _tensors(obj: object) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


if __name__ == "__main__":
    main()
