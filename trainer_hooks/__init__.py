"""The in-training side of ckptd: ``from trainer_hooks import Checkpointer``.

Import-light by contract (SPEC §2): importing this package pulls in torch and the
torch-free core of ckptd, never watchdog, apscheduler or prometheus_client.
"""

from trainer_hooks._resume.resume import ResumeError
from trainer_hooks._state.loader import load
from trainer_hooks.checkpointer import Checkpointer

__all__ = ["Checkpointer", "ResumeError", "load"]
