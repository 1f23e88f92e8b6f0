"""ckptd in a plain Hugging Face Accelerate loop: ``Checkpointer`` on the unwrapped model.

``accelerator.prepare`` wraps the model (DDP, FSDP, mixed precision...); ckptd saves the
module underneath (``accelerator.unwrap_model``) with the prepared optimizer and
scheduler, so a checkpoint is the same whether the run had one process or eight.
Resuming mid-epoch skips the batches already seen (``skip_first_batches``).

    python examples/accelerate_train.py --dir /tmp/accel --steps 40
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from trainer_hooks import Checkpointer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    a = ap.parse_args()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(96, 16), torch.randn(96, 4))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    # its own generator: starting an epoch's iterator must not draw from the RNG that dropout uses,
    # or a run resumed mid-epoch (one extra iterator) would drift from a straight one
    loader = DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(0))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    ckpt = Checkpointer(
        "accel-demo",
        a.dir,
        model=accelerator.unwrap_model(model),
        optimizer=opt,
        scheduler=sched,
        every_steps=5,
        total_steps=a.steps,
        keep_last=3,
    )
    step = ckpt.resume()
    accelerator.print(f"starting at step {step}")
    while step < a.steps:
        skip = step % len(loader)
        for x, y in accelerator.skip_first_batches(loader, skip) if skip else loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            sched.step()
            step = ckpt.step()
            if a.step_sleep:
                time.sleep(a.step_sleep)
            if step >= a.steps:
                break
    ckpt.close()
    weights = accelerator.unwrap_model(model).state_dict().values()
    accelerator.print(f"FINGERPRINT {hashlib.sha256(b''.join(t.numpy().tobytes() for t in weights)).hexdigest()}")


if __name__ == "__main__":
    main()
