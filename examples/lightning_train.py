"""ckptd in a Lightning Trainer: one callback; resume through Lightning's own ckpt_path.

python examples/lightning_train.py --root /tmp/pl-run --steps 40 [--step-sleep 0.05]
"""

from __future__ import annotations

import argparse
import hashlib
import time

import lightning as L
import torch

from trainer_hooks.lightning import CkptdCallback


class Tiny(L.LightningModule):
    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.sleep = sleep

    def training_step(self, batch, _):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        if self.sleep:
            time.sleep(self.sleep)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument(
        "--shuffle",
        choices=["no", "global", "generator"],
        default="no",
        help="shuffle with the global RNG, or with a generator handed to the callback",
    )
    a = ap.parse_args()
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(160, 8, generator=g), torch.randn(160, 1, generator=g))
    sampler_rng = torch.Generator().manual_seed(2) if a.shuffle == "generator" else None
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=a.shuffle != "no", generator=sampler_rng)
    ckptd = CkptdCallback(
        "pl-demo",
        every_steps=5,
        keep_last=2,
        best_metric="train_loss",
        generators={"sampler": sampler_rng} if sampler_rng is not None else None,
    )
    trainer = L.Trainer(
        max_steps=a.steps,
        default_root_dir=a.root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        enable_checkpointing=False,
        callbacks=[ckptd],
    )
    model = Tiny(a.step_sleep)
    resume = CkptdCallback.resume_path(trainer, "pl-demo")
    print("resume from", resume, flush=True)
    trainer.fit(model, loader, ckpt_path=resume)
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print("FINGERPRINT", h.hexdigest(), "STEP", trainer.global_step, flush=True)


if __name__ == "__main__":
    main()
