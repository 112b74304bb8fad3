"""The layering of the package (docs/architecture.md): a module imports only from its own
layer or lower ones, the compute core never imports Qt or napari, and no modules import each
other in a cycle. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "napari_mil"

# lowest first; a module's layer is that of the longest prefix listed
LAYERS = [
    ["napari_mil", "napari_mil.errors", "napari_mil.atomic", "napari_mil.paths", "napari_mil.devices",
     "napari_mil._h5", "napari_mil.geometry", "napari_mil.names"],
    ["napari_mil.slide", "napari_mil.heatmaps"],
    ["napari_mil.tissue"],
    ["napari_mil.tiling", "napari_mil.synthetic", "napari_mil.exports"],
    ["napari_mil.encoders", "napari_mil.models", "napari_mil.features"],
    ["napari_mil.training"],
    ["napari_mil.usecases"],
    ["napari_mil.cli", "napari_mil._napari"],
]
FRONT_ENDS = ("napari_mil.cli", "napari_mil._napari")
GUI_PACKAGES = ("qtpy", "magicgui", "superqt", "napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{module} is in no layer of tests/core/test_architecture.py: add it"
    return layer


def test_no_module_imports_from_a_higher_layer():
    graph = _graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _layer(b) > _layer(a) and not b == "napari_mil")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_only_the_front_ends_import_qt_or_napari():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith(FRONT_ENDS):
            continue
        gui = sorted(m for m in _imports(path) if m.split(".")[0] in GUI_PACKAGES)
        if gui:
            offenders.append(f"{name}: {', '.join(gui)}")
    assert not offenders, "the core imports GUI packages:\n" + "\n".join(offenders)


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages expose them, not a cycle
    edges = {a: {b for b in targets if not (b.startswith(a + ".") or a.startswith(b + ".") and b != "napari_mil")}
             for a, targets in graph.items()}
    edges = {a: {b for b in targets if b != "napari_mil"} for a, targets in edges.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
