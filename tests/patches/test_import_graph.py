"""The import graph of ``hf_kan.patches``, read from the source with ``ast`` (imports inside functions included):
acyclic, and layered: the engine imports only itself, family adapters only the engine, the public ``api`` only
those two, a method folder only the engine, itself and the ``api`` (its commands), and the registry the engine and
the method folders. Run alone:
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


def import_graph(sources: dict[str, tuple[bool, str]] | None = None) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, from every import statement, the ones inside functions
    included (``from pkg import sub`` counts as importing ``pkg.sub``). ``sources``: ``name -> (is_package, text)``
    (default: the installed ``hf_kan.patches``)."""
    if sources is None:
        sources = {name: (path.name == "__init__.py", path.read_text()) for name, path in _modules().items()}
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, (is_package, text) in sources.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(text)):
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
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in sources else source for a in node.names]
            graph[name].update(t for t in targets if t in sources and t != name)
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
        "api": {"engine", "families"},
        **{m: {"engine", m, "api"} for m in METHODS},
    }
    bad = []
    for module, targets in import_graph().items():
        area = _area(module)
        if area in allowed:
            bad += [f"{module} -> {t}" for t in sorted(targets) if _area(t) not in allowed[area]]
    assert not bad, bad


def test_optional_plotting_is_imported_only_inside_functions():
    """``import hf_kan.patches`` must not import matplotlib (an optional extra): only function bodies may."""
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "matplotlib" for n in names), name


def test_the_checker_sees_function_level_imports_and_cycles():
    sources = {
        "p": (True, "from . import a\n"),
        "p.a": (False, "from .b import f\n"),
        "p.b": (False, "def f():\n    from . import a\n    return a\n"),  # closes the cycle inside a function
        "p.c": (False, "import p.a\nfrom p import b\n"),
    }
    graph = import_graph(sources)
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a", "p.b"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert f"{PACKAGE}.api" in import_graph()[f"{PACKAGE}.prune.calibrate"]
