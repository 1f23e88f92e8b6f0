"""Benchmark 6: watch mode: startup scan of a large tree, and completion-to-verified latency.

python benchmarks/bench_watch.py [--files 10000] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import free_port, project_env, scratch, table, timed, write_result  # noqa: E402


def make_tree(root: Path, n: int, per_dir: int = 1000) -> None:
    import numpy as np
    from safetensors.numpy import save

    blob = save({"w": np.ones(16, dtype=np.float32)})
    for i in range(n):
        d = root / f"run{i // per_dir}"
        d.mkdir(exist_ok=True)
        (d / f"model-step{i}.safetensors").write_bytes(blob)


def verified(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "ckptd_verify_total" and s.labels.get("outcome") == "ok":
                return float(s.value)
    return 0.0


def stable(port: int) -> float:
    """The verified count once it stopped moving (nothing else is being adopted)."""
    last = verified(port)
    while True:
        time.sleep(1.5)
        now = verified(port)
        if now == last:
            return now
        last = now


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flat", action="store_true", help="every file in one directory (the walk was quadratic there)")
    args = ap.parse_args()
    n = 300 if args.quick else args.files

    work = scratch()
    try:
        tree = work / "tree"
        tree.mkdir()
        make_tree(tree, n, per_dir=n if args.flat else 1000)
        from ckptd.core.config import WatchSpec
        from ckptd.daemon.watch import Context, Watcher

        # the walk needs no catalogue or ledger: only the classification is timed here
        w = Watcher(WatchSpec(str(tree)), Context(None, None, [], 0.0, time.time), lambda _: None)  # type: ignore[arg-type]
        scan_s = timed(w._units)
        found = len(w._units())
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ckptd.cli",
                "watch",
                str(tree),
                "--settle",
                "0.2s",
                "--metrics-listen",
                f"127.0.0.1:{port}",
                "--socket",
                str(work / "w.sock"),
                "--state-dir",
                str(work / "state"),
            ],
            env=project_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            t0 = time.perf_counter()
            while not (work / "w.sock").exists():
                time.sleep(0.02)
            while verified(port) < n:
                time.sleep(0.1)
            adopt_s = time.perf_counter() - t0
            lat = []
            for i in range(5):
                base = stable(port)
                t1 = time.perf_counter()
                with open(tree / f"new-step{10**6 + i}.safetensors", "wb") as f:
                    f.write((tree / "run0" / "model-step0.safetensors").read_bytes())
                while verified(port) < base + 1:
                    time.sleep(0.01)
                lat.append(time.perf_counter() - t1)
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = sorted(lat)[len(lat) // 2]
    print(
        table(
            f"Watch mode over {n} checkpoint files",
            ["what", "seconds"],
            [
                ["startup walk + classify", f"{scan_s:.2f}"],
                ["startup: all adopted and verified", f"{adopt_s:.2f}"],
                ["new file closed -> verified (median of 5, settle=0.2s)", f"{med:.2f}"],
            ],
        )
    )
    print(f"files classified: {found}; startup walk target: {n} files in < 10 s")
    write_result(
        "watch_quick" if args.quick else "watch_flat" if args.flat else "watch",
        {
            "flat": args.flat,
            "files": n,
            "scan_s": scan_s,
            "adopt_all_s": adopt_s,
            "completion_to_verified_s": lat,
            "settle_s": 0.2,
        },
    )


if __name__ == "__main__":
    main()
