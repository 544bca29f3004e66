"""The code's shape: imports point one way (leaves first), no cycle, the runtime free of training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featx_edge"

# Layers, lowest first, by top-level package (or root module). A module may import from its own
# layer or below, never above. The flow reads bottom to top: data -> training -> export -> verify.
LAYERS = [
    {"featx_edge", "errors", "progress", "_tf", "versions", "files"},
    {"formats", "rundir"},
    {"runtime", "fidelity"},
    {"data", "backbones"},
    {"config"},
    {"training"},
    {"export"},
    {"verify"},
    {"bench", "bundle", "device", "mcu"},
    {"report"},
    {"fit"},
    {"cli", "__main__"},
]
RUNTIME_MAY_IMPORT = {"featx_edge", "errors", "formats", "files", "runtime", "progress", "versions"}
ROOT_MODULES_AT_MOST = 10


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Every featx_edge import of every module, including imports inside functions."""
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name, deps = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featx_edge"):
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
                deps |= submodules  # `from package import submodule` needs the submodule only
                if len(submodules) < len(node.names):
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("featx_edge"))
        graph[name] = deps - {name}
    return graph


def _layer(module: str) -> int:
    short = module.removeprefix("featx_edge.").split(".")[0] if module != "featx_edge" else "featx_edge"
    for rank, names in enumerate(LAYERS):
        if short in names:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py; place it")


def test_imports_point_one_way():
    upward = [f"{source} -> {target}" for source, targets in _graph().items() for target in targets
              if _layer(target) > _layer(source)]
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_runtime_imports_nothing_of_the_training_side():
    graph = _graph()
    for module, deps in graph.items():
        if module.startswith("featx_edge.runtime") or module == "featx_edge.device.guest":  # guest: on the device
            bad = {d for d in deps if d.removeprefix("featx_edge.").split(".")[0] not in RUNTIME_MAY_IMPORT}
            assert not bad, f"{module} imports {sorted(bad)}"
    code = ("import sys, featx_edge.runtime, featx_edge.runtime.selftest, featx_edge.device.guest; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')"
            " or m.startswith('featx_edge.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tensorflow" not in out and "keras" not in out and "featx_edge.training.train" not in out, out


def test_no_module_is_a_hub():
    """One job per module: none over 500 lines."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long


def test_the_root_shows_the_flow():
    """At most ten modules at the root; the rest live in packages named after the flow's stages."""
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= ROOT_MODULES_AT_MOST, root
    for stage in ("data", "backbones", "training", "export", "verify", "bench", "runtime", "device", "report", "cli"):
        assert (PACKAGE / stage / "__init__.py").is_file(), f"featx_edge/{stage}/ is not a package"


@pytest.mark.slow  # measured: 7.5 CPU s (tests/DURATIONS.md)
def test_every_package_says_what_it_holds_and_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        if init.parent == PACKAGE or init.parent.parent.name != "featx_edge":
            continue  # the root, and sub-packages of a package (its docstring covers them)
        assert "May import:" in doc, f"{init.relative_to(PACKAGE.parent)}: say what it holds and may import"
        allowed = doc.split("May import:")[1]
        pkg = init.parent.name
        deps = {d.removeprefix("featx_edge.").split(".")[0] for m, ds in _graph().items()
                if m.startswith(f"featx_edge.{pkg}.") or m == f"featx_edge.{pkg}" for d in ds}
        deps -= {pkg, "featx_edge", "errors", "progress", "versions", "_tf"}  # the leaves
        unnamed = [] if "every package" in allowed else sorted(d for d in deps if d not in allowed)
        assert not unnamed, f"featx_edge/{pkg}/ imports {unnamed}, which its __init__ docstring does not allow"
