"""The hook's surface is what docs/ARCHITECTURE.md says it is: tests, benchmarks and examples
import ``trainer_hooks`` through ``__all__``, the public modules, or a testing seam the document
names. A test reaching into a private folder for anything else fails here, so a refactor of
the hook's inside is free to move it (issue 37).

Torch-free: the imports are read with ``ast``, the seams from the document's text.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
READERS = ("tests", "benchmarks", "examples")
PUBLIC_MODULES = {"trainer_hooks.hf", "trainer_hooks.lightning"}


def hook_imports() -> list[tuple[Path, str, str]]:
    """(file, module, name) for each name imported from the hook outside the package itself."""
    out = []
    for folder in READERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer_hooks"):
                    out += [(path, node.module or "", alias.name) for alias in node.names]
                elif isinstance(node, ast.Import):
                    out += [(path, a.name, "") for a in node.names if a.name.startswith("trainer_hooks.")]
    return out


def documented_seams() -> set[str]:
    """``module.name`` for each seam the architecture document lists (``_snapshot.staging.StagingBuffer``)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text[text.index("testing seams only") : text.index("## Glossary")]
    return {"trainer_hooks." + ref for ref in re.findall(r"`([\w.]+\.\w+)`", section)}


def public_names() -> set[str]:
    tree = ast.parse((ROOT / "trainer_hooks" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("trainer_hooks/__init__.py states no __all__")


def test_tests_and_examples_use_only_the_public_surface_or_a_documented_seam() -> None:
    seams, public = documented_seams(), public_names()
    wrong = [
        f"{path.relative_to(ROOT)}: {module} {name}".strip()
        for path, module, name in hook_imports()
        if not (
            (module == "trainer_hooks" and name in public) or module in PUBLIC_MODULES or f"{module}.{name}" in seams
        )
    ]
    assert not wrong, "not the hook's surface nor a seam named in docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_surface_check_sees_the_imports_it_judges() -> None:
    """The check above is not empty: it reads the seams and finds imports of them and of the surface."""
    imports = hook_imports()
    assert "trainer_hooks._snapshot.staging.StagingBuffer" in documented_seams()
    assert any(module == "trainer_hooks" and name == "Checkpointer" for _, module, name in imports)
    assert any(module.startswith("trainer_hooks._") for _, module, _ in imports)


def test_every_module_of_the_hook_is_public_or_in_a_private_folder() -> None:
    """The folders are the layers: a flat private module beside the public ones would be outside them."""
    top = {p.stem for p in (ROOT / "trainer_hooks").glob("*.py")}
    assert top == {"__init__", "checkpointer", "deepspeed", "hf", "lightning"}, top
    folders = {p.name for p in (ROOT / "trainer_hooks").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders and all(name.startswith("_") for name in folders), folders
