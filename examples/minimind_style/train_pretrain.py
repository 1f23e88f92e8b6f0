"""A Minimind-style pretraining loop: its own (epoch, micro-batch) position, gradient
accumulation, and a skip-sampler that resumes an epoch where it stopped. ``train_pretrain.py``
is this loop with ckptd; ``ckptd.diff`` is the change (examples/minimind_style/README.md)."""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer_hooks import Checkpointer


class Tokens(Dataset):
    """Synthetic next-token data, the same on every run."""

    def __init__(self, n: int = 96, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.data = torch.randint(0, vocab, (n, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class SkipBatchSampler(Sampler[list[int]]):
    """Batches of an epoch's order, the first ``skip`` of them left out (a resumed epoch)."""

    def __init__(self, order: list[int], batch_size: int, skip: int = 0) -> None:
        self.order, self.batch_size, self.skip = order, batch_size, skip

    def __iter__(self):  # type: ignore[no-untyped-def]
        batches = [self.order[i:i + self.batch_size] for i in range(0, len(self.order), self.batch_size)]
        yield from batches[self.skip:]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size) - self.skip


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(x)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--accumulation-steps", type=int, default=4)
    ap.add_argument("--save-interval", type=int, default=2, help="optimizer steps between saves")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per micro-batch (to be interrupted)")
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = Tokens()
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    iters = -(-len(ds) // args.batch_size)  # micro-batches per epoch
    position = {"epoch": 0, "micro": 0}  # the next micro-batch to run: saved and restored by ckptd
    ckpt = Checkpointer("pretrain", args.out, model=model, optimizer=opt, extra=position,
                        every_steps=args.save_interval, total_steps=args.epochs * (iters // args.accumulation_steps))
    resumed = ckpt.resume()  # optimizer steps done; ``position`` is back as it was saved
    start_epoch, start_step = position["epoch"], position["micro"]
    print(f"resumed at optimizer step {resumed}: epoch {start_epoch}, micro-batch {start_step}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()
        skip = start_step if epoch == start_epoch else 0
        loader = DataLoader(ds, batch_sampler=SkipBatchSampler(order, args.batch_size, skip))
        for step, (x, y) in enumerate(loader, start=skip + 1):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) / args.accumulation_steps
            loss.backward()
            if step % args.accumulation_steps == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                position.update(epoch=epoch, micro=step)
                if step == iters:  # the epoch is done: the next micro-batch is the next epoch's first
                    position.update(epoch=epoch + 1, micro=0)
                ckpt.step()  # an optimizer step done: a save, when one is due, holds this position
            time.sleep(args.sleep)
    ckpt.close()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    print("final weights sha256", digest, flush=True)


if __name__ == "__main__":
    main()
