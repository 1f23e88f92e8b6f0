"""A fine-tune as the shared-bytes tests need it: a frozen two-layer base (about 2 MiB) under a
small trainable adapter, saving every step; deterministic, so a resumed run can be compared.

    python lora_train.py DIR STEPS [--step-sleep S] [--socket PATH] [--keep-last N]
"""

from __future__ import annotations

import argparse
import hashlib

import torch

from trainer_hooks import Checkpointer


class Adapted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(512, 4, bias=False)
        self.up = torch.nn.Linear(4, 512, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def build(seed: int = 0) -> tuple[Adapted, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Adapted()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("steps", type=int)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--socket", default=None)
    ap.add_argument("--keep-last", type=int, default=3)
    args = ap.parse_args()
    model, opt = build()
    ckpt = Checkpointer(
        "lora",
        args.dir,
        model=model,
        optimizer=opt,
        every_steps=1,
        keep_last=args.keep_last,
        socket=args.socket or False,
        reconnect_every=0.5,
        quiet=True,
    )
    start = ckpt.resume()
    for step in range(start, args.steps):  # the data of a step depends on the step alone: a resumed run is the same run
        x = torch.randn(16, 512, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step()
        if args.step_sleep:
            import time

            time.sleep(args.step_sleep)
    ckpt.close()
    print(f"FINGERPRINT {fingerprint(model)} from {start}", flush=True)


if __name__ == "__main__":
    main()
