"""A real transformers.Trainer run (tiny GPT-2 from a config, no download) writing
checkpoint-N/ directories with save_steps, with load_best_model_at_end."""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

out, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
)
data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(64)]
args = TrainingArguments(
    output_dir=out,
    max_steps=steps,
    save_steps=5,
    eval_steps=5,
    eval_strategy="steps",
    save_strategy="steps",
    load_best_model_at_end=True,
    metric_for_best_model="loss",
    per_device_train_batch_size=4,
    report_to=[],
    use_cpu=True,
    logging_steps=5,
    dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
trainer.train()
print("BEST", trainer.state.best_model_checkpoint, flush=True)
