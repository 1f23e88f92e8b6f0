"""ckptd in a Hugging Face Trainer: one callback, and resume through the Trainer itself.

    python examples/hf_trainer.py --out /tmp/hf-run --steps 20 [--step-sleep 0.1]
Prints a sha256 fingerprint of the final weights (for the crash+resume test).
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from trainer_hooks.hf import CkptdCallback


class Slow(TrainerCallback):  # type: ignore[misc]
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, *args: object, **kwargs: object) -> None:
        time.sleep(self.seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps and keep the best by eval_loss")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    )
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": torch.randint(0, 64, (16,), generator=g), "labels": torch.randint(0, 64, (16,), generator=g)}
        for _ in range(48)
    ]
    evaluation = {"eval_strategy": "steps", "eval_steps": a.eval_steps} if a.eval_steps else {}
    args = TrainingArguments(
        output_dir=a.out,
        max_steps=a.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        dataloader_num_workers=0,
        logging_steps=5,
        seed=42,
        **evaluation,
    )
    best = {"best_metric": "eval_loss", "keep_best": 2} if a.eval_steps else {}
    ckptd = CkptdCallback("hf-demo", every_steps=5, keep_last=2, **best)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data[:8] if a.eval_steps else None,
        callbacks=[ckptd, Slow(a.step_sleep)],
    )
    resume = CkptdCallback.resume_dir(trainer, "hf-demo")
    print("resume from", resume, flush=True)
    trainer.train(resume_from_checkpoint=resume)
    h = hashlib.sha256()
    for t in trainer.model.state_dict().values():
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    print("FINGERPRINT", h.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
