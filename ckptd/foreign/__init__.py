"""Other tools' checkpoints, read and verified without running their code: HF Trainer
directories, (sharded) safetensors, torch zip files and Lightning ``.ckpt`` (``formats``),
checked through zip CRCs and a pickle reader that never executes (``picklesafe``), and
torch.distributed.checkpoint directories."""
