"""An exit by an exception is not the end of a run (SPEC §3, issue 36 #1): real trainer processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckptd.core.retention import Rules, item_of, judge
from ckptd.core.vocab import Rule
from ckptd.disk.scan import scan
from tests.conftest import run_py
from trainer_hooks import Checkpointer

TRAINER = r"""
import sys, torch
from trainer_hooks import Checkpointer
directory, crash_at = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = Checkpointer("crash", directory, model=model, optimizer=opt, every_steps=5)
start = ckpt.resume()
print("resumed at", start, flush=True)
for i in range(start, 20):
    if i == crash_at:
        raise RuntimeError("loss is NaN")
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    ckpt.step()
ckpt.close()
"""


def trainer(directory: Path, crash_at: int) -> tuple[int, str, str]:
    r = run_py("-c", TRAINER, str(directory), str(crash_at))
    return r.returncode, r.stdout, r.stderr


def test_an_exception_before_the_first_step_writes_nothing(tmp_path: Path) -> None:
    rc, _, err = trainer(tmp_path, 0)
    assert rc == 1 and "RuntimeError: loss is NaN" in err
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == [], os.listdir(tmp_path)
    assert "ended by an exception (RuntimeError) at step 0: not the end of the run, no final save" in err


def test_an_exception_mid_run_saves_no_final_and_the_next_run_resumes_from_the_last_scheduled_save(
    tmp_path: Path,
) -> None:
    rc, _, err = trainer(tmp_path, 12)
    assert rc == 1 and "RuntimeError: loss is NaN" in err
    assert [(c.step, c.trigger) for c in scan(str(tmp_path), "crash")] == [(5, "step"), (10, "step")]
    assert "at step 12: not the end of the run, no final save; the next run resumes from step 10" in err
    rc, out, err = trainer(tmp_path, -1)
    assert rc == 0, err
    assert "resumed at 10" in out
    assert [(c.step, c.trigger) for c in scan(str(tmp_path), "crash")] == [
        (5, "step"),
        (10, "step"),
        (15, "step"),
        (20, "step"),
    ]


def test_an_exception_leaving_the_with_block_saves_no_final(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with Checkpointer("w", tmp_path, model=torch.nn.Linear(4, 4), every_steps=2) as ckpt:
            for _ in range(3):
                ckpt.step()
            raise ValueError("bug")
    assert [(c.step, c.trigger) for c in scan(str(tmp_path), "w")] == [(2, "step")]


def _kept_as(directory: Path, job: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """Each checkpoint's step, trigger and the rules keep_final + keep_best=1 keep it by."""
    found = scan(str(directory), job)
    rules = Rules(keep_best=1, best_metric="loss", keep_final=True)
    items = [item_of(c.path, c.step, 0.0, 0, trigger=c.trigger, metrics=c.metrics, best_metric="loss") for c in found]
    verdicts = {v.item.id: v for v in judge(items, rules, 0.0)}
    return [
        (
            c.step,
            c.trigger,
            tuple(sorted(str(r.rule) for r in verdicts[c.path].reasons if r.rule in (Rule.KEEP_FINAL, Rule.KEEP_BEST))),
        )
        for c in found
    ]


def test_a_best_save_at_the_last_step_is_labelled_final_and_counts_as_best(tmp_path: Path) -> None:
    """HF evaluates after its last step: the step saved the final checkpoint, the evaluation's best
    save of the same step must not relabel it ``best`` (and lose keep_final)."""
    ckpt = Checkpointer("hf", tmp_path, model=torch.nn.Linear(4, 4), best_metric="loss", total_steps=3)
    for _ in range(3):
        ckpt.step()
    assert ckpt.report({"loss": 0.5})
    ckpt.close()
    assert _kept_as(tmp_path, "hf") == [(3, "final", (str(Rule.KEEP_BEST), str(Rule.KEEP_FINAL)))]


def test_a_best_save_of_the_last_step_without_total_steps_is_saved_again_as_final(tmp_path: Path) -> None:
    ckpt = Checkpointer("nt", tmp_path, model=torch.nn.Linear(4, 4), best_metric="loss")
    for _ in range(3):
        ckpt.step()
    assert ckpt.report({"loss": 0.5})
    ckpt.close()
    assert _kept_as(tmp_path, "nt") == [(3, "final", (str(Rule.KEEP_BEST), str(Rule.KEEP_FINAL)))]
