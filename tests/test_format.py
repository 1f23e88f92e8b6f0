"""Round-trips of the checkpoint format with real torch objects and real files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptd.disk.verify import verify_file
from tests.helpers import save_state
from trainer_hooks import load
from trainer_hooks._state.state import capture, flatten


def roundtrip(state: dict, tmp_path: Path) -> dict:
    path = save_state(state, tmp_path)
    assert verify_file(path).ok
    return load(path)


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.view(torch.uint8) if a.numel() and a.dtype.itemsize == 1 else a,
            b.view(torch.uint8) if b.numel() and b.dtype.itemsize == 1 else b,
        )
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b), (a, b)


DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def test_every_dtype_round_trips_bit_exact(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    state = {}
    for dt in DTYPES:
        raw = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8, generator=g)
        state[str(dt)] = raw.view(dt) if dt.itemsize <= 8 and dt != torch.bool else (raw % 2).bool()
    back = roundtrip({"extra": state}, tmp_path)["extra"]
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), k


def test_empty_scalar_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "extra": {
            "empty": torch.empty(0, 3),
            "scalar": torch.tensor(2.5),
            "t": base.t(),
            "strided": base[:, ::2],
            "int_keys": {3: torch.ones(2), 7: "x"},
        }
    }
    back = roundtrip(state, tmp_path)["extra"]
    assert back["empty"].shape == (0, 3)
    assert back["scalar"].item() == 2.5 and back["scalar"].dim() == 0
    assert torch.equal(back["t"], base.t()) and torch.equal(back["strided"], base[:, ::2])
    assert list(back["int_keys"]) == [3, 7] and back["int_keys"][7] == "x"


def test_tied_weights_are_stored_once_and_tied_again(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    flat, _ = flatten(capture(model))
    assert flat.aliases == {"model/head.weight": "model/emb.weight"}
    back = roundtrip(capture(model), tmp_path)["model"]
    assert back["head.weight"] is back["emb.weight"]
    assert torch.equal(back["emb.weight"], emb.weight.detach())
    with open(tmp_path / "c.safetensors", "rb"):
        assert "model/head.weight" not in load_file(str(tmp_path / "c.safetensors"))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_optimizer_scheduler_and_rng_round_trip(tmp_path: Path, opt_name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}]
    opt = (
        torch.optim.AdamW(groups, betas=(0.8, 0.9))
        if opt_name == "adamw"
        else torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    random.seed(5)
    np.random.seed(6)
    state = capture(model, opt, sched, extra={"note": "hi", "nan": float("nan"), "dtype": torch.bfloat16})
    back = roundtrip(state, tmp_path)
    assert_same(state["optimizer"], back["optimizer"])
    assert_same(state["scheduler"], back["scheduler"])
    assert_same(state["rng"], back["rng"])
    assert back["extra"]["dtype"] is torch.bfloat16
    opt2 = type(opt)([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.5)
    opt2.load_state_dict(back["optimizer"])  # loads into a fresh optimizer
    assert opt2.state_dict()["param_groups"][1]["lr"] == state["optimizer"]["param_groups"][1]["lr"]


def test_files_are_plain_safetensors(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = save_state(capture(model), tmp_path)
    plain = load_file(path)
    assert torch.equal(plain["model/weight"], model.weight.detach())
