"""The package's layout, read from its source: no import cycles, and helpers imported from where they live.

Every ``import`` counts, at module level or inside a function; only ``if TYPE_CHECKING:`` blocks (which
never run) are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pyvene_patchscopes

ROOT = Path(pyvene_patchscopes.__file__).parent
PACKAGE = "pyvene_patchscopes"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, set[str]]:
    """{imported module: names imported from it} for every package module `name` imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    never_run = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if id(node) in never_run:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                target = f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                if target in modules and target != name:
                    found.setdefault(target, set()).add(alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.name != name:
                    found.setdefault(alias.name, set())
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and f"{PACKAGE}.engine" in graph[f"{PACKAGE}.sweep"]  # the reader sees the imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_helpers_come_from_their_own_modules_not_from_the_engine():
    """The engine is the ``run`` verb; jacobian/, fit.py and evaluate/ take Batch, sites and resolve elsewhere."""
    graph = import_graph()
    engine = f"{PACKAGE}.engine"
    for name, imported in graph.items():
        if name.startswith((f"{PACKAGE}.jacobian", f"{PACKAGE}.fit")):
            assert engine not in imported, name
        if name.startswith(f"{PACKAGE}.evaluate"):
            assert imported.get(engine, {"run"}) <= {"run"}, (name, imported.get(engine))


def test_compat_holds_only_the_pyvene_workarounds():
    graph = import_graph()
    compat = f"{PACKAGE}.compat"
    for name, imported in graph.items():
        assert not imported.get(compat, set()) & {"Site", "hidden_state_site", "final_norm_path"}, name


def test_the_readmes_verbs_are_exported_from_the_package():
    from pyvene_patchscopes import SweepResult, build, fit_affine, sweep
    from pyvene_patchscopes.analysis.fit import fit_affine as fit_affine_in_module
    from pyvene_patchscopes.presets import build as build_in_module
    from pyvene_patchscopes.execution.sweeps import SweepResult as SweepResultInModule

    assert callable(sweep) and SweepResult is SweepResultInModule
    assert fit_affine is fit_affine_in_module and build is build_in_module
