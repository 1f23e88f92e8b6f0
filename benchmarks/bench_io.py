"""Benchmarks 2 and 3: persist and verify throughput against the disk's own limits.

Persist (hash + write + fsync of a staged snapshot) against
``dd if=/dev/zero of=FILE bs=16M oflag=direct conv=fsync`` of the same size on the same
filesystem; verify (re-read every tensor + xxh3) against a plain sequential read of the
file plus xxh3 over it, page cache dropped for both (POSIX_FADV_DONTNEED). Also the peak
RSS of a process verifying a large checkpoint (streamed: it must not hold the file).

    python benchmarks/bench_io.py [--size-mib 1024] [--rss-mib 4096] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash  # noqa: E402

from benchmarks.common import MiB, Series, project_env, scratch, table, timed, write_result  # noqa: E402


def staged(size_mib: int):  # type: ignore[no-untyped-def]
    import torch

    from trainer_hooks._snapshot.staging import StagingBuffer

    buf = StagingBuffer()
    tensors = {f"t{i}": torch.randn(size_mib * MiB // 4 // 8) for i in range(8)}
    meta = {"ckptd.format": "1", "ckptd.job": "bench", "ckptd.step": "1"}
    return buf, buf.stage(tensors, meta), tensors, meta


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_and_hash(path: Path) -> None:
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rss-mib", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size, rss_size, reps = (32, 64, 2) if args.quick else (args.size_mib, args.rss_mib, args.reps)
    from ckptd.disk.persist import persist
    from ckptd.disk.verify import verify_file

    work = scratch()
    try:
        buf, length, tensors, meta = staged(size)
        p_total, p_write, dd, ver, raw = (
            Series(n) for n in ("ckptd persist+verify", "ckptd persist", "dd direct+fsync", "ckptd verify", "read+xxh3")
        )
        for i in range(reps):
            result = persist(buf.fd, length, str(work), f"c{i}.safetensors")
            p_total.samples.append(sum(result.durations.values()))
            p_write.samples.append(result.durations["persist"])
            dd.samples.append(
                timed(
                    lambda: subprocess.run(
                        [
                            "dd",
                            "if=/dev/zero",
                            f"of={work / 'dd.bin'}",
                            "bs=16M",
                            f"count={max(1, length // (16 * MiB))}",
                            "oflag=direct",
                            "conv=fsync",
                        ],
                        check=True,
                        capture_output=True,
                    )
                )
            )
            path = work / f"c{i}.safetensors"
            # cold reads, on a quiet disk (dd's writeback settled), alternating which goes first
            pair = [(ver, lambda: verify_file(path)), (raw, lambda: read_and_hash(path))]
            for series, fn in pair if i % 2 == 0 else pair[::-1]:
                os.sync()
                time.sleep(1.0)
                drop_cache(path)
                series.samples.append(timed(fn))
            os.unlink(path)
        buf.close()
        dd_bytes = max(1, length // (16 * MiB)) * 16 * MiB
        tput = {
            s.name: (length if s is not dd else dd_bytes) / s.median / MiB for s in (p_total, p_write, dd, ver, raw)
        }
        rss = verify_rss(work, rss_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        [
            s.name,
            f"{s.median * 1000:.0f}",
            f"{min(s.samples) * 1000:.0f}",
            f"{max(s.samples) * 1000:.0f}",
            f"{tput[s.name]:.0f}",
        ]
        for s in (p_write, p_total, dd, ver, raw)
    ]
    print(
        table(
            f"Persist and verify of a {size} MiB checkpoint (ms, MiB/s; medians of {reps})",
            ["what", "median", "min", "max", "MiB/s"],
            rows,
        )
    )
    persist_ratio = tput["ckptd persist"] / tput["dd direct+fsync"]
    verify_ratio = tput["ckptd verify"] / tput["read+xxh3"]
    print(f"persist throughput vs dd: {persist_ratio:.2f}x (target >= 0.8x)")
    print(f"verify throughput vs read+xxh3: {verify_ratio:.2f}x (target >= 0.7x)")
    print(f"peak RSS verifying a {rss_size} MiB checkpoint: {rss / MiB:.0f} MiB (target <= 300 MiB)")
    write_result(
        "io_quick" if args.quick else "io",
        {
            "size_mib": size,
            "reps": reps,
            "throughput_mib_s": tput,
            "persist_vs_dd": persist_ratio,
            "verify_vs_read_xxh3": verify_ratio,
            "verify_peak_rss_bytes": rss,
            "verify_rss_file_mib": rss_size,
            "series": {s.name: s.summary() for s in (p_total, p_write, dd, ver, raw)},
        },
    )


def verify_rss(work: Path, size_mib: int) -> int:
    """Write a big checkpoint chunk by chunk, then verify it in a fresh process; its max RSS."""
    from ckptd.core.format import encode_header, layout

    n = 64
    per = size_mib * MiB // n // 4
    entries = layout([(f"t{i}", "F32", (per,)) for i in range(n)])
    import json

    meta = {"ckptd.format": "1", "ckptd.job": "rss", "ckptd.step": "1"}
    digest = xxhash.xxh3_64_hexdigest(b"\0" * (per * 4))
    meta["ckptd.digests"] = json.dumps({e.name: digest for e in entries}, separators=(",", ":"))
    from ckptd.core.format import meta_digest

    meta["ckptd.meta_digest"] = meta_digest(meta)
    path = work / "big.safetensors"
    with open(path, "wb") as f:
        f.write(encode_header(entries, meta))
        f.truncate(f.tell() + per * 4 * n)  # zero tensors (sparse): reading them is the cost
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (torch-sized) parent
    code = (
        "import sys; from ckptd.disk.verify import verify_file; r = verify_file(sys.argv[1]); assert r.ok, r.reason; "
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, env=project_env()
    )
    return int(out.stdout.strip())


if __name__ == "__main__":
    main()
