"""The layout rules of the package docstrings (agpo/__init__.py, agpo_kernels/__init__.py).

Read from the source with ``ast`` (nothing is imported): every import of a package module,
at module level or inside a function, is an edge; the rules are about those edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agpo", "agpo_kernels")
COMMANDS = {"agpo.train", "agpo.eval", "agpo.plot", "agpo.plan", "agpo_kernels.compile_report"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (the longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every package import of ``mod``."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                targets = []  # typing-only imports still count: they are where a cycle hides
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                targets = [f"{prefix}.{a.name}" for a in child.names] + [prefix]
            else:
                targets = []
            for t in targets:
                r = _resolve(t)
                if r is not None and r != mod:
                    out.append((r, inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                strong(w)
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
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            strong(v)
    return comps


def _parents(mod: str) -> set[str]:
    """A module's enclosing packages: importing a submodule runs them first (not an edge of ours)."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_graph_sees_imports():
    """The reader finds the imports a module really has (a rule over an empty graph cannot fail)."""
    edges = {(w, local) for w, local, _ in GRAPH["agpo_kernels.dispatch"]}
    assert ("agpo_kernels.inputs", False) in edges
    assert ("agpo_kernels.triton_engine.engine", True) in edges
    assert any(w == "agpo.learn.trainer" for w, _, _ in GRAPH["agpo.learn.launch"])


def test_no_import_cycle():
    """Function-local imports count: a cycle hidden behind one is still a cycle."""
    assert _cycles() == []


def test_nothing_imports_a_command_line_module():
    bad = [(m, w, line) for m, edges in GRAPH.items() for w, _, line in edges
           if w in COMMANDS and m not in _parents(w)]
    assert bad == []


def _violations(prefix: str, allowed) -> list[tuple[str, str, int]]:
    return [(m, w, line) for m, edges in GRAPH.items() if m == prefix or m.startswith(prefix + ".")
            for w, _, line in edges if not allowed(m, w)]


def _within(w: str, *prefixes: str) -> bool:
    return any(w == p or w.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("prefix, allowed", [
    # the algorithm: no model, rollout, distributed or training code
    ("agpo.algo", lambda m, w: _within(w, "agpo.algo", "agpo.errors", "agpo.tasks.rewards", "agpo.tasks.verifier")),
    # tasks: no training code
    ("agpo.tasks", lambda m, w: _within(w, "agpo.tasks", "agpo.errors", "agpo.models")),
    # the kernels: nothing of agpo; the trainer integrations may use the algorithm package alone
    ("agpo_kernels", lambda m, w: not _within(w, "agpo")
     or (m.startswith("agpo_kernels.integrations") and _within(w, "agpo.algo", "agpo.errors"))),
    ("agpo.runtime", lambda m, w: not _within(w, "agpo.learn", "agpo.rollout", "agpo.algo")),
])
def test_layer_rules(prefix, allowed):
    assert _violations(prefix, allowed) == []


def test_kernel_layers_point_down():
    """Engines and shared modules never import the public layer or the dispatcher; the
    designs receive their engine and import neither."""
    public = ("agpo_kernels.agpo_loss", "agpo_kernels.linear_logprobs", "agpo_kernels.integrations")
    lower = [m for m in MODULES if _within(m, "agpo_kernels.torch_engine", "agpo_kernels.triton_engine",
                                           "agpo_kernels.inputs", "agpo_kernels.chunks", "agpo_kernels.partials",
                                           "agpo_kernels.precision", "agpo_kernels.epilogue",
                                           "agpo_kernels.fused_loss", "agpo_kernels.recompute",
                                           "agpo_kernels.surrogate")]
    bad = [(m, w) for m in lower for w, _, _ in GRAPH[m]
           if _within(w, *public, "agpo_kernels.dispatch") or w == "agpo_kernels"]
    designs = ("agpo_kernels.fused_loss", "agpo_kernels.recompute", "agpo_kernels.surrogate")
    bad += [(m, w) for m in designs for w, _, _ in GRAPH[m]
            if _within(w, "agpo_kernels.torch_engine", "agpo_kernels.triton_engine")]
    assert bad == []


def test_every_module_is_where_its_package_says():
    """Each sub-package's docstring names its modules: a module it does not name is in
    the wrong room (or the docstring is stale)."""
    missing = []
    for pkg in [m for m, p in MODULES.items() if p.name == "__init__.py" and m.count(".") == 1
                and m.split(".")[0] == "agpo"]:
        doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text())) or ""
        for m in MODULES:
            if m.startswith(pkg + ".") and m.count(".") == 2:
                if f"``{m.rsplit('.', 1)[1]}``" not in doc:
                    missing.append(m)
    assert missing == []


def test_every_module_opens_with_a_docstring():
    assert [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))] == []
