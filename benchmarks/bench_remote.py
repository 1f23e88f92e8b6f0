"""The remote tier: replication throughput and lag against the plain ways to copy a file (issue 15).

Baselines, measured in the same run on the same file: boto3's own ``upload_file`` (the same
managed transfer: multipart, parallel parts) to a loopback S3 server (moto in server mode),
and a plain copy (``shutil.copyfile`` + fsync) to a ``file://`` directory. ckptd's
replication does more than either: it uploads with a SHA-256 per part, compares S3's own
checksum of what it received with the local file's (a ``file://`` copy is streamed back and
every tensor's digest checked instead), then writes the commit object. Reported: throughput ratios, medians
of ``--reps``; and the replication lag (saved locally -> verified remotely) at p50/p99 for a
run that saves every ``--every`` seconds, through ckptd's ``Uploader``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MiB, on_moto, table, timed  # noqa: E402


def make_checkpoint(directory: Path, mib: int, step: int = 1) -> str:
    import torch

    from ckptd.disk.persist import persist
    from trainer_hooks._snapshot.staging import StagingBuffer

    tensors = {f"layer{i}": torch.randn(mib * MiB // 4 // 8) for i in range(8)}
    meta = {
        "ckptd.format": "1",
        "ckptd.job": "bench",
        "ckptd.step": str(step),
        "ckptd.created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "ckptd.trigger": "step",
    }
    buf = StagingBuffer()
    try:
        length = buf.stage(tensors, meta)
        return persist(buf.fd, length, str(directory), f"bench-step{step:08d}.safetensors").path
    finally:
        buf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--saves", type=int, default=12, help="saves in the lag run")
    ap.add_argument("--lag-mib", type=int, default=64)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between saves in the lag run")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.mib, a.reps, a.saves, a.lag_mib, a.every = 16, 1, 3, 4, 0.5
    on_moto("remote_quick" if a.quick else "remote", lambda work, server: run(a, work, server))


def run(a: argparse.Namespace, work: Path, server: object) -> dict[str, object]:
    from boto3.s3.transfer import TransferConfig

    from ckptd.remote.stores import open_store
    from ckptd.remote.upload import replicate

    endpoint = server.endpoint  # type: ignore[attr-defined]
    client = server.client()  # type: ignore[attr-defined]
    client.create_bucket(Bucket="bench")
    local = work / "local"
    local.mkdir()
    path = make_checkpoint(local, a.mib)
    size = os.path.getsize(path)
    s3 = open_store("s3://bench/ckptd", endpoint)
    shared = Path(tempfile.mkdtemp(dir=work))
    files = open_store(f"file://{shared}")
    config = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)
    series: dict[str, list[float]] = {
        "boto3 upload_file": [],
        "ckptd s3 (upload+verify+commit)": [],
        "plain copy + fsync": [],
        "ckptd file:// (copy+verify+commit)": [],
    }
    for rep in range(a.reps):
        series["boto3 upload_file"].append(
            timed(lambda: client.upload_file(path, "bench", f"plain/{rep}", Config=config))
        )
        series["ckptd s3 (upload+verify+commit)"].append(timed(lambda: replicate(s3, f"job{rep}", path)))
        series["plain copy + fsync"].append(timed(lambda: _copy(path, shared / f"plain{rep}")))
        series["ckptd file:// (copy+verify+commit)"].append(timed(lambda: replicate(files, f"job{rep}", path)))
        client.delete_object(Bucket="bench", Key=f"plain/{rep}")
    med = {k: statistics.median(v) for k, v in series.items()}
    rows = [[k, f"{size / MiB / med[k]:.0f} MiB/s", f"{med[k]:.2f} s"] for k in series]
    s3_ratio = med["boto3 upload_file"] / med["ckptd s3 (upload+verify+commit)"]
    file_ratio = med["plain copy + fsync"] / med["ckptd file:// (copy+verify+commit)"]
    print(
        table(
            f"Replicating a {a.mib} MiB checkpoint (medians of {a.reps}); ckptd also verifies the copy (S3: its "
            "SHA-256 of what it received; file://: read back, every tensor)",
            ["", "throughput", "time"],
            rows,
        )
    )
    print(f"ckptd s3 / boto3 upload_file: {s3_ratio:.2f}x   ckptd file:// / plain copy: {file_ratio:.2f}x")
    lags = lag_run(a, work, endpoint)
    p = statistics.quantiles(lags, n=100, method="inclusive") if len(lags) > 1 else lags * 99
    print(f"replication lag, {a.saves} saves of {a.lag_mib} MiB every {a.every:g}s: p50 {p[49]:.2f}s, p99 {p[98]:.2f}s")
    return {
        "mib": a.mib,
        "bytes": size,
        "reps": a.reps,
        "series": series,
        "medians": med,
        "ratio_s3_vs_upload_file": s3_ratio,
        "ratio_file_vs_copy": file_ratio,
        "lag": {"saves": a.saves, "mib": a.lag_mib, "every": a.every, "samples": lags, "p50": p[49], "p99": p[98]},
    }


def _copy(src: str, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def lag_run(a: argparse.Namespace, work: Path, endpoint: str) -> list[float]:
    """Saved locally -> verified remotely, for a run that saves every ``a.every`` seconds."""
    from ckptd.core.settings import Settings
    from ckptd.remote.uploader import Upload, Uploader

    done: dict[str, float] = {}
    finished = threading.Event()

    def on_done(u: Upload, commit: object, remote: object) -> None:
        done[u.path] = time.time() - u.created
        if len(done) == a.saves:
            finished.set()

    directory = work / "lagrun"
    directory.mkdir()
    settings = Settings(remote="s3://bench/lag", remote_endpoint=endpoint, remote_keep_last=3)
    rep = Uploader(on_done=on_done)
    try:
        for i in range(a.saves):
            t0 = time.time()
            path = make_checkpoint(directory, a.lag_mib, step=i + 1)
            rep.submit(Upload("bench", path, settings, created=time.time()))
            time.sleep(max(0.0, a.every - (time.time() - t0)))
        finished.wait(600)
    finally:
        rep.close(timeout=60)
    return sorted(done.values())


if __name__ == "__main__":
    main()
