"""The reliability campaign's in-process part: random corruptions are all detected, and a hard
link out of the roots only loses the link."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ckptd.disk.verify import verify_file
from tests.conftest import ROOT
from tests.helpers import small_checkpoint

SOAK = os.environ.get("CKPTD_SOAK") == "1"


# `make soak` records its figures in the repository; a CI-size run only prints them (or writes
# them where CKPTD_BENCH_RESULTS says): tests write nowhere but their temporary directories.
RESULTS: Path | None = (
    Path(os.environ["CKPTD_BENCH_RESULTS"])
    if os.environ.get("CKPTD_BENCH_RESULTS")
    else ROOT / "benchmarks" / "results"
    if SOAK
    else None
)


def report(name: str, figures: dict) -> None:
    print(f"\n{name}: {figures}")
    if RESULTS is not None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"reliability_{name}{'' if SOAK else '_quick'}.json"
        path.write_text(json.dumps({"soak": SOAK, **figures}, indent=2))


def corrupt(data: bytearray, rng: random.Random, kind: str, other: bytes) -> bytes:
    n = len(data)
    if kind == "flip_header":
        i = rng.randrange(0, min(n, 8 + int.from_bytes(data[:8], "little")))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "flip_data":
        i = rng.randrange(8 + int.from_bytes(data[:8], "little"), n)
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(0, n) :]
    elif kind == "zero_block":
        i = rng.randrange(0, n)
        data[i : i + 4096] = bytes(len(data[i : i + 4096]))
    elif kind == "append":
        data += os.urandom(rng.randint(1, 4096))
    elif kind == "swap":
        return other
    return bytes(data)


def test_every_random_corruption_is_detected(tmp_path: Path) -> None:
    rounds = 10000 if SOAK else 1000
    rng = random.Random(2026)
    originals = [
        Path(small_checkpoint(tmp_path, f"t-step{s:08d}.safetensors", step=s, seed=s)).read_bytes() for s in (1, 2, 3)
    ]
    kinds = ["flip_header", "flip_data", "truncate", "zero_block", "append", "swap"]
    detected = applied = 0
    per_kind = {k: [0, 0] for k in kinds}
    target = tmp_path / "victim" / "t-step00000001.safetensors"
    target.parent.mkdir()
    for _ in range(rounds):
        kind = rng.choice(kinds)
        before = originals[0]
        after = corrupt(bytearray(before), rng, kind, originals[rng.choice([1, 2])])
        if after == before:
            continue  # zeroing zeros changes nothing: not a corruption
        target.write_bytes(after)
        applied += 1
        per_kind[kind][0] += 1
        r = verify_file(target)
        assert r.reason or not r.ok
        if not r.ok:
            detected += 1
            per_kind[kind][1] += 1
    report(
        "corruption",
        {
            "corruptions": applied,
            "detected": detected,
            "rate": detected / applied,
            "per_kind": {k: {"applied": a, "detected": d} for k, (a, d) in per_kind.items()},
        },
    )
    assert detected == applied, per_kind


def test_hard_link_to_a_file_outside_the_roots_only_loses_the_link(tmp_path: Path) -> None:
    from ckptd.disk.remove import remove

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    precious = outside / "precious.bin"
    precious.write_text("keep me")
    os.link(precious, root / "t-step00000001.safetensors")
    remove(str(root / "t-step00000001.safetensors"), [str(root)])
    assert precious.read_text() == "keep me"
