"""Benchmark 5: the daemon under load: many clients saving 16 MiB states at once.

Each client is a real protocol client (its own connection, its own memfd) in a thread
of this process, so the daemon sees N concurrent trainers. Reports throughput,
p50/p99 latency from "save sent" to "verified" reply, checkpoints lost (must be 0)
and the daemon's CPU use.

    python benchmarks/bench_load.py [--clients 64] [--saves 4] [--mib 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Daemon, MiB, scratch, table, write_result  # noqa: E402
from ckptd.core.format import DIGEST_PLACEHOLDER, encode_header, layout  # noqa: E402
from ckptd.wire import protocol  # noqa: E402


def image(job: str, step: int, payload: bytes) -> bytes:
    entries = layout([("w", "U8", (len(payload),))])
    meta = {
        "ckptd.format": "1",
        "ckptd.job": job,
        "ckptd.step": str(step),
        "ckptd.digests": json.dumps({"w": DIGEST_PLACEHOLDER}, separators=(",", ":")),
        "ckptd.meta_digest": DIGEST_PLACEHOLDER,
    }
    return encode_header(entries, meta) + payload


def client(d: Daemon, i: int, saves: int, payload: bytes, latencies: list[float], errors: list[str]) -> None:
    job = f"load{i}"
    directory = d.root / job
    directory.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    fd = protocol.snapshot_memfd(job)
    try:
        protocol.send(
            s,
            {
                "type": "hello",
                "job": job,
                "directory": str(directory),
                "settings": {"keep_last": 2},
                "pid": os.getpid(),
                "step": 0,
            },
        )
        assert protocol.recv(s)[0]["type"] == "welcome"
        for step in range(1, saves + 1):
            img = image(job, step, payload)
            os.ftruncate(fd, len(img))
            os.pwrite(fd, img, 0)
            t0 = time.perf_counter()
            protocol.send(
                s,
                {
                    "type": "save",
                    "id": step,
                    "step": step,
                    "trigger": "step",
                    "rule": "bench",
                    "filename": f"{job}-step{step:08d}.safetensors",
                    "length": len(img),
                },
                fd=fd,
            )
            while True:
                msg, _ = protocol.recv(s)
                if msg["type"] == "saved":
                    break
            latencies.append(time.perf_counter() - t0)
            if not msg["ok"]:
                errors.append(f"{job} step {step}: {msg.get('error')}")
        protocol.send(s, {"type": "end", "step": saves})
        protocol.recv(s)
    finally:
        os.close(fd)
        s.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    clients, saves, mib = (8, 2, 1) if args.quick else (args.clients, args.saves, args.mib)
    payload = os.urandom(mib * MiB)
    d = Daemon(scratch())
    latencies: list[float] = []
    errors: list[str] = []
    try:
        cpu0, t0 = cpu_seconds(d.proc.pid), time.perf_counter()
        threads = [
            threading.Thread(target=client, args=(d, i, saves, payload, latencies, errors)) for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - t0, cpu_seconds(d.proc.pid) - cpu0
        from ckptd.disk.scan import scan
        from ckptd.disk.verify import verify_file

        kept = [c for i in range(clients) for c in scan(str(d.root / f"load{i}"), f"load{i}")]
        lost = sum(
            1
            for i in range(clients)
            if [c.step for c in scan(str(d.root / f"load{i}"), f"load{i}")] != list(range(max(1, saves - 1), saves + 1))
        )
        corrupt = sum(not verify_file(c.path).ok for c in kept)
    finally:
        d.stop()
        shutil.rmtree(d.base, ignore_errors=True)
    lat = sorted(latencies)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    total = clients * saves
    print(
        table(
            f"Daemon under load: {clients} clients x {saves} saves of {mib} MiB",
            ["saves", "MiB/s", "p50 ms", "p99 ms", "lost", "corrupt", "failed", "daemon CPU"],
            [
                [
                    total,
                    f"{total * mib / wall:.0f}",
                    f"{p50 * 1000:.0f}",
                    f"{p99 * 1000:.0f}",
                    lost,
                    corrupt,
                    len(errors),
                    f"{cpu / wall * 100:.0f}%",
                ]
            ],
        )
    )
    write_result(
        "load_quick" if args.quick else "load",
        {
            "clients": clients,
            "saves": saves,
            "mib": mib,
            "wall_s": wall,
            "throughput_mib_s": total * mib / wall,
            "p50_s": p50,
            "p99_s": p99,
            "lost": lost,
            "corrupt": corrupt,
            "failed": len(errors),
            "daemon_cpu_fraction": cpu / wall,
        },
    )
    if lost or corrupt or errors:
        sys.exit(f"LOST {lost}, CORRUPT {corrupt}, FAILED {errors[:3]}")


if __name__ == "__main__":
    main()
