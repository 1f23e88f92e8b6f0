"""ckptd: checkpoint management for PyTorch training hosts.

This package must stay import-light: the training-side hook (``trainer_hooks``)
imports the format, policy and storage modules from here, so nothing at package
level may pull in torch, click, watchdog, apscheduler or prometheus_client.
"""

__version__ = "0.1.0"
