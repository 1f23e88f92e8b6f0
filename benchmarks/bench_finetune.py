"""Benchmark: a LoRA fine-tune's saves (SPEC §13), against torch.save and PEFT's save_pretrained.

A frozen base of about 256 MiB (16 Linear layers of 2048x2048, fp32) under a PEFT LoRA adapter
of about 1% of it (rank 10 on every layer), AdamW on the adapter, a save every step for 20
saves. Per save: the bytes written and how long ``step()`` stalled (ckptd: the frozen base is
referred to, not copied, after the first save); against ``torch.save`` of the full state
(what a plain loop writes, and blocks on, every time) and PEFT's ``save_pretrained`` (the
adapter alone, without the optimizer or anything needed to resume). Then the time to resume
the newest checkpoint (verified, references followed) against ``torch.load`` of the full state.

Goals: the second and later saves write <= 1.2x the trainable state (adapter + its optimizer
moments) + 64 KiB, and stall <= 0.2x the first save.

    python benchmarks/bench_finetune.py [--layers 16] [--width 2048] [--saves 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import MiB, scratch, table, timed, write_result  # noqa: E402


def build(layers: int, width: int, rank: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model = get_peft_model(base, LoraConfig(r=rank, target_modules=[str(i) for i in range(layers)], lora_dropout=0.0))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, width: int) -> None:
    model(torch.randn(4, width)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def trainable_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())


def ckptd_run(work: Path, layers: int, width: int, rank: int, saves: int) -> dict[str, object]:
    from ckptd.disk.scan import scan
    from trainer_hooks import Checkpointer

    model, opt = build(layers, width, rank)
    ckpt = Checkpointer(
        "ft", work / "ckptd", model=model, optimizer=opt, every_steps=1, keep_last=2, socket=False, quiet=True
    )
    stalls, sizes = [], []
    for _ in range(saves):
        train_step(model, opt, width)
        before = ckpt.stats["stall_ns"]
        ckpt.step()
        ckpt.wait()
        stalls.append((ckpt.stats["stall_ns"] - before) / 1e9)
        sizes.append(os.path.getsize(ckpt.last_verified or ""))
    ckpt.close()
    kept = scan(str(work / "ckptd"), "ft")
    fresh, fresh_opt = build(layers, width, rank)
    again = Checkpointer(
        "ft", work / "ckptd", model=fresh, optimizer=fresh_opt, socket=False, save_final=False, quiet=True
    )
    resume = timed(again.resume)
    again.close(final=False)
    return {
        "stall": stalls,
        "bytes": sizes,
        "trainable_bytes": trainable_bytes(model, opt),
        "kept_files": len(kept),
        "kept_bytes": sum(c.bytes for c in kept),
        "resume_s": resume,
    }


def baselines(work: Path, layers: int, width: int, rank: int, reps: int) -> dict[str, object]:
    model, opt = build(layers, width, rank)
    train_step(model, opt, width)
    full = work / "full.pt"
    torch_save = [
        timed(lambda: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, full))
        for _ in range(reps)
    ]
    peft = [timed(lambda: model.save_pretrained(work / "peft")) for _ in range(reps)]
    peft_bytes = sum(f.stat().st_size for f in (work / "peft").iterdir())
    load = timed(lambda: torch.load(full, weights_only=True))
    return {
        "torch_save_s": torch_save,
        "torch_save_bytes": full.stat().st_size,
        "peft_s": peft,
        "peft_bytes": peft_bytes,
        "torch_load_s": load,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smoke run: a 16 MiB base, 5 saves")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.rank, args.saves = 4, 1024, 5, 5
    work = Path(tempfile.mkdtemp(dir=scratch()))
    try:
        ours = ckptd_run(work, args.layers, args.width, args.rank, args.saves)
        base = baselines(work, args.layers, args.width, args.rank, reps=3 if args.quick else 5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, ours, base)


def report(args: argparse.Namespace, ours: dict, base: dict) -> None:  # type: ignore[type-arg]
    first_stall, later_stall = ours["stall"][0], statistics.median(ours["stall"][1:])
    later_bytes = max(ours["bytes"][1:])
    goal_bytes = 1.2 * ours["trainable_bytes"] + 64 * 1024
    torch_save = statistics.median(base["torch_save_s"])
    rows = [
        ["ckptd, first save", f"{ours['bytes'][0] / MiB:.1f} MiB", f"{first_stall * 1e3:.1f} ms", "1.00x"],
        [
            "ckptd, later saves (max bytes, median stall)",
            f"{later_bytes / MiB:.2f} MiB",
            f"{later_stall * 1e3:.2f} ms",
            f"{later_stall / first_stall:.3f}x",
        ],
        [
            "torch.save, full state (every save)",
            f"{base['torch_save_bytes'] / MiB:.1f} MiB",
            f"{torch_save * 1e3:.1f} ms",
            f"{torch_save / first_stall:.2f}x",
        ],
        [
            "PEFT save_pretrained (adapter only)",
            f"{base['peft_bytes'] / MiB:.2f} MiB",
            f"{statistics.median(base['peft_s']) * 1e3:.1f} ms",
            "-",
        ],
    ]
    print(
        table(
            f"LoRA fine-tune: {args.layers}x{args.width}^2 frozen base, rank {args.rank}, {args.saves} saves "
            "(stall ratio: against ckptd's first save)",
            ["save", "bytes written", "stall", "stall ratio"],
            rows,
        )
    )
    print(
        f"\nlater saves write {later_bytes / ours['trainable_bytes']:.3f}x the trainable state "
        f"({ours['trainable_bytes'] / MiB:.2f} MiB); goal <= 1.2x + 64 KiB: {'met' if later_bytes <= goal_bytes else 'MISSED'}"
    )
    print(
        f"later saves stall {later_stall / first_stall:.3f}x the first; goal <= 0.2x: "
        f"{'met' if later_stall <= 0.2 * first_stall else 'MISSED'}"
    )
    print(
        f"kept on disk with keep_last=2: {ours['kept_files']} files, {ours['kept_bytes'] / MiB:.1f} MiB "
        f"(the base once); resume {ours['resume_s']:.2f} s (verify + load, references followed) against "
        f"torch.load {base['torch_load_s']:.2f} s ({ours['resume_s'] / base['torch_load_s']:.2f}x)"
    )
    write_result(
        "finetune_quick" if args.quick else "finetune",
        {
            "layers": args.layers,
            "width": args.width,
            "rank": args.rank,
            "saves": args.saves,
            "ckptd": ours,
            "baselines": base,
            "later_bytes_over_trainable": later_bytes / ours["trainable_bytes"],
            "later_stall_over_first": later_stall / first_stall,
            "bytes_goal_met": later_bytes <= goal_bytes,
            "stall_goal_met": later_stall <= 0.2 * first_stall,
            "resume_over_torch_load": ours["resume_s"] / base["torch_load_s"],
        },
    )


if __name__ == "__main__":
    main()
