"""Every file path and project module a docstring or comment names exists.

A reference outlives what it names: a file renamed, a function merged, a document that
never was in the project. A reader following it finds nothing, so a stale one fails here.
Checked: paths under the project's folders (`service/record/queue.py`), the project's
top-level files (`README.md`), and dotted names of its modules (`service.record.queue`,
`worker.tasks.train_next_job`), in comments and docstrings of every Python source.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("seco_core", "service", "worker")
FOLDERS = (*PACKAGES, "scripts", "tests", "docs", "examples", "benchmarks", ".ci")
SOURCES = sorted(p for folder in (*PACKAGES, "scripts", "tests") for p in (ROOT / folder).rglob("*.py"))
PATH_RE = re.compile(
    r"(?<![\w./-])((?:\.\./)*(?:[\w.-]+/)+[\w.-]*\w|\w+\.(?:py|lua|md|toml|yml|yaml|cfg|ini))(?![\w/])"
)
SOURCE_SUFFIXES = (".py", ".lua", ".md", ".toml", ".yml", ".yaml", ".sh", ".json", ".js", ".css", ".html")
DOTTED_RE = re.compile(r"(?<![\w.])((?:seco_core|service|worker)(?:\.\w+)+)")


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each comment and docstring of a module."""
    text = path.read_text()
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):  # docstrings, of modules, classes, functions and attributes
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.append((node.lineno, node.value.value))
    return out


def path_exists(ref: str) -> bool | None:
    """Whether a path-like reference names something in the project; None: not a project path."""
    ref = ref.rstrip(".")
    if "<" in ref or "*" in ref or "{" in ref:
        return None  # a pattern, not a path
    if ref.startswith("../"):  # outside the project: a reader of the repository cannot follow it
        return False if ref.endswith(SOURCE_SUFFIXES) else None  # (else an example, e.g. ../etc/passwd)
    if "/" not in ref:  # a bare file name: the project's own top-level file, or a module somewhere in it
        if ref[0].isupper() or ref.endswith(".toml"):
            return (ROOT / ref).exists()
        if ref.endswith((".py", ".lua")):
            return any(ROOT.glob(f"*/**/{ref}"))
        return None
    first = ref.split("/")[0]
    if first not in FOLDERS:
        return None  # e.g. a storage key (tenants/<t>/...), a MIME type, a URL part
    return (ROOT / ref).exists()


def dotted_exists(name: str) -> bool:
    """Whether `a.b.c` is a project module, or a module and names defined in it (classes and their members)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[i:]
            break
    else:
        return False
    if not rest:
        return True
    defined = {n.id for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.Name)}
    for n in ast.walk(ast.parse(module.read_text())):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(n.name)
        elif isinstance(n, ast.alias):
            defined.add(n.asname or n.name.split(".")[0])
        elif isinstance(n, ast.Attribute):
            defined.add(n.attr)
    return all(part in defined for part in rest)


def stale_references(path: Path) -> list[str]:
    found = []
    for line, text in prose(path):
        for m in PATH_RE.finditer(text):
            if path_exists(m.group(1)) is False:
                found.append(f"{path.relative_to(ROOT)}:{line + text[: m.start()].count(chr(10))}: {m.group(1)}")
        for m in DOTTED_RE.finditer(text):
            if not dotted_exists(m.group(1).rstrip(".")):
                found.append(f"{path.relative_to(ROOT)}:{line + text[: m.start()].count(chr(10))}: {m.group(1)}")
    return found


def test_every_reference_in_prose_exists() -> None:
    found = [ref for path in SOURCES for ref in stale_references(path)]
    assert not found, "stale references:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "see ../shared/notes.md",
        "see DESIGN.md",
        "in worker/trainer_dpo.py",
        "`worker.tasks.run_job`",
        "`service.record.nowhere`",
    ],
)
def test_a_stale_reference_is_found(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "relative_to", lambda self, other: self)
    path = tmp_path / "probe.py"
    path.write_text(f'"""A module docstring."""\n\nX = 1  # and a comment: {text}\n')
    assert stale_references(path), text


def test_a_live_reference_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "relative_to", lambda self, other: self)
    path = tmp_path / "probe.py"
    path.write_text(
        '"""See service/record/queue.py, README.md, tasks.py, ../etc/passwd and\n'
        '`service.record.queue.Queue.claim_next`."""\n'
    )
    assert stale_references(path) == []
