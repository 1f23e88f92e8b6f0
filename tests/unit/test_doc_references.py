"""Every ``ckptd.x.y`` / ``trainer_hooks.x.y`` a reader meets in the docs, the README and the code's
docstrings and comments names a module, or a name in one, that exists: a renamed or removed module
leaves no pointer to nothing behind it.

Torch-free and fast: a module is found as a file under the repository (what
``importlib.util.find_spec`` finds, without running ``trainer_hooks/__init__``, which imports
torch), and a name in it by parsing its source with ``ast``. Dotted words that are not code, the
header keys (``ckptd.step``) and file names (``ckptd.toml``), are told apart by the code itself:
a key is a string literal of the code, a file name ends in a file suffix.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("ckptd", "trainer_hooks")
REFERENCE = re.compile(r"(?<![\w.$/-])((?:ckptd|trainer_hooks)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./~$-])((?:ckptd|trainer_hooks)/[\w/]*\w(?:\.py)?)")
FILE_SUFFIXES = {"sock", "toml", "lock", "tmpfiles", "service", "json", "log", "db"}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def prose(path: Path) -> list[tuple[int, str]]:
    """A source file's docstrings and comments, with the line each starts on."""
    text = path.read_text()
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                out.append((doc.lineno, doc.value.value))
    return out


@cache
def data_words() -> tuple[set[str], tuple[str, ...]]:
    """Dotted words the code uses as data (header keys such as ``ckptd.step``): its string literals,
    and the literal heads of its f-strings (``ckptd.rank`` of ``ckptd.rank00003/...``)."""
    whole: set[str] = set()
    heads: set[str] = set()
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                heads.add(str(node.values[0].value))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                whole.add(node.value)
    return (
        {w for w in whole if w.startswith(PACKAGES)},
        tuple(h for h in heads if h.startswith(PACKAGES) and "." in h),
    )


def is_data(ref: str) -> bool:
    whole, heads = data_words()
    key = ".".join(ref.split(".")[:2])
    return key in whole or ref in whole or ref.startswith(heads) or ref.rsplit(".", 1)[1] in FILE_SUFFIXES


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def names_in(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body defines or imports, each with its node."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
        elif isinstance(node, (ast.If, ast.Try)):
            out.update(names_in(node.body))
            for handler in getattr(node, "handlers", []):
                out.update(names_in(handler.body))
            out.update(names_in(node.orelse))
    return out


def unresolved(ref: str) -> str:
    """Why ``ref`` names nothing ("" when it resolves): the longest prefix that is a module, then
    each further part a name defined in it (a class's names followed into its body)."""
    parts = ref.split(".")
    cut = next((c for c in range(len(parts), 0, -1) if module_file(".".join(parts[:c]))), 0)
    path = module_file(".".join(parts[:cut])) if cut else None
    if path is None:
        return f"no module {parts[0]}"
    scope: list[ast.stmt] = tree(path).body
    where = ".".join(parts[:cut])
    for name in parts[cut:]:
        found = names_in(scope).get(name)
        if found is None:
            return f"{where} has no {name!r} ({path.relative_to(ROOT)}) and no module {where}.{name} exists"
        if not isinstance(found, ast.ClassDef):
            return ""  # a function, a value or an imported name: its attributes are not followed
        scope, where = found.body, f"{where}.{name}"
    return ""


def paths_in(text: str) -> list[str]:
    """``ckptd/disk/verify.py``-style references, as dotted names."""
    return [m.removesuffix(".py").replace("/", ".") for m in PATH.findall(text)]


def references() -> list[tuple[str, str]]:
    """(where, reference) for every code reference, dotted or a path, in the prose a reader meets."""
    found: list[tuple[str, str]] = []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            found += [(f"{doc.relative_to(ROOT)}:{n}", m) for m in REFERENCE.findall(line) + paths_in(line)]
    for path in sources():
        for n, text in prose(path):
            found += [(f"{path.relative_to(ROOT)}:{n}", m) for m in REFERENCE.findall(text) + paths_in(text)]
    return [(where, ref) for where, ref in found if not is_data(ref)]


def test_every_module_and_function_the_docs_and_docstrings_name_exists() -> None:
    refs = references()
    assert len(refs) > 50, "the scan found almost nothing: the pattern or the paths are wrong"
    broken = [f"{where}: {ref}: {why}" for where, ref in refs if (why := unresolved(ref))]
    assert not broken, "references to code that does not exist:\n" + "\n".join(broken)


def test_the_check_tells_a_gone_module_from_a_present_one() -> None:
    assert unresolved("ckptd.disk.verify.verify_file") == ""
    assert unresolved("ckptd.disk.verify.VerifyResult.ok") == ""
    assert unresolved("trainer_hooks.checkpointer.Checkpointer") == ""
    assert unresolved("ckptd.persist")
    assert unresolved("ckptd.disk.verify.verify_unit_gone")
    assert unresolved("ckptd.disk.verify.VerifyResult.no_such_field")
    assert is_data("ckptd.meta_digest") and is_data("ckptd.toml") and not is_data("ckptd.policy.decide")
