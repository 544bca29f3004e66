"""The code's shape: imports point one way (leaves first), no cycle, the runtime free of training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx_edge"

# Layers, lowest first. A module may import from its own layer or below, never above.
LAYERS = [
    {"featx_edge", "errors", "intervals", "progress", "_tf", "formats", "torch_state", "sample", "targets",
     "own_wheel", "versions", "ownership"},
    {"rundir"},
    {"runtime", "macs", "fidelity"},
    {"config", "backbones", "efficientnet_lite", "weights", "data", "model", "augment", "features"},
    {"train", "pretrain", "distribute", "checkpoints"},
    {"run"},
    {"export"},
    {"verify"},
    {"bench", "bundle", "report", "device"},
    {"cli", "__main__"},
]
RUNTIME_MAY_IMPORT = {"featx_edge", "errors", "formats", "rundir", "runtime", "progress", "versions"}


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
    assert "tensorflow" not in out and "keras" not in out and "featx_edge.train" not in out, out


def test_no_module_is_a_hub():
    """One job per module: none over 500 lines."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
