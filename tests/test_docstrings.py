"""The public Python API documents itself: every public class, function and method says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvstore"
PUBLIC_MODULES = [
    "client.py",
    "config.py",
    "search.py",
    "decode/generation.py",
    "decode/answer.py",
    "engine/locate.py",
    "storage/backends/__init__.py",
]


def _undocumented(body: list[ast.stmt], prefix: str = "") -> list[str]:
    missing = []
    for node in body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if node.name.startswith("_") and node.name != "__init__":
            continue
        if ast.get_docstring(node) is None:
            missing.append(f"{prefix}{node.name} (line {node.lineno})")
        if isinstance(node, ast.ClassDef):
            missing += _undocumented(node.body, f"{node.name}.")
    return missing


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module: str) -> None:
    missing = _undocumented(ast.parse((PACKAGE / module).read_text()).body)
    assert not missing, f"kvstore/{module}: no docstring on " + ", ".join(missing)
