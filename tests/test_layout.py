"""The package's layout, read from its source: tiers that import only downward, no import cycles, small modules,
helpers imported from where they live, and old module paths that warn with their new ones.

Every ``import`` counts: at module level, inside a function, and under ``if TYPE_CHECKING:``; ``import a.b.c`` (or
``from a.b.c import x``) also imports ``a.b``'s ``__init__`` unless the importer lives inside ``a.b``.
The tier list is also the table of docs/developing/architecture.md; a test keeps the two equal.
"""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest

import pyvene_patchscopes
from pyvene_patchscopes import _moved

ROOT = Path(pyvene_patchscopes.__file__).parent
PACKAGE = "pyvene_patchscopes"
ARCHITECTURE = ROOT.parent / "docs" / "developing" / "architecture.md"

# Lowest first. A module imports only from its own tier or a lower one. Names are relative to the package; "" is
# the package's own __init__ (the public face).
TIERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "core", "core.*")),
    ("data", ("spec", "spec.*", "result", "result.*")),
    ("models", ("models", "models.*")),
    ("pyvene boundary", ("compat", "compat.*", "interventions")),
    ("resolve", ("resolve",)),
    ("persist", ("persist", "persist.*")),
    ("presets and vectors", ("presets", "presets.*", "vectors")),
    ("plan", ("plan", "plan.*")),
    ("execution", ("execution", "execution.*")),
    ("export", ("export", "export.*")),
    ("analysis", ("analysis", "analysis.*")),
    ("jlens", ("jlens", "jlens.*")),
    ("jacobian", ("jacobian", "jacobian.*")),
    ("evaluate", ("evaluate", "evaluate.*")),
    ("explore", ("explore", "explore.*")),
    ("tools", ("tools", "tools.*")),
    ("cli", ("cli", "cli.*")),
    ("facade", ("", "_moved")),
]

# The imports that still break the rule, each named: (importer, imported) -> why, and the step that removes it.
ALLOWED: dict[tuple[str, str], str] = {
    ("result.sweep", "execution.sweeps"): "SweepResult.load, SweepFolder.load/dataset: deprecated shims of "
    "execution.sweeps.load_sweep, removed in 0.3.0",
    ("result.sweep", "export"): "SweepResult.plot/to_html: deprecated shims of export.sweep_figure/sweep_page, "
    "removed in 0.3.0",
    ("spec.patchscope", "execution.pipeline"): "the deprecated shim Patchscope.to_pyvene of "
    "pyvene_patchscopes.to_pyvene; removed in 0.3.0",
    ("spec.patchscope", "persist"): "the deprecated shims Patchscope.save/load/from_hub of "
    "save_patchscope/load_patchscope/patchscope_from_hub; removed in 0.3.0",
}

MAX_LINES = 450
# Modules over MAX_LINES today, each split by job in a later step of issue 38: name -> lines when listed.
OVERSIZE: dict[str, int] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _parents(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[:k]) for k in range(len(parts))]  # "" first


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int, str | None]]:
    """(imported module, kind, line, via) for every package import in `name`'s source. kind: "module", "lazy" or
    "type"; via: the explicit target when the edge is the implied ``__init__`` of its package, else None."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typed = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def add(target: str, node: ast.stmt) -> None:
        kind = "type" if id(node) in typed else "lazy" if id(node) in nested else "module"
        if target != name:
            found.append((target, kind, node.lineno, None))
        ancestors = set(_parents(name))
        for parent in _parents(target)[1:]:
            if parent not in ancestors and parent != name and parent in modules:
                found.append((parent, kind, node.lineno, target))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = [p for p in package.split(".") if p]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                module = node.module[len(PACKAGE) + 1 :]
            else:
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}" if module else alias.name
                add(full if full in modules else module, node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + ".") and alias.name[len(PACKAGE) + 1 :] in modules:
                    add(alias.name[len(PACKAGE) + 1 :], node)
    return [edge for edge in found if edge[0] in modules]


def import_graph() -> dict[str, list[tuple[str, str, int, str | None]]]:
    modules = _modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def tier_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(TIERS):
        if any(module == p or (p.endswith(".*") and fnmatch(module, p)) for p in patterns):
            return rank
    raise AssertionError(f"{PACKAGE}.{module} is in no tier of TIERS")


def _allowed(importer: str, imported: str, via: str | None) -> bool:
    return (importer, imported) in ALLOWED or (via is not None and (importer, via) in ALLOWED)


def upward_imports(graph) -> list[str]:
    return [
        f"{name}:{line} imports {imported} ({kind}; tier {TIERS[tier_of(name)][0]} -> {TIERS[tier_of(imported)][0]})"
        for name, edges in graph.items()
        for imported, kind, line, via in edges
        if tier_of(imported) > tier_of(name) and not _allowed(name, imported, via)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_tier():
    for name in _modules():
        tier_of(name)


def test_every_import_points_to_its_own_tier_or_a_lower_one():
    graph = import_graph()
    kinds = {kind for edges in graph.values() for _, kind, _, _ in edges}
    assert kinds == {"module", "lazy", "type"}  # the reader sees all three kinds
    assert upward_imports(graph) == []


def test_every_allowed_upward_import_is_still_there():
    """An entry whose import is gone is deleted, so that the list shrinks to nothing."""
    graph = import_graph()
    used = {(name, imported) for name, edges in graph.items() for imported, _, _, via in edges if via is None}
    assert sorted(set(ALLOWED) - used) == []


def test_the_tier_check_finds_an_upward_import():
    graph = {"errors": [("cli", "lazy", 3, None)], "spec.writes": [("spec", "module", 1, None)]}
    assert upward_imports(graph) == ["errors:3 imports cli (lazy; tier core -> cli)"]


def test_the_package_has_no_import_cycle_but_through_an_allowed_import():
    graph = import_graph()
    assert len(graph) > 60 and "execution.engine" in {i for i, *_ in graph["execution.sweep_units"]}
    edges = {name: {i for i, _, _, via in out if not _allowed(name, i, via)} for name, out in graph.items()}
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_is_over_the_line_limit_but_those_listed_for_a_split():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {
        name: sizes[name] for name in OVERSIZE if sizes.get(name, 0) > MAX_LINES
    }
    assert all(sizes.get(name, 0) > MAX_LINES for name in OVERSIZE), "a split module leaves OVERSIZE"


def test_helpers_come_from_their_own_modules_not_from_the_engine():
    """The engine is the ``run`` verb; jacobian/, analysis/fit.py and evaluate/ take Batch, sites and resolve
    elsewhere."""
    graph = import_graph()
    engine = "execution.engine"
    for name, edges in graph.items():
        imported = {i for i, *_ in edges}
        if name.startswith(("jacobian", "analysis.fit")):
            assert engine not in imported, name
    for name, path in _modules().items():
        if name.startswith("evaluate"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("execution.engine"):
                    assert {a.name for a in node.names} <= {"run"}, name


def test_compat_holds_only_the_pyvene_workarounds():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").rpartition(".")[2] == "compat":
                assert not {a.name for a in node.names} & {"Site", "hidden_state_site", "final_norm_path"}, name


def test_the_readmes_verbs_are_exported_from_the_package():
    from pyvene_patchscopes import SweepResult, build, fit_affine, load_sweep, sweep, sweep_figure, sweep_page
    from pyvene_patchscopes.analysis.fit import fit_affine as fit_affine_in_module
    from pyvene_patchscopes.execution.sweeps import load_sweep as load_sweep_in_module
    from pyvene_patchscopes.export import sweep_figure as sweep_figure_in_export, sweep_page as sweep_page_in_export
    from pyvene_patchscopes.presets import build as build_in_module
    from pyvene_patchscopes.result.sweep import SweepResult as SweepResultInModule

    assert callable(sweep) and SweepResult is SweepResultInModule and load_sweep is load_sweep_in_module
    assert sweep_figure is sweep_figure_in_export and sweep_page is sweep_page_in_export
    assert fit_affine is fit_affine_in_module and build is build_in_module


def test_the_docs_architecture_table_is_the_tier_list():
    section = ARCHITECTURE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \| ([^|]+?) \|$", section, flags=re.M)
    assert [(int(rank), tier) for rank, tier, _ in rows] == [(rank, tier) for rank, (tier, _) in enumerate(TIERS)]
    for (_, _, listed), (_, patterns) in zip(rows, TIERS):
        assert re.findall(r"`([^`]*)`", listed) == [p or PACKAGE for p in patterns]


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_works_and_warns_naming_the_new_one(old):
    new, release = _moved.MOVED[old]
    module = importlib.import_module(f"{PACKAGE}.{new}")
    name = next(n for n in sorted(vars(module)) if not n.startswith("_"))
    proxy = importlib.import_module(f"{PACKAGE}.{old}")
    moved = rf"{PACKAGE}\.{re.escape(old)} moved to {PACKAGE}\.{new}; .* {release}"
    with pytest.warns(DeprecationWarning, match=moved):
        assert getattr(proxy, name) is getattr(module, name)
    assert re.fullmatch(r"\d+\.\d+\.\d+", release)


def test_an_old_path_monkeypatched_reaches_the_new_module_loudly(monkeypatch):
    from pyvene_patchscopes.core import outputs

    proxy = importlib.import_module(f"{PACKAGE}.outputs")
    with pytest.warns(DeprecationWarning, match="core.outputs"):
        setattr(proxy, "_probe_of_test_layout", 1)
    assert outputs._probe_of_test_layout == 1
    del outputs._probe_of_test_layout


def test_an_old_top_level_module_name_warns_but_the_verb_sweep_stays_the_function():
    with pytest.warns(
        DeprecationWarning, match="pyvene_patchscopes.engine moved to pyvene_patchscopes.execution.engine"
    ):
        from pyvene_patchscopes import engine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from pyvene_patchscopes import sweep
    assert callable(sweep) and not isinstance(sweep, type(engine))
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        pyvene_patchscopes.no_such_module  # noqa: B018


def test_the_intervention_classes_keep_the_path_saved_pyvene_configs_name():
    from pyvene_patchscopes.interventions import MappingIntervention, RerouteIntervention

    assert str(MappingIntervention) == "<class 'pyvene_patchscopes.interventions.MappingIntervention'>"
    assert str(RerouteIntervention) == "<class 'pyvene_patchscopes.interventions.RerouteIntervention'>"


def _preset_name_tests(source: str) -> list[str]:
    """`==`, `!=`, `in` and `not in` tests of a value against a preset's name, written out as a string."""
    from pyvene_patchscopes.presets import PRESETS

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and all(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            for side in (node.left, *node.comparators):
                names = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [
                    f"line {node.lineno}: {n.value!r}"
                    for n in names
                    if isinstance(n, ast.Constant) and n.value in PRESETS
                ]
    return found


def test_no_caller_tests_a_presets_name_but_reads_its_fields():
    """What a preset needs (a tokenizer, a lens, a decoder, a fixed l*, rerouting) is a field of `Preset`; the CLI, the
    sweep and the explorer read the field instead of comparing the name (issue 38)."""
    tested = {
        str(path.relative_to(ROOT)): found
        for path in sorted(ROOT.rglob("*.py"))
        if not path.is_relative_to(ROOT / "evaluate")
        and (found := _preset_name_tests(path.read_text(encoding="utf-8")))
    }
    assert tested == {}
    assert _preset_name_tests('if args.preset == "jacobian-lens": pass') == ["line 1: 'jacobian-lens'"]


def test_the_architecture_pages_tree_names_every_folder_and_root_module_with_its_job():
    """docs/developing/architecture.md draws the package as a tree, one line per folder or root module saying its
    job; a folder or root module added without a line there fails here."""
    tree = ARCHITECTURE.read_text(encoding="utf-8").split("pyvene_patchscopes/\n", 1)[1].split("```", 1)[0]
    drawn = {line.split()[0] for line in tree.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    folders = {f"{path.name}/" for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    modules = {path.name for path in ROOT.glob("*.py")}
    assert drawn == folders | modules


def test_every_type_ignore_names_its_code_and_says_why_on_its_line():
    """Issue 38: no bare `# type: ignore`; each names the error it silences and gives its reason (mypy itself fails
    on one that is no longer needed: warn_unused_ignores)."""
    pattern = re.compile(r"# type: ignore\[[a-z-]+(, [a-z-]+)*\]  # \S")
    found = [
        (path, line)
        for path in ROOT.rglob("*.py")
        for line in path.read_text().splitlines()
        if "# type: ignore" in line
    ]
    assert found and all(pattern.search(line) for _, line in found), [
        f"{path.relative_to(ROOT)}: {line.strip()}" for path, line in found if not pattern.search(line)
    ]
