"""The import graph of ``hf_kan.patches``, read from the source with ``ast`` (imports inside functions included):
acyclic, and layered: the engine imports only itself, family adapters only the engine, a method folder only the
engine, itself and the public ``api``; the registry and the ``api`` sit on top. Run alone:
``python -m pytest tests/patches/test_import_graph.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_kan.patches

ROOT = Path(hf_kan.patches.__path__[0])
PACKAGE = "hf_kan.patches"
METHODS = ("mma", "var", "prune", "dyvte")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_layers_engine_families_methods_registry_api():
    allowed = {
        "engine": {"engine"},
        "families": {"engine", "families"},
        "registry": {"engine", *METHODS},
        "api": {"engine", "families", "registry"},
        **{m: {"engine", m, "api"} for m in METHODS},
    }
    bad = []
    for module, targets in import_graph().items():
        area = _area(module)
        if area in allowed:
            bad += [f"{module} -> {t}" for t in sorted(targets) if _area(t) not in allowed[area]]
    assert not bad, bad


def test_the_checker_sees_function_level_imports_and_cycles():
    graph = import_graph()
    assert f"{PACKAGE}.api" in graph[f"{PACKAGE}.prune.calibrate"]  # a module-level import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
