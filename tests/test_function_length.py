"""No function in featx_edge/ is longer than 60 lines (the project's standard: small functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx_edge"
MAX_LINES = 60
"""From the `def` line to the last line of the body, docstring and comments included: what a reader
has to hold at once."""


def _long_functions() -> dict[str, int]:
    """``{"path/in/package.py:qualified.name": lines}`` for every function over MAX_LINES."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found.update(_walk(tree, prefix=f"{path.relative_to(PACKAGE).as_posix()}:"))
    return found


def _walk(node: ast.AST, *, prefix: str, scope: str = "") -> dict[str, int]:
    found = {}
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{scope}{child.name}"
            lines = child.end_lineno - child.lineno + 1
            if not isinstance(child, ast.ClassDef) and lines > MAX_LINES:
                found[prefix + name] = lines
            found.update(_walk(child, prefix=prefix, scope=f"{name}."))
        else:
            found.update(_walk(child, prefix=prefix, scope=scope))
    return found


def test_no_function_is_over_60_lines():
    long = _long_functions()
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps): " + ", ".join(
        f"{name} ({lines})" for name, lines in sorted(long.items(), key=lambda item: -item[1]))

