"""The package's layering (docs/architecture.md): dependencies point down and there are no import cycles.

Imports are read from the source (module level and inside functions alike, since a lazy import is still a
dependency; ``if TYPE_CHECKING:`` blocks are annotations only and are skipped), so a cycle fails here before it
shows up as an ImportError in some import order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import inceptionnext

PKG = "inceptionnext"
ROOT = Path(inceptionnext.__file__).resolve().parent

#: layer of each top-level module or subpackage: a module may import its own layer and the ones below
LAYERS = {
    "errors": 0, "version": 0,
    "kernels": 1,
    "layers": 2,
    "models": 3, "checkpoint": 3,
    "reparam": 4, "complexity": 4, "data": 4, "inference": 4,
    "engine": 5, "recipes": 5,
    "segmentation": 6, "detection": 6, "tools": 6, "export": 6, "serve": 6, "quantize": 6, "benchmark": 6,
    "cli": 7, "__main__": 7,
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)  # the else branch runs
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
            out.update(t for t in targets if t == PKG or t.startswith(PKG + "."))
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not (target == PKG or target.startswith(PKG + ".")):
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if sub in modules else target)
    out.discard(name)
    return out


def _with_parents(name: str, targets: set[str], modules: dict[str, Path]) -> set[str]:
    """Importing ``pkg.sub.mod`` runs ``pkg/sub/__init__.py`` first: from outside ``pkg.sub`` that is an import too
    (a lazy import of a sibling's module can close a loop through the package's ``__init__``)."""
    out = set(targets)
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and not name.startswith(parent + ".") and name != parent:
                out.add(parent)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(name, path, modules) if t in modules}
        graph[name] = _with_parents(name, targets, modules) - {name}
    return graph


def _layer(module: str) -> int | None:
    if module == PKG:
        return None
    return LAYERS.get(module.split(".")[1])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_reader_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The checker itself: a function-level import is an edge, a TYPE_CHECKING import is not."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import config\n"
        "def f():\n    from ..models import factory\n    from .. import errors\n"
    )
    modules = {f"{PKG}.models.factory": src, f"{PKG}.errors": src}
    assert _imports(f"{PKG}.data.mod", src, modules) == {f"{PKG}.models.factory", f"{PKG}.errors"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = {f"{PKG}.models": src, f"{PKG}.models.metanext": src, f"{PKG}.models.factory": src}
    assert _with_parents(f"{PKG}.checkpoint", {f"{PKG}.models.metanext"}, modules) == {
        f"{PKG}.models.metanext",
        f"{PKG}.models",
    }
    assert _with_parents(f"{PKG}.models.factory", {f"{PKG}.models.metanext"}, modules) == {f"{PKG}.models.metanext"}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _modules() if m != PKG and _layer(m) is None)
    assert not unplaced, f"add these to LAYERS here and to docs/architecture.md: {unplaced}"


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_dependencies_point_down():
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in sorted(_graph().items())
        for t in sorted(targets)
        if m != PKG and (t == PKG or (_layer(t) or 0) > (_layer(m) or 0))
    ]
    assert not upward, "imports that point up (or into the root facade):\n" + "\n".join(upward)


@pytest.mark.parametrize("command", __import__("inceptionnext.cli", fromlist=["COMMANDS"]).COMMANDS)
def test_each_command_is_one_module(command):
    """One way to add a command: a module of inceptionnext.cli with add_parser(subparsers) and run(args)."""
    import argparse
    import importlib

    module = importlib.import_module(f"{PKG}.cli.{command}")
    sub = argparse.ArgumentParser().add_subparsers()
    parser = module.add_parser(sub)
    assert isinstance(parser, argparse.ArgumentParser)
    assert callable(module.run)
