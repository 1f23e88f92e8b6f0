"""Shared pieces of the benchmarks: timing, tables, JSON results, plots, a daemon.

Every benchmark measures ckptd and its baselines in the same run and reports ratios:
these machines are noisy, absolute times are not comparable between runs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
# Where results and scratch space go: the repository by default, a test's own directory when
# CKPTD_BENCH_RESULTS / CKPTD_BENCH_DIR say so (tests write nowhere but their temporary directories).
RESULTS = Path(os.environ.get("CKPTD_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
MiB = 1 << 20


@dataclass
class Series:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def summary(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples), "n": len(self.samples)}


def project_env(**extra: str) -> dict[str, str]:
    """This environment for a subprocess of the project: the project first on ``PYTHONPATH``,
    then what the caller's already had (packages found only through it must still import)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *inherited]), **extra}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "time": time.time(), **data}, indent=2))
    return path


def plot_bars(name: str, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path | None:
    """groups: {x label: {series: value}} -> grouped bar chart PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(groups)
    series = sorted({s for g in groups.values() for s in g})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        ax.bar([x + i * width for x in range(len(labels))], [groups[g].get(s, 0) for g in labels], width, label=s)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Daemon:
    """A real ``ckptd serve`` for a benchmark run."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "roots"
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket = str(base / "ckptd.sock")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ckptd.cli",
                "serve",
                "--socket",
                self.socket,
                "--state-dir",
                str(base / "state"),
                "--metrics-listen",
                f"127.0.0.1:{self.port}",
                "--root",
                str(self.root),
                "--log-level",
                "WARNING",
            ],
            env=project_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("daemon did not start")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def free_port() -> int:
    """A free loopback port (torchrun's default 29500 lets only one job run at a time). The test
    suite hands its smoke runs ports in ``CKPTD_BENCH_PORTS`` (see ``free_port`` in
    tests/conftest.py: a port the kernel picks can be taken by a parallel worker's connection
    before a slow-starting server binds it)."""
    given = _GIVEN_PORTS.pop(0) if _GIVEN_PORTS else None
    if given is not None:
        return given
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_GIVEN_PORTS = [int(p) for p in os.environ.get("CKPTD_BENCH_PORTS", "").split(",") if p.strip()]


def scratch() -> Path:
    """A work directory on the same filesystem as the repository (not a tmpfs /tmp)."""
    base = Path(os.environ.get("CKPTD_BENCH_DIR") or ROOT / "benchmarks" / ".scratch")
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))


def on_moto(name: str, run: Callable[[Path, Any], dict[str, Any]]) -> None:
    """``run(work, server)`` against a loopback S3 server (moto, the same real server the tests
    use) in a scratch directory, with fake credentials unless some are set; its result written
    as ``name``."""
    for k, v in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    from tests.conftest import MotoServer

    work = scratch()
    server = MotoServer(work).start()
    try:
        results = run(work, server)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_result(name, results)
    print(f"results: {RESULTS / (name + '.json')}")
