"""A small trainer run as another unix user (the trust-boundary tests): imports first (a user
cannot read root's Python), then drops to the uid, gid and groups given, then resumes and
trains. Every step sets each weight to ``--fill`` plus the step, so the weights say whose run
(and which step) they came from. Prints ``START <step> <first weight>`` after the resume.

    as_user_train.py UID GID GROUPS(comma-separated or -) DIR JOB STEPS [--fill F] [--socket S]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from trainer_hooks import Checkpointer, ResumeError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("uid", type=int)
    p.add_argument("gid", type=int)
    p.add_argument("groups")
    p.add_argument("directory")
    p.add_argument("job")
    p.add_argument("steps", type=int)
    p.add_argument("--fill", type=float, default=0.0)
    p.add_argument("--socket", default=None)
    a = p.parse_args()
    os.setgroups([a.gid, *(int(g) for g in a.groups.split(",") if g and g != "-")])
    os.setgid(a.gid)
    os.setuid(a.uid)
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpointer(a.job, a.directory, model=model, every_steps=1, socket=a.socket or False, save_final=False)
    try:
        start = ckpt.resume()
    except ResumeError as exc:
        print("REFUSED", exc, flush=True)
        ckpt.close(final=False)
        return 3
    print("START", start, float(model.weight.detach()[0, 0]), flush=True)
    for i in range(start, a.steps):
        with torch.no_grad():
            model.weight.fill_(a.fill + i + 1)
        ckpt.step()
    ckpt.close(final=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
