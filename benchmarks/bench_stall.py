"""Benchmark 1: how long training stalls per save, against the memcpy floor.

For model + AdamW states of several sizes, the time the training thread is blocked by
one save: ckptd with the daemon and embedded (``step()`` when a save is due), torch.save,
safetensors.save_file, torch.distributed.checkpoint.async_save (its blocking part), and
the physical floor: one memcpy of the same tensors into a pre-faulted buffer.
ckptd's first save is reported apart: its shared-memory buffer is reserved (allocated and
mapped) in the background from construction, which this benchmark lets finish, as the
training steps before a first save would.

With ``--device cuda`` the state lives on the GPU and the floor is a device-to-host copy
into page-locked memory (``pin_memory=True``); a copy into pageable memory is listed beside
it, and the name of the GPU is recorded with the results (``stall_cuda.json``).

    python benchmarks/bench_stall.py [--sizes 64,512,2048] [--reps 5] [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Daemon,
    MiB,
    Series,
    plot_bars,
    scratch,
    table,
    timed,
    write_result,
)

DEVICE = "cpu"
ROWS = (64, 1024, 4096)  # input rows of the training step timed beside an overlapped copy: a short step and a long one
LONG_STEP = 5.0  # seconds: longer steps are not timed (a 1024-row step of a 2 GiB state takes minutes here); the
# step's time per byte of state does not depend on the size (the same layers), so smaller states show them


def make_state(total_mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers whose params + AdamW's two moments add up to ``total_mib``."""
    params = total_mib * MiB // 3 // 4
    width = 1024
    layers = max(1, params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width, device=DEVICE)).sum().backward()
    opt.step()
    return model, opt


def all_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(model.state_dict().values()) + [
        t for s in opt.state_dict()["state"].values() for t in s.values() if isinstance(t, torch.Tensor)
    ]


def floor(tensors: list[torch.Tensor], reps: int, pinned: bool = False) -> Series:
    """One copy of the tensors into memory that is already there: the physical floor of a snapshot
    (on a GPU: page-locked, "pinned D2H floor"; ``pinned=False`` there gives the pageable copy)."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    dst = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    dst.fill_(0)  # pre-fault
    s = Series("memcpy floor" if DEVICE == "cpu" else "pinned D2H floor" if pinned else "pageable D2H")

    def copy() -> None:
        off = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            dst[off : off + n].view(t.dtype).view(t.shape).copy_(t, non_blocking=pinned)
            off += n
        sync()

    for _ in range(reps):
        sync()
        s.samples.append(timed(copy))
    return s


def sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def ckptd_stall(
    model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int, directory: Path, socket: str | bool
) -> tuple[Series, float]:
    from trainer_hooks import Checkpointer

    ckpt = Checkpointer(
        "bench",
        directory,
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=1,
        socket=socket,
        save_final=False,
        preempt_signals=(),
    )
    try:
        ckpt._buffer.join()  # training runs while the buffer is reserved; a first save comes steps later
        sync()
        first = timed(ckpt.step)
        ckpt.wait()
        s = Series("ckptd daemon" if socket else "ckptd embedded")
        for _ in range(reps):
            sync()
            s.samples.append(timed(ckpt.step))
            ckpt.wait()
        assert ckpt.stats["failed"] == 0, ckpt.last_error
    finally:
        ckpt.close(final=False)
    return s, first


def overlap_stall(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    reps: int,
    directory: Path,
    daemon: Daemon,
    rows: tuple[int, ...],
) -> tuple[Series, dict[str, Any]]:
    """snapshot="overlap": what step() blocks, and what the training step that runs beside the copy
    costs. That step (forward, backward, then the optimizer's step, whose pre-hook waits for the copy
    if it is not done) is timed with the daemon stopped (SIGSTOP, SIGCONT once the step is done),
    so the persist that follows every save in any mode (hash, write, verify) is not beside it, and
    compared with the same step alone, for a short step and a long one (``rows`` of input)."""
    import signal

    ckpt = _checkpointer(model, opt, directory, daemon.socket, "overlap")
    series = Series("ckptd overlap (daemon)")
    out: dict[str, Any] = {}
    try:
        ckpt._buffer.join()
        ckpt.step()
        ckpt.wait()
        for n in rows:
            x = torch.randn(n, 1024, device=DEVICE)
            if out and out[str(rows[0])]["step_alone"] * n / rows[0] > LONG_STEP:
                break
            alone = [timed(lambda: train_step(model, opt, x)) for _ in range(reps)]
            beside, stalls = [], []
            for _ in range(reps):
                sync()
                daemon.proc.send_signal(signal.SIGSTOP)
                try:
                    stalls.append(timed(ckpt.step))
                    beside.append(timed(lambda: train_step(model, opt, x)))
                finally:
                    daemon.proc.send_signal(signal.SIGCONT)
                ckpt.wait()
            series.samples += stalls if n == rows[0] else []
            out[str(n)] = {
                "step_alone": statistics.median(alone),
                "step_beside_copy": statistics.median(beside),
                "slowdown": statistics.median(beside) / statistics.median(alone) - 1,
                "stall": statistics.median(stalls),
            }
        assert ckpt.stats["failed"] == 0, ckpt.last_error
    finally:
        ckpt.close(final=False)
    return series, out


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()


def persist_beside(
    model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int, directory: Path, socket: str, rows: int
) -> dict[str, float]:
    """The training step right after a save with the daemon running: beside the copy and then the
    persist (overlap), or the persist alone (host, whose copy was in step()), against the step alone."""
    x = torch.randn(rows, 1024, device=DEVICE)
    out: dict[str, float] = {}
    for mode in ("overlap", "host"):
        ckpt = _checkpointer(model, opt, directory / mode, socket, mode)
        try:
            ckpt._buffer.join()
            ckpt.step()
            ckpt.wait()
            alone = [timed(lambda: train_step(model, opt, x)) for _ in range(reps)]
            beside = []
            for _ in range(reps):
                ckpt.step()
                beside.append(timed(lambda: train_step(model, opt, x)))
                ckpt.wait()
            assert ckpt.stats["failed"] == 0, ckpt.last_error
        finally:
            ckpt.close(final=False)
        out[f"beside_{mode}"] = statistics.median(beside) / statistics.median(alone)
    return out


def _checkpointer(
    model: torch.nn.Module, opt: torch.optim.Optimizer, directory: Path, socket: str | bool, snapshot: str
) -> Any:
    from trainer_hooks import Checkpointer

    return Checkpointer(
        "bench",
        directory,
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=1,
        socket=socket,
        save_final=False,
        preempt_signals=(),
        snapshot=snapshot,
        quiet=True,
    )


def baseline(name: str, fn, reps: int) -> Series:  # type: ignore[no-untyped-def]
    s = Series(name)
    for _ in range(reps):
        s.samples.append(timed(fn))
    return s


def dcp_stall(model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int, directory: Path) -> Series:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    store = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        s = Series("dcp async_save")
        for i in range(reps + 1):
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            fut = None

            def start() -> None:
                nonlocal fut
                fut = dcp.async_save(sd, checkpoint_id=str(directory / f"dcp{i}"))

            t = timed(start)
            fut.result()  # type: ignore[union-attr]
            if i:  # the first call also builds DCP's machinery
                s.samples.append(t)
            shutil.rmtree(directory / f"dcp{i}", ignore_errors=True)
        return s
    finally:
        dist.destroy_process_group()


def run(size_mib: int, reps: int, daemon: Daemon) -> dict:
    from safetensors.torch import save_file

    model, opt = make_state(size_mib)
    tensors = all_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    work = scratch()
    try:
        res = [floor(tensors, reps, pinned=DEVICE != "cpu")] + ([floor(tensors, reps)] if DEVICE != "cpu" else [])
        d_series, d_first = ckptd_stall(model, opt, reps, daemon.root / f"s{size_mib}", daemon.socket)
        e_series, e_first = ckptd_stall(model, opt, reps, work / "embedded", False)
        o_series, overlap = overlap_stall(model, opt, reps, daemon.root / f"o{size_mib}", daemon, ROWS)
        persist = persist_beside(model, opt, reps, daemon.root / f"p{size_mib}", daemon.socket, ROWS[0])
        res += [d_series, e_series, o_series]
        res.append(
            baseline(
                "torch.save",
                lambda: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, work / "t.pt"),
                reps,
            )
        )
        flat = {f"t{i}": t.contiguous() for i, t in enumerate(tensors)}
        res.append(baseline("safetensors.save_file", lambda: save_file(flat, str(work / "s.safetensors")), reps))
        res.append(dcp_stall(model, opt, reps, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = res[0].median
    return {
        "size_mib": size_mib,
        "bytes": nbytes,
        "floor": base,
        "first_save": {"ckptd daemon": d_first, "ckptd embedded": e_first},
        "overlap": overlap,
        "step_after_save": persist,
        "series": {s.name: {**s.summary(), "ratio_to_floor": s.median / base} for s in res},
    }


def overlap_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        floor_s, host = r["floor"], r["series"]["ckptd daemon"]["median"]
        for n, o in r["overlap"].items():
            extra = o["step_beside_copy"] - o["step_alone"]
            rows.append(
                [
                    f"{r['size_mib']} MiB",
                    n,
                    f"{o['step_alone'] * 1000:.1f}",
                    f"{o['step_alone'] / floor_s:.1f}x",
                    f"{o['stall'] / floor_s:.3f}x",
                    f"{100 * o['slowdown']:+.1f}%",
                    f"{(o['stall'] + extra) / floor_s:.2f}x",
                    f"{host / floor_s:.2f}x",
                ]
            )
        p = r["step_after_save"]
        rows.append(
            [
                f"{r['size_mib']} MiB",
                f"{ROWS[0]} (daemon running)",
                "",
                "",
                "",
                f"{100 * (p['beside_overlap'] - 1):+.0f}% (copy + persist)",
                "",
                f"{100 * (p['beside_host'] - 1):+.0f}% (persist)",
            ]
        )
    return table(
        f"snapshot='overlap' on {DEVICE}: the training step beside the copy (daemon stopped: no persist "
        "beside it), against the step alone; cost = stall + the step's extra time (x the floor); "
        f"goals: stall <= {0.25 if DEVICE == 'cpu' else 0.2}x the floor, step slowed <= +10%",
        ["state", "input rows", "step ms", "step/floor", "stall", "step beside copy", "overlap cost", "host stall"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 MiB, 2 reps")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    sizes = [8] if args.quick else [int(x) for x in args.sizes.split(",")]
    global ROWS
    ROWS = (64, 256) if args.quick else ROWS
    reps = 2 if args.quick else args.reps
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    # 170 bare linear layers (2 GiB) shrink activations and gradients into subnormal floats, which x86
    # computes with a hundredfold slowdown: a 64-row step took 18 s and hid every other cost beside it
    torch.set_flush_denormal(True)
    daemon = Daemon(scratch())
    try:
        results = [run(size, reps, daemon) for size in sizes]
    finally:
        daemon.stop()
        shutil.rmtree(daemon.base, ignore_errors=True)
    rows = []
    for r in results:
        for name, s in r["series"].items():
            rows.append(
                [
                    f"{r['size_mib']} MiB",
                    name,
                    f"{s['median'] * 1000:.1f}",
                    f"{s['min'] * 1000:.1f}",
                    f"{s['max'] * 1000:.1f}",
                    f"{s['ratio_to_floor']:.2f}x",
                ]
            )
        for name, t in r["first_save"].items():
            rows.append(
                [f"{r['size_mib']} MiB", f"{name} (first save)", f"{t * 1000:.1f}", "", "", f"{t / r['floor']:.2f}x"]
            )
    print(
        table(
            f"Training stall per save on {DEVICE} (ms; ratio to the floor; medians of {reps} saves, second save on)",
            ["state", "method", "median", "min", "max", "vs floor"],
            rows,
        )
    )
    print(overlap_table(results))
    name = ("stall_quick" if args.quick else "stall") + ("" if DEVICE == "cpu" else "_cuda")
    gpu = torch.cuda.get_device_name() if DEVICE != "cpu" else None
    print("wrote", write_result(name, {"reps": reps, "device": DEVICE, "gpu": gpu, "results": results}))
    plot_bars(
        name,
        "Training stall per save (ratio to memcpy floor, lower is better)",
        {f"{r['size_mib']} MiB": {k: v["ratio_to_floor"] for k, v in r["series"].items()} for r in results},
        "x memcpy floor",
    )


if __name__ == "__main__":
    main()
