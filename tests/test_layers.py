"""The package's layering (docs/architecture.md), checked on the source: every module's imports are
parsed with ast, nothing is imported.

Fails on an import cycle, a stage importing a stage, a library module importing a stage, a library
layer importing a layer it may not, a micronet import inside a function, a module in no known layer,
and a module over 400 lines.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "micronet"
MAX_LINES = 400

# The stages: micronet/<stage>.py, run as ``python -m micronet.<stage>``.
STAGES = {"train", "evaluate", "soft_labels", "prune", "quantize", "cache_search", "score", "sensitivity",
          "pipeline", "release"}
# Library layer -> the layers it may import (besides itself). Stages may import every library layer.
MAY_IMPORT = {
    "runs": set(),
    "data": {"runs"},
    "model": {"runs"},
    "training": {"runs", "data", "model"},
    "scoring": {"runs", "model"},
    "compress": {"runs", "data", "model", "scoring"},
    "report": {"runs", "data", "scoring"},
    "stagekit": {"runs", "data", "model", "training", "scoring", "compress"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {module_name(p) for p in ROOT.rglob("__init__.py")}


def layer(mod: str) -> str:
    """``stage``, a library layer name, ``root`` (micronet/__init__), or ``unknown``."""
    parts = mod.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in MAY_IMPORT:
        return parts[1]
    return "stage" if len(parts) == 2 and parts[1] in STAGES else "unknown"


def _package_of(mod: str) -> str:
    return mod if mod in PACKAGES else mod.rpartition(".")[0]


def imports(mod: str) -> list[tuple[str, int, bool]]:
    """(imported micronet module, line, at module level?) for every import in ``mod``.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
    """
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1
                pkg = _package_of(mod).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.append(sub if sub in MODULES else base)
        for t in targets:
            if t == "micronet" or t.startswith("micronet."):
                out.append((t, node.lineno, id(node) in top))
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    unknown = [m for m in MODULES if layer(m) == "unknown"]
    assert not unknown, (f"modules in no layer: {unknown}; a stage goes in STAGES (micronet/<stage>.py), library "
                         f"code into a subpackage of {sorted(MAY_IMPORT)} (see docs/architecture.md)")


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_packages_import_and_reexport_what_they_list(pkg):
    """Every subpackage imports, and every name its ``__all__`` lists exists (stale re-exports fail here)."""
    mod = importlib.import_module(pkg)
    missing = [n for n in getattr(mod, "__all__", []) if not hasattr(mod, n)]
    assert not missing, f"{pkg}.__all__ lists names it does not have: {missing}"


def test_imports_resolve():
    missing = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() for t, line, _ in edges if t not in MODULES]
    assert not missing, missing


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: every component of more than one module (or a module
    importing itself) is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, []):
                cycles.append(sorted(comp))

    for m in list(graph):
        if m not in index:
            visit(m)
    return cycles


def layer_violations(graph: dict[str, list[str]]) -> list[str]:
    """Stage -> stage, library -> stage, and library -> a layer it may not import."""
    bad = []
    for m, targets in graph.items():
        for t in targets:
            lm, lt = layer(m), layer(t)
            if lm == "stage" and lt == "stage" and t != m:
                bad.append(f"the stage {m} imports the stage {t}")
            elif lm in MAY_IMPORT and lt == "stage":
                bad.append(f"the library module {m} imports the stage {t}")
            elif lm in MAY_IMPORT and lt != lm and lt not in MAY_IMPORT[lm]:
                bad.append(f"{m} ({lm}) imports {t} ({lt}); {lm} may import {sorted(MAY_IMPORT[lm])}")
    return bad


def edges() -> dict[str, list[str]]:
    return {m: [t for t, _, _ in GRAPH[m] if t in MODULES] for m in MODULES}


def test_no_import_cycles():
    assert not find_cycles(edges()), f"import cycles: {find_cycles(edges())}"


def test_layers_import_only_down():
    """No stage imports a stage, no library module a stage, no layer a layer above or beside it."""
    bad = layer_violations(edges())
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail():
    """The same checks on a small made-up graph find the cycle and each kind of bad import."""
    graph = {"micronet.compress.a": ["micronet.compress.b"], "micronet.compress.b": ["micronet.compress.c"],
             "micronet.compress.c": ["micronet.compress.a"], "micronet.runs.x": ["micronet.runs.x"],
             "micronet.prune": ["micronet.quantize", "micronet.compress.a"],
             "micronet.model.m": ["micronet.evaluate", "micronet.training.t"]}
    assert sorted(find_cycles(graph)) == [["micronet.compress.a", "micronet.compress.b", "micronet.compress.c"],
                                          ["micronet.runs.x"]]
    assert layer_violations(graph) == [
        "the stage micronet.prune imports the stage micronet.quantize",
        "the library module micronet.model.m imports the stage micronet.evaluate",
        "micronet.model.m (model) imports micronet.training.t (training); model may import ['runs']",
    ]
    assert layer("micronet.tensorboard") == "unknown"  # a new flat module must be given a home


def test_imports_name_modules_not_package_reexports():
    """Package ``__init__`` re-exports are for users and notebooks; inside micronet an import names the
    defining module, so the graph above is the real one (an __init__ imports its own package only)."""
    bad = [f"{m}:{line} imports the package {t}" for m, edges in GRAPH.items() for t, line, _ in edges
           if t in PACKAGES and not (m in PACKAGES and (t == m or _package_of(t) == m))]
    assert not bad, bad


def test_no_function_level_micronet_imports():
    """A micronet import inside a function usually dodges a cycle; every one sits at module level."""
    bad = [f"{m}:{line} imports {t} inside a function or block" for m, edges in GRAPH.items()
           for t, line, top in edges if not top]
    assert not bad, bad


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    n = len(MODULES[mod].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[mod]} has {n} lines (at most {MAX_LINES}: split it by concern)"
