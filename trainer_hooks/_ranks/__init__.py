"""Many ranks, one checkpoint: the collectives every rank's save and resume agree over (``shards``),
and torch.distributed.checkpoint's planning for DTensor state (``dcpio``).
"""
