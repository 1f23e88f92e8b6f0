"""A real transformers.Trainer run under DeepSpeed ZeRO-2 (torchrun, 2 ranks, CPU): tiny GPT-2
from a config. ``--native`` lets the Trainer write its own checkpoint-N/ (a global_stepN/ tag
inside); otherwise CkptdCallback saves and the Trainer's own saving is off.

    torchrun --nproc_per_node=2 tests/scripts/hf_ds_train.py OUT STEPS [--native] [--resume]
"""

import hashlib
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

out, steps = sys.argv[1], int(sys.argv[2])
native, resume = "--native" in sys.argv, "--resume" in sys.argv
torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
)
data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
ds = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": "auto",
}
args = TrainingArguments(
    output_dir=out,
    max_steps=steps,
    save_steps=4,
    save_strategy="steps" if native else "no",
    per_device_train_batch_size=2,
    report_to=[],
    use_cpu=True,
    logging_steps=4,
    dataloader_num_workers=0,
    deepspeed=ds,
    save_only_model=False,
)
callbacks = []
if not native:
    from trainer_hooks.hf import CkptdCallback

    callbacks = [CkptdCallback("hf-ds", every_steps=4)]
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
start = CkptdCallback.resume_dir(trainer, "hf-ds") if resume and not native else None
trainer.train(resume_from_checkpoint=start)
h = hashlib.sha256()
import deepspeed  # noqa: E402

params = list(trainer.model.parameters())
with deepspeed.zero.GatheredParameters(params):
    for p in params:
        h.update(p.detach().float().numpy().tobytes())
sys.stdout.write(
    f"rank {trainer.args.process_index} STEP {trainer.state.global_step} FINGERPRINT {h.hexdigest()[:16]}\n"
)
sys.stdout.flush()  # one write: the ranks share the pipe
if torch.distributed.is_initialized():  # shut the groups down while the interpreter is whole: left to
    torch.distributed.destroy_process_group()  # exit, a gloo group's threads can abort it (SIGABRT)
