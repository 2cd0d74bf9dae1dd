"""The shape of app/: no import cycles between its modules, no module over 400 lines, and
no code under app/ (or studies/) that imports the test suite.

Every ``import app.x`` / ``from app.x import y`` / relative import counts, function-local
ones included (they run too, only later); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import PROJECT_ROOT

APP = PROJECT_ROOT / "app"
STUDIES = PROJECT_ROOT / "studies"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except what sits in the body of an ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """The modules ``path`` (the module ``name``) imports, as absolute names; ``from pkg
    import mod`` names the submodule when ``pkg.mod`` is one of ``known``, else ``pkg``."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return out


def app_graph() -> dict[str, set[str]]:
    files = sorted(APP.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph = {}
    for f in files:
        targets = {t for t in imported(f, known) if t in known}
        graph[module_name(f)] = targets - {module_name(f)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component
    of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_the_cycle_finder_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_follows_local_relative_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    src = tmp_path / "mod.py"
    src.write_text(
        "from . import sibling\n"
        "from typing import TYPE_CHECKING\n"
        "import app.x\n"
        "from app.pkg import sub, name\n"
        "if TYPE_CHECKING:\n    from app.hidden import H\n"
        "else:\n    import app.shown\n"
        "def f():\n    from app.late import g\n"
        "from ..up import thing\n"
    )
    known = {"app.x", "app.pkg", "app.pkg.sub", "app.hidden", "app.late", "app.shown",
             "app.jobs.sibling"}  # fmt: skip
    got = {t for t in imported(src, known, "app.jobs.mod") if t.startswith("app")}
    assert got == {"app.jobs.sibling", "app.x", "app.pkg.sub", "app.pkg", "app.late",
                   "app.shown", "app.up"}  # fmt: skip


def test_app_has_no_import_cycle() -> None:
    found = cycles(app_graph())
    assert not found, "import cycles in app/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_in_app_is_over_400_lines() -> None:
    long = {
        str(f.relative_to(PROJECT_ROOT)): n
        for f in sorted(APP.rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_app_and_studies_never_import_the_test_suite() -> None:
    offenders = []
    for root in (APP, STUDIES):
        for f in sorted(root.rglob("*.py")):
            for target in imported(f, set()):
                if target == "tests" or target.startswith("tests."):
                    offenders.append(f"{f.relative_to(PROJECT_ROOT)} imports {target}")
    assert not offenders, offenders


# The edges: the HTTP app and its protocols, and the commands that write /v1's JSON or speak
# the protocol as a client (the CLI's classify, the bench's load).
EDGE_MODULES = ("app.api", "app.main", "app.cli", "app.bench")
WIRE_SCHEMAS = ("app.schemas", "app.api")


def test_no_module_below_the_edge_imports_a_wire_schema() -> None:
    """The serving core, the pipeline, the runtime and the jobs return plain typed results;
    only the edges render them (docs/design.md, "One edge contract")."""
    known = {module_name(f) for f in APP.rglob("*.py")}
    offenders = []
    for f in sorted(APP.rglob("*.py")):
        name = module_name(f)
        if name.startswith(EDGE_MODULES):
            continue
        for target in imported(f, known):
            if target.startswith(WIRE_SCHEMAS):
                offenders.append(f"{name} imports {target}")
    assert not offenders, offenders
