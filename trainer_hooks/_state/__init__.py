"""What a checkpoint holds and how it reads back: the state tree as tensors and a JSON skeleton
(``state``), every RNG (``rng``), reading a checkpoint back (``loader``), and whether it fits the
model (``fit``). The bottom layer: it imports nothing else of the hook.
"""
