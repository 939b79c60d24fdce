"""The import graph of gpumagic/, read from the source (imports inside functions included):
no circle anywhere, also counting ``if TYPE_CHECKING:`` imports; the core never imports the edge
(at run time); results import no renderer; the OOM heuristics import no IPython.

The edge: the package face, the IPython layer (magics, _shell), the renderers (the row model,
text, HTML, progress, widgets, monitor), the demo and autoload. Everything else is the core:
plain Python and torch. Results reach their renderers only through the view registry (gpumagic.views),
which names renderer modules as strings and imports them on the first render.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gpumagic"
EDGE = {
    "gpumagic", "gpumagic.magics", "gpumagic._shell", "gpumagic.render.widgets", "gpumagic.monitor",
    "gpumagic.demo", "gpumagic.autoload", "gpumagic.__main__", "gpumagic.widgets",
}
IPYTHON_LAYER = {"gpumagic.magics", "gpumagic._shell"}
RENDERERS = {"gpumagic.render", "gpumagic.monitor",
             *(f"gpumagic.render.{p.stem}" for p in (PACKAGE / "render").glob("*.py") if p.stem != "__init__")}
EDGE |= RENDERERS
# modules whose job is plain result data (frozen dataclasses): they show themselves through the registry
RESULTS = {"gpumagic.report", "gpumagic.sweep_results"}
PLOTTERS = {"gpumagic.render.widgets", "gpumagic.render.sweep_widgets", "gpumagic.monitor"}


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _typing_only(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Full names a statement imports; ``from a import b`` names ``a.b`` when that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if modules()[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]


@cache
def imports(typing: bool = False) -> dict[str, set[str]]:
    """module -> every name it imports at run time (first-party modules and top-level packages);
    with ``typing``, the imports under ``if TYPE_CHECKING:`` too."""
    graph: dict[str, set[str]] = {}
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        skip = set() if typing else _typing_only(tree)
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                names.update(_imported(module, node))
        graph[module] = names
    return graph


def internal(module: str, typing: bool = False) -> set[str]:
    return {n for n in imports(typing)[module] if n in modules() and n != module}


def third_party(module: str) -> set[str]:
    return {n.split(".")[0] for n in imports()[module]}


def circles(typing: bool = False) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively); with
    ``typing``, imports under ``if TYPE_CHECKING:`` count too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules():
        if root in index:
            continue
        work = [(root, iter(sorted(internal(root, typing))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(internal(w, typing)))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def test_the_reader_sees_function_level_imports() -> None:
    # magics imports the tracker inside a method: a reader that misses it would miss lazy circles
    assert "gpumagic.tracking" in internal("gpumagic.magics")


def test_there_is_no_import_circle_in_the_package() -> None:
    assert circles() == []


def test_there_is_no_import_circle_counting_type_checking_imports() -> None:
    assert circles(typing=True) == []


@pytest.mark.parametrize("module", sorted(RESULTS))
def test_a_result_module_imports_no_renderer(module: str) -> None:
    # not even for type checking: results are plain data, renderers register for them
    assert sorted(internal(module, typing=True) & (RENDERERS | IPYTHON_LAYER)) == []


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith("gpumagic.oom")))
def test_the_oom_heuristics_import_no_ipython(module: str) -> None:
    assert "IPython" not in third_party(module)
    assert sorted(internal(module) & EDGE) == []


@pytest.mark.parametrize("module", sorted(m for m in modules() if m not in EDGE))
def test_a_core_module_imports_no_edge_module(module: str) -> None:
    assert sorted(internal(module) & EDGE) == []


@pytest.mark.parametrize("module", sorted(m for m in modules() if m not in EDGE))
def test_a_core_module_imports_neither_ipython_nor_a_renderer_library(module: str) -> None:
    assert sorted(third_party(module) & {"IPython", "ipywidgets", "matplotlib"}) == []


def test_only_the_ipython_layer_imports_ipython() -> None:
    # the demo is a program that starts a shell of its own
    assert {m for m in modules() if "IPython" in third_party(m)} <= IPYTHON_LAYER | {"gpumagic.demo"}


def test_only_the_renderers_import_ipywidgets_and_matplotlib() -> None:
    assert {m for m in modules() if third_party(m) & {"ipywidgets", "matplotlib"}} <= PLOTTERS

def test_the_oom_heuristics_import_no_ipython_even_indirectly() -> None:
    # oom.context guesses the batch variable and builds the advice's context from a namespace and
    # a cell's source: testable without a shell, so nothing it reaches may import IPython
    todo, reached = ["gpumagic.oom.context"], set()
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(internal(module))
    assert "gpumagic.oom.context" in modules()
    assert sorted(m for m in reached if "IPython" in third_party(m)) == []
