"""ckptd for a Lightning ``Trainer``: one line.

    trainer = L.Trainer(..., callbacks=[CkptdCallback("pl-run", every_steps=500, best_metric="val_loss")])
    trainer.fit(model, ckpt_path=CkptdCallback.resume_path(trainer, "pl-run"))

Saves the LightningModule, its optimizers and schedulers, RNG states and the fit
loop's progress on ckptd's schedule, with ``best_metric`` read from the logged
metrics (``trainer.callback_metrics``). ``resume_path`` materialises the newest
*verified* ckptd checkpoint as a Lightning ``.ckpt`` so that Lightning restores its
own loops from it.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from trainer_hooks._resume.resume import newest_to_resume
from trainer_hooks._state.loader import load
from trainer_hooks._state.rng import restore_rng
from trainer_hooks.checkpointer import Checkpointer


class CkptdCallback(L.Callback):
    def __init__(
        self,
        job: str,
        directory: str | None = None,
        generators: dict[str, torch.Generator] | None = None,
        **settings: Any,
    ) -> None:
        """``generators``: the trainer's own (a DataLoader's ``generator=``), saved and restored by name."""
        self.job, self.directory, self.settings = job, directory, settings
        self.generators = generators or {}
        self.ckpt: Checkpointer | None = None
        self.extra: dict[str, Any] = {}
        self._trainer: Any = None

    @staticmethod
    def default_dir(trainer: Any) -> str:
        return os.path.join(trainer.default_root_dir, "ckptd")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        opt = trainer.optimizers[0] if trainer.optimizers else None
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        settings = {
            **({"total_steps": trainer.max_steps} if trainer.max_steps and trainer.max_steps > 0 else {}),
            **self.settings,
        }
        self.ckpt = Checkpointer(
            self.job,
            self.directory or self.default_dir(trainer),
            model=pl_module,
            optimizer=opt,
            scheduler=sched,
            extra=self.extra,
            before_save=self._refresh,
            generators=self.generators,
            **settings,
        )
        self.ckpt.start_at(trainer.global_step)

    def _refresh(self) -> None:
        """At save time only: the fit loop's progress, as Lightning's own checkpoints hold it."""
        if self._trainer is not None:
            self.extra["lightning"] = {
                "loops": {"fit_loop": self._trainer.fit_loop.state_dict()},
                "epoch": self._trainer.current_epoch,
                "global_step": self._trainer.global_step,
            }

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ckpt is not None:
            metrics = _scalars(trainer.callback_metrics)
            self.ckpt.step(trainer.global_step, metrics=metrics or None, epoch=trainer.current_epoch)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Validation metrics describe the current weights: a best save happens now, not a batch later."""
        if self.ckpt is not None and not trainer.sanity_checking:
            self.ckpt.report(_scalars(trainer.callback_metrics))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None

    @classmethod
    def resume_path(cls, trainer: Any, job: str, directory: str | None = None) -> str | None:
        """A Lightning ``.ckpt`` made from the newest verified ckptd checkpoint, or None."""
        src = directory or cls.default_dir(trainer)
        quiet = any(isinstance(cb, cls) and cb.settings.get("quiet") for cb in trainer.callbacks)
        info = newest_to_resume(job, src, quiet)
        if info is None:
            return None
        state = load(info.path)
        for cb in trainer.callbacks:  # Lightning keeps no RNG states; restored now, before fit() builds the
            if isinstance(cb, cls):  # epoch's iterator, so the resumed shuffle draws what the run would have
                restore_rng(state.get("rng", {}), cb.generators)
        pl = state.get("extra", {}).get("lightning", {})
        ckpt = {
            "state_dict": state["model"],
            "optimizer_states": [state["optimizer"]] if "optimizer" in state else [],
            "lr_schedulers": [state["scheduler"]] if "scheduler" in state else [],
            "epoch": pl.get("epoch", 0),
            "global_step": pl.get("global_step", info.step),
            "loops": pl.get("loops", {}),
            "pytorch-lightning_version": L.__version__,
        }
        out = os.path.join(src, ".pl-resume", f"step{info.step}.ckpt")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        torch.save(ckpt, out)
        return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
    }
