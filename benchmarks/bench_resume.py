"""Benchmark: resuming after a trainer crash, from the daemon's memory, the disk, and the remote tier.

A state of N MiB (fp32 Linear layers) saved once through a real daemon with a ``file://``
remote tier; the trainer gone (its Checkpointer closed without a final save, as after a
SIGKILL); then ``resume()`` into a fresh model three ways, each verifying every tensor:

- from the daemon's memory tier (the newest snapshot, by fd; no read of the file);
- from disk with a cold cache (``posix_fadvise(DONTNEED)`` on the file first);
- from the remote tier on a new host (nothing local: fetched, verified, loaded).

Floors measured in the same run: one memcpy of the state (a tensor clone), and one cold read of
the file (the same ``DONTNEED``, then a plain read). Goal: from memory <= 1.5x one memcpy.

    python benchmarks/bench_resume.py [--sizes 1024,4096] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import Daemon, MiB, scratch, table, timed, write_result  # noqa: E402

WIDTH = 4096  # one fp32 layer of 4096x4096 is 64 MiB


def model_of(mib: int) -> torch.nn.Module:
    rows = max(1, mib * MiB // (WIDTH * 4 * 16))  # 16 layers of rows x 4096
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, rows, bias=False) for _ in range(16)]).requires_grad_(False)


def cold(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_floor(path: str) -> float:
    cold(path)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * MiB):
                pass

    return timed(read)


def one_size(work: Path, mib: int, reps: int) -> dict[str, object]:
    from trainer_hooks import Checkpointer

    d = Daemon(scratch())  # a short path: a Unix socket's is at most 107 bytes
    run, remote = d.root / "job", f"file://{work / 'remote'}"
    try:
        model = model_of(mib)
        ckpt = Checkpointer("res", run, model=model, socket=d.socket, quiet=True, save_final=False)
        ckpt.save(wait=True)
        path, mode = ckpt.last_verified or "", ckpt.mode
        ckpt.close(final=False)
        if mode != "daemon":
            raise RuntimeError("the save did not go through the daemon: no memory tier to measure")
        from ckptd.remote.layout import job_prefix
        from ckptd.remote.stores import open_store
        from ckptd.remote.upload import replicate

        for i in range(reps):  # what the uploader does, here and now, for each new host's job (uid, directory)
            replicate(
                open_store(remote),
                "res",
                path,
                prefix=job_prefix("res", os.path.realpath(work / f"host{i}"), os.getuid()),
            )
        times: dict[str, list[float]] = {"memory": [], "disk (cold)": [], "remote": [], "memcpy": [], "read (cold)": []}
        params = list(model.parameters())
        for _ in range(reps):  # one layer at a time: no second copy of the state held
            times["memcpy"].append(sum(timed(p.clone) for p in params))
        del model, ckpt, params  # the trainer is gone: only the daemon and the disk hold the state now
        gc.collect()
        for i in range(reps):
            times["read (cold)"].append(read_floor(path))
            times["memory"].append(_resume(run, d.socket, mib))
            cold(path)
            times["disk (cold)"].append(_resume(run, False, mib))
            times["remote"].append(_resume(work / f"host{i}", False, mib, remote))
            shutil.rmtree(work / f"host{i}", ignore_errors=True)
        return {"mib": mib, "bytes": os.path.getsize(path), **{k: v for k, v in times.items()}}
    finally:
        d.stop()
        shutil.rmtree(d.base, ignore_errors=True)


def _resume(directory: Path, socket: str | bool, mib: int, remote: str | None = None) -> float:
    from trainer_hooks import Checkpointer

    fresh = model_of(mib)
    ckpt = Checkpointer("res", directory, model=fresh, socket=socket, remote=remote, quiet=True, save_final=False)
    try:
        return timed(ckpt.resume)
    finally:
        ckpt.close(final=False)
        del fresh, ckpt
        gc.collect()  # the resumed model goes before the next one is built: 4 GiB states fit in 24 GiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096", help="MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 2 reps")
    args = ap.parse_args()
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 2 if args.quick else args.reps
    results = []
    for mib in sizes:
        work = Path(tempfile.mkdtemp(dir=scratch()))
        try:
            results.append(one_size(work, mib, reps))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for r in results:
        med = {k: statistics.median(v) for k, v in r.items() if isinstance(v, list)}
        r["median"] = med
        rows.append(
            [
                f"{r['mib']} MiB",
                f"{med['memcpy'] * 1e3:.0f} ms",
                f"{med['read (cold)'] * 1e3:.0f} ms",
                f"{med['memory'] * 1e3:.0f} ms ({med['memory'] / med['memcpy']:.2f}x memcpy)",
                f"{med['disk (cold)'] * 1e3:.0f} ms ({med['disk (cold)'] / med['read (cold)']:.2f}x read)",
                f"{med['remote'] * 1e3:.0f} ms",
                f"{med['disk (cold)'] / med['memory']:.1f}x",
            ]
        )
    print(
        table(
            "resume after a trainer crash (every tensor verified; medians)",
            [
                "state",
                "memcpy",
                "read (cold)",
                "from memory",
                "from disk (cold)",
                "from remote (file://)",
                "disk / memory",
            ],
            rows,
        )
    )
    for r in results:
        ok = r["median"]["memory"] <= 1.5 * r["median"]["memcpy"]  # type: ignore[index]
        print(
            f"{r['mib']} MiB: from memory {r['median']['memory'] / r['median']['memcpy']:.2f}x one memcpy; "  # type: ignore[index]
            f"goal <= 1.5x: {'met' if ok else 'MISSED'}"
        )
    write_result("resume_quick" if args.quick else "resume", {"results": results})


if __name__ == "__main__":
    main()
