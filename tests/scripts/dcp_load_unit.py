"""Load a ckptd sharded unit with torch.distributed.checkpoint alone, as code that has never
heard of ckptd would: ``dcp.load`` with torch's own ``HuggingFaceStorageReader``, into a
plain (unsharded) model of examples/fsdp_train.py's shape; prints the model's digest.

    python tests/scripts/dcp_load_unit.py UNIT_DIR
"""

import hashlib
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

DIM, HIDDEN = 32, 64


def main() -> None:
    model = torch.nn.Module()
    model.inp = torch.nn.Linear(DIM, HIDDEN)
    model.out = torch.nn.Linear(HIDDEN, DIM)
    model.register_buffer("scale", torch.zeros(DIM))
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(sys.argv[1]))
    h = hashlib.sha256()
    for k in sorted(state["model"]):
        h.update(f".model.{k}".encode())
        h.update(state["model"][k].reshape(-1).view(torch.uint8).numpy().tobytes())
    assert not [m for m in sys.modules if m.split(".")[0] in ("ckptd", "trainer_hooks")]
    print("MODEL", h.hexdigest())


if __name__ == "__main__":
    main()
