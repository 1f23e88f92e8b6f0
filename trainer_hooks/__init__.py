"""The in-training side of ckptd: ``from trainer_hooks import Checkpointer``.

Import-light by contract (SPEC §2): importing this package pulls in torch and the
torch-free core of ckptd, never watchdog, apscheduler or prometheus_client.
"""

from trainer_hooks.checkpointer import Checkpointer
from trainer_hooks.loader import load
from trainer_hooks.resume import ResumeError

__all__ = ["Checkpointer", "ResumeError", "load"]
