"""``ckptd``: the command line (click). Thin: parsing and printing only.

``base`` holds the group and what the verbs share; ``files`` the verbs on checkpoints, ``plan``
the schedule of a run, ``service`` the verbs that run or ask the daemon. Importing this package registers them all.
"""

from ckptd.cli import export, files, plan, remote, service  # noqa: F401  (registers the verbs on ``main``)
from ckptd.cli.base import main

__all__ = ["main"]
