"""The package's shape: layers point one way, no import cycles, lazy imports say why.

- The import-linter contract in pyproject.toml (`[tool.importlinter]`) is kept: a module imports
  only from layers below its own (docs/methods.md, "Architecture").
- No import cycles between kdlab modules, counting imports inside functions (the design graph),
  and none at import time either (module-level imports plus the package `__init__` files that
  importing a submodule runs).
- Every import inside a function in kdlab/ carries a `# lazy: <why>` comment; `kdlab --help`
  loads no heavy library (that is what the lazy imports in cli.py and commands/ are for).
"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import grimp
import importlinter.configuration
import pytest
from importlinter.application.use_cases import read_user_options
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdlab"
HEAVY = {"torch", "torchvision", "timm", "numpy", "scipy", "sklearn", "pydantic", "yaml", "matplotlib", "PIL"}


# --------------------------------------------------------------------------- import-linter
@pytest.fixture(scope="module")
def contracts() -> list[LayersContract]:
    importlinter.configuration.configure()
    options = read_user_options(str(ROOT / "pyproject.toml"))
    found = [c for c in options.contracts_options if c["type"] == "layers"]
    assert found, "pyproject.toml has no [[tool.importlinter.contracts]] of type 'layers'"
    return [LayersContract(name=c["name"], session_options=options.session_options, contract_options=c)
            for c in found]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    # Every import statement, also those inside functions and under TYPE_CHECKING.
    return grimp.build_graph("kdlab", cache_dir=None)


def _broken(contract: LayersContract, graph: grimp.ImportGraph) -> list[str]:
    check = contract.check(graph, verbose=False)
    lines = []
    for dep in check.metadata["invalid_dependencies"]:
        for route in dep["routes"]:
            chain = " -> ".join([route["chain"][0]["importer"]] + [link["imported"] for link in route["chain"]])
            first = route["chain"][0]
            lines.append(f"{dep['importer']} must not import {dep['imported']}: {chain} "
                         f"({first['importer']} line {', '.join(map(str, first['line_numbers']))})")
    assert check.kept == (not lines)
    return lines


def test_layer_contracts_are_kept(contracts, graph):
    for contract in contracts:
        broken = _broken(contract, graph)
        assert not broken, (f"import-linter contract {contract.name!r} is broken (pyproject.toml "
                            "[tool.importlinter]; move the code down a layer or the import up):\n  "
                            + "\n  ".join(broken))


def test_every_module_is_in_a_layer(contracts, graph):
    # A module outside every layer would escape the contract. Only the root package stands outside.
    layers = {tail.name for contract in contracts for layer in contract.layers for tail in layer.module_tails}
    outside = sorted(m for m in graph.modules if m != "kdlab"
                     and not any(m == layer or m.startswith(layer + ".") for layer in layers))
    assert not outside, f"modules in no layer of pyproject.toml [tool.importlinter]: {', '.join(outside)}"


@pytest.mark.parametrize("importer, imported", [
    ("kdlab.losses.kd", "kdlab.engine.trainer"),        # the bottom layer reaching for the engine
    ("kdlab.models.weights", "kdlab.engine.checkpoint"),
    ("kdlab.data.views", "kdlab.engine.step"),
    ("kdlab.schema.experiment", "kdlab.methods"),            # the schema resolving method names itself
    ("kdlab.data.datasets", "kdlab.config"),             # config loading, which asks the registries
    ("kdlab.schema.experiment", "kdlab.config.resolve"),  # the schema reaching for name resolution
    ("kdlab.engine.evaluate", "kdlab.analysis.report"),
    ("kdlab.experiments.results", "kdlab.commands._common"),
])
def test_an_upward_import_breaks_the_contract(contracts, graph, importer, imported):
    # The contract is not vacuous: adding one upward import to the real graph breaks it.
    before = {line for contract in contracts for line in _broken(contract, graph)}
    added = not graph.direct_import_exists(importer=importer, imported=imported)
    graph.add_import(importer=importer, imported=imported)
    try:
        after = {line for contract in contracts for line in _broken(contract, graph)}
    finally:
        if added:
            graph.remove_import(importer=importer, imported=imported)
    assert any(importer in line for line in after - before)


# --------------------------------------------------------------------------- import cycles
@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    in_function: bool
    type_checking: bool


def _module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The kdlab modules `module` imports, each with where the statement stands."""

    def existing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            targets: list[str | None] = []
            if isinstance(child, ast.Import):
                targets = [existing(a.name) for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else existing(base)
                           for a in child.names]
            for target in targets:
                if target and target != module:
                    found.append(Import(module, target, child.lineno, in_function, type_checking))
            visit(child,
                  in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                  type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test)))

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return found


@pytest.fixture(scope="module")
def all_imports() -> list[Import]:
    modules = _module_files()
    return [imp for name, path in modules.items() for imp in _imports(name, path, modules)]


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def _all_cycles(edges: dict[str, set[str]], limit: int = 20) -> list[list[str]]:
    """Cycles found one at a time, dropping each one's closing edge before looking again."""
    edges = {k: set(v) for k, v in edges.items()}
    cycles = []
    while len(cycles) < limit and (cycle := _find_cycle(edges)) is not None:
        cycles.append(cycle)
        edges[cycle[-2]].discard(cycle[-1])
    return cycles


def _describe(cycles: list[list[str]], imports: list[Import]) -> str:
    out = []
    for cycle in cycles:
        out.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            hits = sorted({(i.line, i.in_function) for i in imports
                           if i.importer == a and (i.target == b or b in _ancestors(i.target))})
            how = ", ".join(f"line {line}{' (in a function)' if inside else ''}" for line, inside in hits)
            out.append(f"    {a} -> {b}: {how or 'runs the package __init__'}")
    return "\n  ".join(out)


def _design_edges(imports: list[Import]) -> dict[str, set[str]]:
    """Every import, also inside functions. A module importing its own package (`from
    kdlab.methods import register_method` in kdlab/methods/kd.py) is not an edge: that package
    is already being initialised when any of its modules runs; a package __init__ importing its
    submodules is an ordinary edge. Imports under `if TYPE_CHECKING:` never run and only name
    types for annotations: they count for the layer contract (import-linter), not here."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_checking and imp.target not in _ancestors(imp.importer):
            edges.setdefault(imp.importer, set()).add(imp.target)
    return edges


def _import_time_edges(imports: list[Import]) -> dict[str, set[str]]:
    """What Python runs while importing: module-level imports, and importing a.b.c also runs
    a/__init__.py and a/b/__init__.py (except the importer's own packages, already running)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.in_function or imp.type_checking:
            continue
        for target in [imp.target, *_ancestors(imp.target)]:
            if target not in _ancestors(imp.importer) and target != imp.importer:
                edges.setdefault(imp.importer, set()).add(target)
    return edges


def test_no_import_cycles_counting_imports_inside_functions(all_imports):
    cycles = _all_cycles(_design_edges(all_imports))
    assert not cycles, ("import cycles (imports inside functions count; break them by moving code to "
                        "the lower layer, not by importing inside a function):\n  "
                        + _describe(cycles, all_imports))


def test_no_import_cycles_at_import_time(all_imports):
    # A cycle here fails (or works only in one import order) with "cannot import name ... from
    # partially initialized module".
    cycles = _all_cycles(_import_time_edges(all_imports))
    assert not cycles, ("import-time cycles (a package __init__ that re-exports eagerly is a common "
                        "cause):\n  " + _describe(cycles, all_imports))


def test_the_two_graphs_model_python_imports():
    def imp(importer, target, in_function=False, type_checking=False):
        return Import(importer, target, 1, in_function, type_checking)

    # An eager facade: importing kdlab.schema.experiment runs kdlab/config/__init__.py, which imports
    # the loader, which imports the methods, which import the schema: an import-time cycle that
    # the design graph (explicit targets only) does not show.
    eager = [imp("m.base", "c.schema"), imp("c", "c.loader"), imp("c", "c.schema"), imp("c.loader", "m"),
             imp("m", "m.base")]
    assert _find_cycle(_design_edges(eager)) is None
    assert _find_cycle(_import_time_edges(eager)) == ["c", "c.loader", "m", "m.base", "c"]
    # The same import made lazily (inside a function) leaves import time alone but is a design cycle.
    lazy = [imp("a", "b"), imp("b", "a", in_function=True)]
    assert _find_cycle(_import_time_edges(lazy)) is None and _find_cycle(_design_edges(lazy)) == ["a", "b", "a"]
    # A package importing its submodules, which import the package back, is no cycle; a
    # TYPE_CHECKING import is none either.
    assert _find_cycle(_design_edges([imp("p", "p.x"), imp("p.x", "p"), imp("q", "r"),
                                      imp("r", "q", type_checking=True)])) is None


def test_cycle_finder_reports_the_path():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert _find_cycle({"x": {"x"}}) == ["x", "x"]
    two = _all_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}})
    assert sorted(map(tuple, two)) == [("a", "b", "a"), ("c", "d", "c")]


# --------------------------------------------------------------------------- lazy imports
def _comments(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _unexplained_lazy_imports(path: Path) -> list[tuple[int, str]]:
    """Imports inside functions without a `# lazy: <why>` comment on their line or the line
    above. One comment above covers the run of import statements that directly follows it."""
    source = path.read_text(encoding="utf-8")
    comments = {n: c for n, c in _comments(source).items() if "lazy" in c.lower()}
    lines = source.splitlines()
    bad = []

    def comment_above(line: int) -> bool:
        # the block of comment-only lines directly above `line`
        line -= 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            if line in comments:
                return True
            line -= 1
        return False

    def check(body: list[ast.stmt]) -> None:
        covered = False
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                same_line = any(comments.get(n) for n in range(stmt.lineno, stmt.end_lineno + 1))
                covered = covered or same_line or comment_above(stmt.lineno)
                if not covered:
                    bad.append((stmt.lineno, lines[stmt.lineno - 1].strip()))
            else:
                covered = False

    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(inner, field, None)
                    if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                        check(block)
    return sorted(set(bad))


def test_imports_inside_functions_say_why():
    bad = [f"{path.relative_to(ROOT)}:{line}: {text}"
           for path in sorted(PACKAGE.rglob("*.py")) for line, text in _unexplained_lazy_imports(path)]
    assert not bad, ("imports inside functions without a '# lazy: <why>' comment on the line or the "
                     "line above; move them to the top of the module unless they keep `kdlab --help` "
                     f"fast (or load an optional library):\n  " + "\n  ".join(bad))


def test_lazy_import_check_needs_the_comment(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def a():\n    import json\n\n"
        "def b():\n    # lazy: keeps `kdlab --help` fast\n    import json\n\n    from os import path\n\n"
        "def c():\n    import json  # lazy: as above\n    x = 1\n    import os\n"
        "def d():\n    import json  # noqa: F401\n"
        "def e():\n    # lazy: a reason that takes\n    # two lines\n    import json\n",
        encoding="utf-8",
    )
    assert [line for line, _ in _unexplained_lazy_imports(sample)] == [2, 13, 15]


def test_kdlab_help_loads_no_heavy_library():
    code = ("import sys; from kdlab.cli import build_parser; build_parser(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", (
        f"`kdlab --help` imports {out.stdout.strip()}: keep those imports inside the command's run() "
        "with a '# lazy: keeps `kdlab --help` fast' comment")


# --------------------------------------------------------------------------- config layering
def test_schema_validates_names_only_through_a_resolver():
    # The schema sits below the registries: alone it cannot pick a method's config class, and it
    # says how to validate instead; the loader layer's resolver makes the same data valid.
    from pydantic import ValidationError

    from kdlab.config.resolve import REGISTRY_NAMES
    from kdlab.schema.experiment import ExperimentConfig

    raw = {"model": {"name": "resnet8"}, "method": {"name": "kd", "temperature": 2},
           "teacher": {"name": "resnet8", "checkpoint": "t.pt"}}
    with pytest.raises(ValidationError, match="validate_config"):
        ExperimentConfig.model_validate(raw)
    cfg = ExperimentConfig.model_validate(raw, context=REGISTRY_NAMES)
    assert type(cfg.method).__name__ != "MethodConfig" and cfg.method.temperature == 2.0
    with pytest.raises(ValidationError, match="unknown model 'resnet9'"):
        ExperimentConfig.model_validate({**raw, "model": {"name": "resnet9"}}, context=REGISTRY_NAMES)
