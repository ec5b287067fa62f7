"""The package's shape: imports flow one way through the layers, with no circles.

errors -> config -> text/kv -> engine/storage -> presses/decode -> compress -> ingest -> client -> eval. A module may
import its own subpackage and anything of a lower rank, never a peer or anything above it; lazy
imports inside functions count too (only `if TYPE_CHECKING:` blocks are exempt). The Celery app
(`workers/`) and the command line (`cli/`) sit above the whole library: kvstore never imports them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvstore"
RANKS = {
    "errors": 0,
    "config": 1,
    "stages": 1,
    "text": 2,
    "kv": 2,
    "engine": 3,
    "storage": 3,
    "presses": 4,
    "decode": 4,
    "refs": 4.5,
    "search": 4.5,
    "compress": 5,
    "ingest": 6,
    "client": 7,
    "server": 7.5,
    "eval": 8,
    "celery": 9,  # kvstore/celery.py: only the entry point of `celery -A kvstore`; imported by nothing
}
ABOVE = ("workers", "cli")  # top-level packages built on the library
ENTRY_POINTS = {"kvstore.celery"}  # points Celery's command line at the workers' app, and does nothing else


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("kvstore", *ABOVE)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path, modules: set[str]) -> set[str]:
    """kvstore, workers and cli modules `path` imports (a `from pkg import name` naming a submodule counts as that
    submodule)."""
    tree = ast.parse(path.read_text())
    exempt = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in exempt:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _ours(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and _ours(node.module):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) & set(files) for name, path in files.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_area_has_a_rank() -> None:
    areas = {_area(m) for m in _graph()} - {""}
    assert areas <= set(RANKS), f"give these a rank: {sorted(areas - set(RANKS))}"


def test_imports_never_run_up_or_across_the_layers() -> None:
    wrong = []
    for module, imported in _graph().items():
        if not _area(module):
            continue  # the package root only names lazy exports
        for target in imported:
            same = _area(target) == _area(module)
            if not same and RANKS[_area(target)] >= RANKS[_area(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the flow:\n" + "\n".join(sorted(wrong))


def test_the_library_never_imports_the_workers_or_the_cli() -> None:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    wrong = [
        f"{module} -> {target}"
        for module, path in files.items()
        if module not in ENTRY_POINTS
        for target in _imports(path, set(files))
        if target.split(".")[0] in ABOVE
    ]
    assert not wrong, "the library reaches up into the layers on top of it:\n" + "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["kvstore.storage.store", "kvstore.storage.index", "kvstore.kv.compressed"])
def test_the_store_and_the_data_type_load_no_model_or_attention_code(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "bad = [m for m in sys.modules if m.startswith(('transformers', 'kvstore.engine', 'kvstore.decode'))]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
