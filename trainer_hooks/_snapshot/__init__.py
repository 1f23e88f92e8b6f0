"""The copy training waits for: the state composed into a snapshot (``snapshot``), copied into the
reused shared-memory buffer (``staging``), overlapped with the next step (``overlap``), from CUDA
through pinned memory (``pinned``), with frozen tensors stored once (``shared``).
"""
