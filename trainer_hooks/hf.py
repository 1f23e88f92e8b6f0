"""ckptd for a Hugging Face ``transformers.Trainer``: one line.

    trainer = Trainer(..., callbacks=[CkptdCallback("gpt-ft", every_steps=500, keep_last=3)])
    trainer.train(resume_from_checkpoint=CkptdCallback.resume_dir(trainer, "gpt-ft"))

The callback hands the Trainer's model, optimizer, scheduler, RNG states and
``TrainerState`` to ckptd on ckptd's schedule (so ``save_strategy="no"`` can switch the
Trainer's own saving off). Resume goes through the Trainer's own machinery, which is what
skips the right batches: ``resume_dir`` materialises the newest *verified* ckptd
checkpoint as an HF checkpoint directory and returns its path (None when there is none).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from trainer_hooks._resume.resume import newest_to_resume
from trainer_hooks._state.loader import load
from trainer_hooks.checkpointer import Checkpointer


class CkptdCallback(TrainerCallback):
    def __init__(self, job: str, directory: str | None = None, **settings: Any) -> None:
        self.job, self.directory, self.settings = job, directory, settings
        self.ckpt: Checkpointer | None = None
        self.extra: dict[str, Any] = {}
        self._metrics: dict[str, float] = {}
        self._state: Any = None
        self.materialised: str | None = None  # the HF-format copy resume_dir made; removed once HF has read it

    @staticmethod
    def default_dir(output_dir: str) -> str:
        return os.path.join(output_dir, "ckptd")

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        self._state = state
        settings = {"total_steps": state.max_steps, **self.settings}
        from trainer_hooks.deepspeed import find_engine

        engine = find_engine(model)  # under DeepSpeed the engine is saved, in its own layout
        self.ckpt = Checkpointer(
            self.job,
            self.directory or self.default_dir(args.output_dir),
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            extra=self.extra,
            before_save=self._refresh_extra,
            engine=engine,
            **settings,
        )
        self.ckpt.start_at(state.global_step)  # a resumed Trainer starts past 0; nothing is due for that

    def _refresh_extra(self) -> None:
        """At save time only: the TrainerState as HF itself would write it."""
        if self._state is not None:
            import dataclasses

            self.extra["hf_trainer_state"] = json.dumps(dataclasses.asdict(self._state), default=str)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.materialised is not None:  # HF has loaded weights, optimizer, scheduler and RNG from it by now
            shutil.rmtree(os.path.dirname(self.materialised), ignore_errors=True)
            self.materialised = None
        if self.ckpt is not None:
            self.ckpt.step(state.global_step, metrics=self._metrics or None, epoch=state.epoch)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._metrics.update({k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))})

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Evaluation metrics describe the weights of ``state.global_step``: a best save happens now."""
        if self.ckpt is not None and metrics:
            self.ckpt.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None

    # -- resume ---------------------------------------------------------------------------

    @classmethod
    def resume_dir(cls, trainer: Any, job: str, directory: str | None = None) -> str | None:
        """An HF checkpoint directory made from the newest verified ckptd checkpoint, or None."""
        src = directory or cls.default_dir(trainer.args.output_dir)
        if getattr(trainer, "is_deepspeed_enabled", False):
            from trainer_hooks.deepspeed import hf_resume_dir

            out = hf_resume_dir(src, job, os.path.join(src, ".hf-resume"))
            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, cls) and out is not None:
                    cb.materialised = out
            return out
        quiet = any(isinstance(cb, cls) and cb.settings.get("quiet") for cb in trainer.callback_handler.callbacks)
        info = newest_to_resume(job, src, quiet)
        if info is None:
            return None
        out = _materialise(trainer, load(info.path), os.path.join(src, ".hf-resume", f"checkpoint-{info.step}"))
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, cls):
                cb.materialised = out
        return out


def _materialise(trainer: Any, state: dict[str, Any], out: str) -> str:
    """Write the files ``Trainer._load_from_checkpoint`` and friends read."""
    os.makedirs(out, exist_ok=True)
    trainer.model.load_state_dict(state["model"])
    trainer.save_model(out)  # HF's own weights format, tied weights included
    if "optimizer" in state:
        torch.save(state["optimizer"], os.path.join(out, "optimizer.pt"))
    if "scheduler" in state:
        torch.save(state["scheduler"], os.path.join(out, "scheduler.pt"))
    rng = state.get("rng", {})
    torch.save(
        {
            "python": rng.get("python", random.getstate()),
            "numpy": rng.get("numpy", np.random.get_state()),
            "cpu": rng.get("torch", torch.get_rng_state()),
        },
        os.path.join(out, "rng_state.pth"),
    )
    trainer_state = state.get("extra", {}).get("hf_trainer_state")
    if trainer_state:
        with open(os.path.join(out, "trainer_state.json"), "w") as f:
            f.write(trainer_state)
    return out
