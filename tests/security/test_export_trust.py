"""What is read is what was verified; outputs never follow links (docs/security.md, "Reading what
was verified"; issue 33: H1, H2, H10, M3, L5).

Real unix users (``users``), the real CLI run as root in a subprocess, a real daemon where the
daemon is involved. A hostile user's moves that must land at one exact moment (between verify
and copy) are made deterministic by an audit hook in the CLI's own process: it acts when the
export opens its first output file, as a racing attacker would win it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import xxhash

from ckptd.core.format import FORMAT_VERSION, encode_header, layout, meta_digest, read_header
from ckptd.core.meta import HF_CONFIG
from ckptd.core.refs import Ref, decode, encode
from tests.conftest import ROOT, DaemonProc, ckptd_cli, project_env, run_py
from tests.helpers import save_state
from tests.scripts.lora_train import build
from tests.users import User, needs_root
from trainer_hooks import Checkpointer

pytestmark = needs_root
JOB = "lora"
STEP1, STEP2 = f"{JOB}-step00000001.safetensors", f"{JOB}-step00000002.safetensors"


def give(path: Path, user: User, mode: int) -> None:
    """``path`` and everything in it to ``user``; ``path`` itself gets ``mode``."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.uid, user.gid, follow_symlinks=False)
    os.chmod(path, mode)


def lora_run(directory: Path, seed: int, job: str = JOB) -> dict[str, torch.Tensor]:
    """Two saves of a frozen base under an adapter: step 2 refers to step 1 for the base (§13).
    Returns the model's state dict, what an export of step 2 must hold."""
    model, opt = build(seed)
    ckpt = Checkpointer(
        job, directory, model=model, optimizer=opt, every_steps=1, socket=False, quiet=True, save_final=False
    )
    for step in range(2):
        model(torch.randn(4, 512, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step()
    ckpt.close(final=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def user_dirs(base: Path, users: Any) -> tuple[User, Path, User, Path]:
    """Alice (the attacker: her job directory, 0755) and Bob (his checkpoints in a 0700 directory)."""
    alice, bob = users.user("cka"), users.user("ckb")
    a, b = base / "alice", base / "bob"
    a.mkdir()
    b.mkdir()
    return alice, a, bob, b


# H1 ------------------------------------------------------------------------------------------


def test_root_export_never_writes_through_a_link_planted_in_out_dir(base: Path, users: Any) -> None:
    """A unit's author plants ``config.json.tmp`` (and the final names) in the OUT_DIR she owns as
    links to a root file; root exports there. Before, root overwrote the root file with the
    author's JSON. Now an OUT_DIR of another user's, or one reached through a link, is refused
    with a clear error and nothing outside it is touched; root's own OUT_DIR gets real files."""
    alice, a, _, _ = user_dirs(base, users)
    torch.manual_seed(0)
    save_state(
        {"model": torch.nn.Linear(8, 4).state_dict()},
        a,
        STEP1,
        job=JOB,
        extra_meta={HF_CONFIG: json.dumps({"cmd": "$(touch /tmp/pwned)"})},
    )
    precious = base / "precious.sh"
    precious.write_text("echo root's own\n")
    out = a / "out"
    out.mkdir()
    for name in ("config.json.tmp", "config.json", "model.safetensors.tmp"):
        (out / name).symlink_to(precious)
    give(a, alice, 0o755)
    r = ckptd_cli("export", str(a / STEP1), str(out), "--format", "hf")
    assert precious.read_text() == "echo root's own\n" and precious.stat().st_uid == 0
    assert r.returncode == 1 and f"OUT_DIR {out} is owned by {alice.name}" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "config.json.tmp", "model.safetensors.tmp"]
    assert all((out / n).is_symlink() for n in os.listdir(out))

    linked = a / "linked"  # an OUT_DIR that is itself a link to a directory of root's
    rootdir = base / "rootdir"
    rootdir.mkdir()
    linked.symlink_to(rootdir)
    r = ckptd_cli("export", str(a / STEP1), str(linked), "--format", "hf")
    assert r.returncode == 1 and "linked is a symbolic link" in r.stderr and os.listdir(rootdir) == [], r.stderr
    r = ckptd_cli("export", str(a / STEP1), str(linked / "sub"), "--format", "hf")  # a link higher up the path
    assert r.returncode == 1 and "linked is a symbolic link" in r.stderr and os.listdir(rootdir) == [], r.stderr

    mine = base / "root-out" / "new"  # root's own, made by the export
    r = ckptd_cli("export", str(a / STEP1), str(mine), "--format", "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(mine)) == ["config.json", "model.safetensors"]
    assert all(not (mine / n).is_symlink() and (mine / n).stat().st_uid == 0 for n in os.listdir(mine))
    assert json.loads((mine / "config.json").read_text()) == {"cmd": "$(touch /tmp/pwned)"}


def test_a_refused_export_leaves_no_out_dir_it_made(base: Path, users: Any) -> None:
    """An export that fails after it made OUT_DIR (here: the holder's bytes changed between
    verification and copy) removes the directories it made: nothing half-made is left."""
    alice, a, _, _ = user_dirs(base, users)
    lora_run(a, seed=0)
    out = base / "made" / "by" / "export"
    with open(a / STEP2, "rb") as f:
        ref = next(
            r
            for n, r in decode(read_header(f, os.fstat(f.fileno()).st_size).metadata).items()
            if n.startswith("model/")
        )
    with open(a / STEP1, "rb") as f:
        start = read_header(f, os.fstat(f.fileno()).st_size).data_start
    r = export_with_race(a / STEP2, out, {"rewrite": str(a / STEP1), "at": start + ref.offsets[0]})
    assert r["raced"], r
    assert r["rc"] == 1 and "changed while it was exported" in r["stderr"], r
    assert not (base / "made").exists()


# H2 ------------------------------------------------------------------------------------------

RACER = r"""
import json, os, sys

plan, marker = json.loads(sys.argv[1]), sys.argv[2]
state = {"done": False}


def act(event, args):
    # The moment the export starts writing its model file: verification is over, the copy not begun.
    if event != "open" or state["done"] or ".ckptd-tmp." not in str(args[0]) or "model" not in str(args[0]):
        return
    state["done"] = True
    for link, target in plan.get("links", {}).items():
        os.symlink(target, link + ".swap")
        os.rename(link + ".swap", link)
    if "rewrite" in plan:  # the same file's bytes changed in place (its owner may)
        with open(plan["rewrite"], "r+b") as f:
            f.seek(plan["at"])
            f.write(b"\x7f" * 16)
    open(marker, "w").close()


sys.addaudithook(act)
sys.argv = ["ckptd", "export", *sys.argv[3:]]
from ckptd.cli import main
main()
"""


def export_with_race(unit: Path, out: Path, plan: dict[str, Any], *args: str) -> dict[str, Any]:
    """Root's ``ckptd export UNIT OUT`` with ``plan`` carried out between its verification and its copy."""
    work = Path(tempfile.mkdtemp(prefix="ckptd-racer-"))
    try:
        (work / "racer.py").write_text(RACER)
        r = run_py(str(work / "racer.py"), json.dumps(plan), str(work / "raced"), str(unit), str(out), *args)
        return {"rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout, "raced": (work / "raced").exists()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_export_copies_the_bytes_it_verified_not_what_a_swapped_name_points_to(base: Path, users: Any) -> None:
    """Alice's unit and its holder are swapped for links to Bob's 0700 checkpoint of the same job
    after root's export verified them and before it copies. Before, the copy reopened both by
    name and exported Bob's weights into Alice's reach. Now the copy reads the fds it verified:
    the output is Alice's model, bit for bit."""
    alice, a, bob, b = user_dirs(base, users)
    mine = lora_run(a, seed=0)
    theirs = lora_run(b, seed=9)
    give(a, alice, 0o755)
    give(b, bob, 0o700)
    out = base / "out"
    plan = {"links": {str(a / STEP2): str(b / STEP2), str(a / STEP1): str(b / STEP1)}}
    r = export_with_race(a / STEP2, out, plan, "--json")
    assert r["raced"] and os.path.islink(a / STEP2) and os.path.islink(a / STEP1), r
    assert r["rc"] == 0, r
    from safetensors.torch import load_file

    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(mine)
    assert all(torch.equal(got[k], mine[k]) for k in mine), "the export holds bytes that were not verified"
    assert not any(torch.equal(got[k], theirs[k]) for k in ("base.0.weight", "up.weight"))


def test_export_of_a_unit_that_is_a_link_is_refused(base: Path, users: Any) -> None:
    """UNIT given as a link to Bob's 0700 checkpoint, or reached through Alice's link to his
    directory: root's export says it never follows one, and exports nothing of Bob's."""
    alice, a, bob, b = user_dirs(base, users)
    lora_run(b, seed=9)
    give(b, bob, 0o700)
    (a / STEP2).symlink_to(b / STEP2)
    give(a, alice, 0o755)
    r = ckptd_cli("export", str(a / STEP2), str(base / "out"))
    assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr
    (a / "x").symlink_to(b)  # a link higher up the unit's path
    r = ckptd_cli("export", str(a / "x" / STEP2), str(base / "out"))
    assert r.returncode == 1 and "its path goes through a symbolic link" in r.stderr, r.stderr
    assert not (base / "out").exists()


# L5 ------------------------------------------------------------------------------------------


def test_root_verify_of_a_holder_link_tells_nothing_about_its_target(base: Path, users: Any) -> None:
    """Alice's step 2 refers to a holder that she replaced by a link into Bob's 0700 directory.
    Root's ``ckptd verify`` says the same whether Bob's file exists or not, and never Bob's job:
    before, it followed the link and its answer told a real checkpoint from a missing one."""
    alice, a, bob, b = user_dirs(base, users)
    lora_run(a, seed=0)
    lora_run(b, seed=9, job="bobs-secret-job")
    give(b, bob, 0o700)
    (a / STEP1).unlink()
    (a / STEP1).symlink_to(b / "bobs-secret-job-step00000001.safetensors")
    give(a, alice, 0o755)
    there = ckptd_cli("verify", str(a / STEP2), "--json")
    (a / STEP1).unlink()
    (a / STEP1).symlink_to(b / "nothing-here.safetensors")
    missing = ckptd_cli("verify", str(a / STEP2), "--json")
    assert there.returncode == missing.returncode == 1
    assert there.stdout == missing.stdout, (there.stdout, missing.stdout)
    assert "bobs-secret-job" not in there.stdout + there.stderr
    reason = json.loads(there.stdout)[0]["reason"]
    assert f"referenced file {STEP1} is missing" in reason, reason


# H10 -----------------------------------------------------------------------------------------

SAVE_AGAIN = r"""
import json, os, sys

import torch

from tests.scripts.lora_train import build
from trainer_hooks import Checkpointer

directory, sock, victim = sys.argv[1], sys.argv[2], sys.argv[3]
uid, gid = int(sys.argv[4]), int(sys.argv[5])
model, opt = build(0)
model(torch.randn(4, 512)).pow(2).mean().backward()
opt.step()
os.setgroups([gid])  # Alice from here on (set up as root: the interpreter's stdlib is in a 0700 home)
os.setgid(gid)
os.setuid(uid)
ckpt = Checkpointer("lora", directory, model=model, optimizer=opt, every_steps=1, socket=sock, quiet=True,
                    save_final=False)
ckpt.step()
ckpt.wait()
first = ckpt.stats["verified"]
name = os.path.join(directory, "lora-step00000001.safetensors")
os.symlink(victim, name + ".swap")  # the save's own name now a link to Bob's checkpoint of step 1
os.rename(name + ".swap", name)
again = ckpt.save(wait=True)  # step 1 again: its frozen base refers to the file of that name
print(json.dumps({"first": first, "again": again, "stats": {k: v for k, v in ckpt.stats.items()
                                                              if isinstance(v, (int, float, str))},
                  "last": ckpt.last_verified}))
ckpt.close(final=False)
"""


def test_a_link_planted_under_the_saves_name_is_never_recorded_as_the_save(base: Path, users: Any) -> None:
    """Alice replaces her step-1 file with a link to Bob's 0700 step-1 checkpoint (same job name)
    and saves step 1 again through the root daemon; her snapshot refers to that name for its
    frozen base. Before, the daemon verified through the link, found Bob's file "the same job and
    step", and recorded it as Alice's save. Now the link is not a file of hers: the save fails,
    saying why, and the daemon's catalogue has no step 1 that is Bob's."""
    alice, bob = users.user("cka"), users.user("ckb")
    d = DaemonProc(base / "d")
    d.start()
    try:
        for p in (base / "d", base / "d" / "run", d.root):
            os.chmod(p, 0o755)
        os.chmod(d.socket, 0o666)
        b = base / "bob"
        b.mkdir()
        lora_run(b, seed=9)
        give(b, bob, 0o700)
        a = d.root / "alice"
        a.mkdir()
        give(a, alice, 0o755)
        work = base / "work"
        work.mkdir(mode=0o755)
        (work / "save_again.py").write_text(SAVE_AGAIN)
        os.chmod(work / "save_again.py", 0o644)
        r = run_py(
            str(work / "save_again.py"),
            str(a),
            d.socket,
            str(b / STEP1),
            str(alice.uid),
            str(alice.gid),
            cwd=str(ROOT),
            env=alice.env(project_env()),
        )
        assert r.returncode == 0, r.stderr[-3000:]
        said = json.loads(r.stdout.strip().splitlines()[-1])
        assert said["first"] == 1 and said["stats"]["verified"] == 1, said
        assert said["stats"]["failed"] == 1, said
        assert os.path.islink(a / STEP1) and os.readlink(a / STEP1) == str(b / STEP1)
        listed = ckptd_cli("list", "lora", "--json", "--socket", d.socket)
        assert str(b / STEP1) not in listed.stdout
        assert "refers to the file of its own name" in d.log.read_text()
    finally:
        d.stop()


# M3 ------------------------------------------------------------------------------------------


def forge(
    directory: Path, step: int, stored: dict[str, bytes], refs: dict[str, tuple[str, str]], job: str = "j"
) -> Path:
    """A ckptd file written by hand, digests right: ``stored`` tensors (uint8), and ``refs``
    (tensor -> (holder file, holder's tensor name)), 1 KiB each, claimed to be at offsets 0..1024."""
    entries = layout([(n, "U8", (len(v),)) for n, v in stored.items()])
    digests = {n: xxhash.xxh3_64_hexdigest(v) for n, v in stored.items()}
    fake = xxhash.xxh3_64_hexdigest(b"\0" * 1024)
    meta = {
        "ckptd.format": FORMAT_VERSION,
        "ckptd.job": job,
        "ckptd.step": str(step),
        "ckptd.created": f"2026-01-01T00:00:{step:02d}.000Z",
        "ckptd.trigger": "step",
        "ckptd.digests": json.dumps(digests),
        "ckptd.refs": encode({n: Ref(f, t, (0, 1024), fake, "U8", (1024,)) for n, (f, t) in refs.items()}),
    }
    meta["ckptd.meta_digest"] = meta_digest(meta)
    path = directory / f"{job}-step{step:08d}.safetensors"
    path.write_bytes(encode_header(entries, meta) + b"".join(stored[e.name] for e in entries))
    return path


def unresolved_tree(directory: Path, first: int) -> list[Path]:
    """A reference cycle (neither file holds what the other refers to) and a dangling reference."""
    n = first
    return [
        forge(directory, n, {"own": b"a" * 16}, {"x": (f"j-step{n + 1:08d}.safetensors", "x")}),
        forge(directory, n + 1, {"own": b"b" * 16}, {"x": (f"j-step{n:08d}.safetensors", "x")}),
        forge(directory, n + 2, {"own": b"c" * 16}, {"x": ("j-step99999999.safetensors", "x")}),
    ]


def test_gc_never_deletes_the_only_checkpoint_that_verifies(base: Path) -> None:
    """Newer checkpoints whose references do not resolve (a cycle, a dangling one) are not
    verified: ``gc --keep-last 1`` keeps the only good one. Before, the newest unresolved one
    counted as the newest verified and the good one was deleted."""
    d = base / "gc"
    d.mkdir()
    good = forge(d, 1, {"w": b"g" * 2048}, {})
    bad = unresolved_tree(d, 2)
    r = ckptd_cli("gc", str(d), "--job", "j", "--keep-last", "1", "--json")
    assert good.exists(), r.stdout + r.stderr
    verdicts = {Path(v["path"]).name: v for v in json.loads(r.stdout)}
    assert "newest_verified" in json.dumps(verdicts[good.name]["reasons"]), verdicts
    assert all(p.exists() and "unverified" in json.dumps(verdicts[p.name]["reasons"]) for p in bad), verdicts
    assert ckptd_cli("verify", str(good)).returncode == 0
    assert all(ckptd_cli("verify", str(p)).returncode == 1 for p in bad)


def test_a_saves_prune_keeps_itself_and_what_verifies_over_newer_unresolved_files(base: Path) -> None:
    """A real save (step 2, ``keep_last=2``) into a directory whose newer files (steps 10-12) do
    not resolve: the save's own prune keeps the new checkpoint and the good step 1. Before, the
    unresolved files took both keep_last places and the save deleted itself and step 1."""
    d = base / "prune"
    d.mkdir()
    good = forge(d, 1, {"w": b"g" * 2048}, {})
    unresolved_tree(d, 10)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ckpt = Checkpointer("j", d, model=model, every_steps=2, keep_last=2, socket=False, quiet=True, save_final=False)
    ckpt.step()
    ckpt.step()
    ckpt.close(final=False)
    saved = d / "j-step00000002.safetensors"
    assert saved.exists() and good.exists(), sorted(os.listdir(d))
    assert ckptd_cli("verify", str(saved)).returncode == 0
