"""The import rules of the package, checked on the source (AST; module-level AND function-local imports).

Layers, bottom to top; a module may import only its own layer and the layers its row allows:

=============== ================================================================ =====================================
layer           modules                                                          may import
=============== ================================================================ =====================================
numerics        ``wanjax.numerics`` (formats, codecs, packing, Hadamard)         numerics (+ jax / numpy / ml_dtypes)
kernels         ``wanjax.kernels`` (kernels/: Pallas kernels, references,        numerics
                dispatch)
model           ``wanjax.model``, ``wanjax.io``, ``wanjax.sampling``             numerics, support
support         the other ``wanjax.*`` modules (config, generation_config,       numerics, model
                sharding, parallel, conditioning, text, video_io, data, track,
                nonfinite, the ``wanjax`` package itself)
quant           ``wanjax.quant`` (quant/: transforms, calibration, recipes,      numerics, kernels, model, support
                QLinear, artifacts)
app             ``wanjax.pipeline``, ``wanjax.cli``, ``wanjax.demo``,            everything
                ``wanjax.evaluation``, ``wanjax.train``, ``bench``,
                ``wanjax.lora``
=============== ================================================================ =====================================

So: numerics < kernels < quant < app, and io / model / sampling (with the support modules) beside numerics/kernels,
below quant and app. The model does not import kernels today (``wanjax.model.attention`` picks XLA / cuDNN / TPU
attention through jax itself); when a Pallas attention kernel lands, either it goes in ``wanjax.kernels`` and the
model's row gains "kernels" (kernels must then never import the model), or the model keeps calling it through a hook.
No module may take part in an import cycle (between modules; a package's ``__init__`` counts as a module).

Known violations that other work will remove are listed, one edge each with its reason, in ``KNOWN_VIOLATIONS``;
the test fails as well when one of them is gone (remove it from the set then).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: source folder -> the import name of its package (pyproject's package-dir mapping; bench runs as ``python -m``)
SOURCE_ROOTS = {"wanjax": "wanjax", "quant": "wanjax.quant", "kernels": "wanjax.kernels", "bench": "bench"}

#: module prefix -> layer (the longest matching prefix wins; other ``wanjax.*`` modules are "support")
LAYER_OF_PREFIX = {
    "wanjax.numerics": "numerics",
    "wanjax.kernels": "kernels",
    "wanjax.quant": "quant",
    "wanjax.model": "model",
    "wanjax.io": "model",
    "wanjax.sampling": "model",
    "wanjax.pipeline": "app",
    "wanjax.cli": "app",
    "wanjax.demo": "app",
    "wanjax.evaluation": "app",
    "wanjax.train": "app",
    "wanjax.lora": "app",  # LoRA reader + apply: edits the model's Linears and the quantized QLinear (above quant)
    "bench": "app",
}
ALL_LAYERS = frozenset({"numerics", "kernels", "model", "support", "quant", "app"})
#: layer -> the layers it may import (its own included)
ALLOWED = {
    "numerics": frozenset({"numerics"}),
    "kernels": frozenset({"numerics", "kernels"}),
    "model": frozenset({"numerics", "model", "support"}),
    "support": frozenset({"numerics", "model", "support"}),
    "quant": frozenset({"numerics", "kernels", "model", "support", "quant"}),
    "app": ALL_LAYERS,
}

#: (importer, imported) edges that break a rule today and are scheduled to go; each with its reason.
KNOWN_VIOLATIONS: set = set()


# ------------------------------------------------------------------------------------------------------ the checker
def layer_of(module: str) -> str:
    """The layer of a module name (see the module docstring)."""
    best = None
    for prefix in LAYER_OF_PREFIX:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return LAYER_OF_PREFIX[best] if best else "support"


def discover(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """module name -> source file, for every .py under the source folders."""
    modules = {}
    for folder, package in SOURCE_ROOTS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(not p.isidentifier() for p in parts):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def _canonical(name: str, modules) -> str | None:
    """An absolute import name as one of ours (top-level ``quant`` / ``kernels``, as bench's sys.path hack imports them,
    count as ``wanjax.quant`` / ``wanjax.kernels``), or None if it is not ours."""
    head = name.split(".", 1)[0]
    if head in ("quant", "kernels") and head not in modules:
        name = "wanjax." + name
    while name and name not in modules:  # `import a.b.c` of a function-less name: the deepest module that exists
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, modules, is_package: bool = False) -> set[str]:
    """The modules of ours that ``source`` (the text of ``module``) imports anywhere (module level, functions,
    classes, conditionals). ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for t in targets:
            canon = _canonical(t, modules)
            if canon and canon != module:
                found.add(canon)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ours it imports."""
    modules = discover(root)
    return {
        m: imports_of(m, p.read_text(encoding="utf-8"), modules, p.name == "__init__.py") for m, p in modules.items()
    }


def layer_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges (importer, imported) whose layers the rule table forbids."""
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) not in ALLOWED[layer_of(a)]}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (every import cycle lies in one), sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def without(graph: dict[str, set[str]], edges) -> dict[str, set[str]]:
    """The graph minus ``edges``."""
    return {a: {b for b in targets if (a, b) not in edges} for a, targets in graph.items()}


def check(graph: dict[str, set[str]], known=frozenset()) -> list[str]:
    """Every problem of ``graph`` not covered by ``known``, as readable lines (empty: the rules hold)."""
    g = without(graph, known)
    problems = [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)}): the {layer_of(a)} layer may import only "
        f"{sorted(ALLOWED[layer_of(a)])}"
        for a, b in sorted(layer_violations(g))
    ]
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    return problems


# ------------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_tree_follows_the_import_rules(graph):
    problems = check(graph, KNOWN_VIOLATIONS)
    assert not problems, "import rules broken (see tests/test_import_layers.py):\n" + "\n".join(problems)


def test_known_violations_are_still_there(graph):
    """A fixed violation leaves KNOWN_VIOLATIONS, so that it cannot come back unnoticed."""
    gone = {e for e in KNOWN_VIOLATIONS if e[1] not in graph.get(e[0], set())}
    assert not gone, f"these KNOWN_VIOLATIONS are fixed, remove them from the set: {sorted(gone)}"


def test_the_graph_sees_function_local_and_relative_imports(graph):
    assert "wanjax.kernels.reference" in graph["wanjax.kernels.dispatch"]  # `from . import ...`
    assert "wanjax.kernels.w4a4_gpu" in graph["wanjax.kernels.w4a4_linear"]  # function-local `from .w4a4_gpu import`
    assert "wanjax.numerics.hadamard" in graph["wanjax.kernels.act_quant_gpu"]
    assert "wanjax.kernels.dispatch" in graph["wanjax.quant.qlinear"]  # function-local absolute import


def test_numerics_imports_no_other_layer(graph):
    for m, targets in graph.items():
        if layer_of(m) == "numerics":
            assert all(layer_of(t) == "numerics" for t in targets), (m, targets)


def test_checker_catches_an_upward_import():
    modules = {
        "wanjax.numerics.codecs": "",
        "wanjax.kernels.reference": "",
        "wanjax.quant.rtn": "",
        "wanjax.pipeline": "",
    }
    src = "def f():\n  from wanjax.quant import rtn\n  return rtn\n"  # function-local, upward (kernels -> quant)
    g = {
        "wanjax.kernels.reference": imports_of("wanjax.kernels.reference", src, modules),
        "wanjax.quant.rtn": {"wanjax.kernels.reference", "wanjax.numerics.codecs"},
        "wanjax.numerics.codecs": set(),
        "wanjax.pipeline": {"wanjax.quant.rtn"},
    }
    assert g["wanjax.kernels.reference"] == {"wanjax.quant.rtn"}
    problems = check(g)
    assert any("wanjax.kernels.reference (kernels) imports wanjax.quant.rtn (quant)" in p for p in problems), problems
    assert check(g, {("wanjax.kernels.reference", "wanjax.quant.rtn")}) == []
    # numerics -> kernels and quant -> app are upward as well
    assert layer_violations({"wanjax.numerics.pack": {"wanjax.kernels.reference"}})
    assert layer_violations({"wanjax.quant.apply": {"wanjax.pipeline"}})
    assert layer_violations({"wanjax.model.dit": {"wanjax.kernels.dispatch"}})
    assert not layer_violations({"wanjax.pipeline": {"wanjax.quant.rtn", "wanjax.numerics.codecs"}})


def test_checker_catches_a_cycle():
    modules = {"wanjax.numerics.a": "", "wanjax.numerics.b": "", "wanjax.numerics.c": ""}
    g = {
        "wanjax.numerics.a": imports_of("wanjax.numerics.a", "from wanjax.numerics import b\n", modules),
        "wanjax.numerics.b": imports_of("wanjax.numerics.b", "import wanjax.numerics.c\n", modules),
        "wanjax.numerics.c": imports_of("wanjax.numerics.c", "def f():\n  from . import a\n", modules),
    }
    assert cycles(g) == [["wanjax.numerics.a", "wanjax.numerics.b", "wanjax.numerics.c"]]
    assert check(g) == ["import cycle: wanjax.numerics.a <-> wanjax.numerics.b <-> wanjax.numerics.c"]
    assert check(g, {("wanjax.numerics.c", "wanjax.numerics.a")}) == []


def test_checker_fails_on_a_real_tree_with_a_bad_import(tmp_path):
    """Copy of the three source folders with one upward import added to a kernel module: the check fails."""
    import shutil

    for folder in SOURCE_ROOTS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    bad = tmp_path / "kernels" / "reference.py"
    bad.write_text(bad.read_text() + "\n\ndef _bad():\n  from wanjax.quant import rtn  # noqa\n  return rtn\n")
    problems = check(import_graph(tmp_path), KNOWN_VIOLATIONS)
    assert problems == [
        "wanjax.kernels.reference (kernels) imports wanjax.quant.rtn (quant): the kernels layer may "
        "import only ['kernels', 'numerics']"
    ]
