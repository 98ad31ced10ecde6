"""Architecture rules checked on the source tree itself (no imports executed).

The import graph of ``duravip`` must be acyclic. It is built with ``ast``
from every ``import`` and ``from ... import`` anywhere in a module: at module
level, inside functions, and under ``if TYPE_CHECKING:`` (a cycle that only
type checkers see is still a cycle in the design). How edges are counted:

* ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) are an edge
  to ``a.b.c``; ``from a.b import name`` (``name`` not a submodule) is an
  edge to ``a.b``, i.e. to the package's ``__init__``;
* a package ``__init__`` that re-exports from its submodules has edges to
  them, so a submodule importing names back from its own package's
  ``__init__`` is a cycle (import from the defining module instead);
* the implicit import of the parent packages that Python performs before
  ``a.b.c`` runs (``a``, ``a.b``) is *not* an edge: otherwise every package
  whose ``__init__`` re-exports a submodule would be a cycle by construction,
  and the rule would forbid re-exports rather than cycles.

Also: the sans-IO cores import no trio, not even through another module,
and no file under ``src/`` is longer than 500 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "duravip"
MAX_LINES = 500

#: Files owned by others that are still over MAX_LINES: the lead empties this
#: list as each one is split (issue 16). Do not add to it.
OVER_LIMIT_ALLOWED = {
}


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, mod: str, is_pkg: bool) -> str | None:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the tree."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owner(alias.name, modules)
                if target is not None:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, mod, is_pkg)
            if base is None or not (base == ROOT or base.startswith(ROOT + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _owner(base, modules)
                if target is not None:
                    yield target


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {
        mod: {t for t in imports_of(mod, path, modules) if t != mod}
        for mod, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _path_within(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete cycle inside ``comp``, for the failure message."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return [*path, start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return [*path, nxt[0]] if nxt else path
        path.append(fresh[0])
        seen.add(fresh[0])


#: Sans-IO cores: testable without an event loop, so trio must not be reachable.
SANS_IO = (
    "duravip.election.view",
    "duravip.election.claims",
    "duravip.election.rule",
    "duravip.election.quorum",
    "duravip.election.handover",
    "duravip.election.picture",
    "duravip.election.policy",
    "duravip.swim.core",
    "duravip.smtp.server",
)
_ASYNC_LIBS = {"trio", "trio_util"}


def imports_async_lib(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] in _ASYNC_LIBS for a in node.names
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] in _ASYNC_LIBS
        ):
            return True
    return False


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


# ------------------------------------------------------------------ the rules


def test_import_graph_of_duravip_is_acyclic() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(_path_within(graph, comp)) for comp in found
    )


def test_sans_io_cores_reach_no_trio() -> None:
    graph = import_graph()
    modules = source_modules()
    bad = {
        core: sorted(m for m in reachable(graph, core) if imports_async_lib(modules[m]))
        for core in SANS_IO
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_source_file_over_500_lines() -> None:
    too_long = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in OVER_LIMIT_ALLOWED:
            too_long[rel] = n
    assert not too_long, f"split these files (over {MAX_LINES} lines): {too_long}"


def test_allow_list_names_only_files_that_still_need_it() -> None:
    """Once a file is split, its entry must go (the list only shrinks)."""
    stale = {
        rel
        for rel in OVER_LIMIT_ALLOWED
        if not (SRC / rel).exists() or len((SRC / rel).read_text().splitlines()) <= MAX_LINES
    }
    assert not stale, f"remove from OVER_LIMIT_ALLOWED: {sorted(stale)}"


# ------------------------------------------------------------ the checker itself


def _graph_of(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    modules = {module_name(p, tmp_path): p for p in sorted((tmp_path / ROOT).rglob("*.py"))}
    return {m: {t for t in imports_of(m, p, modules) if t != m} for m, p in modules.items()}


def test_checker_sees_type_checking_function_level_and_reexport_cycles(tmp_path: Path) -> None:
    graph = _graph_of(
        tmp_path,
        {
            "duravip/__init__.py": "",
            "duravip/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from duravip.b import B\n",
            "duravip/b.py": "def f():\n    import duravip.a\n",
            "duravip/pkg/__init__.py": "from duravip.pkg.x import X\n",
            "duravip/pkg/x.py": "from . import y\n",
            "duravip/pkg/y.py": "from duravip.pkg import X\n",
            "duravip/ok/__init__.py": "from duravip.ok.m import M\n",
            "duravip/ok/m.py": "from duravip.ok.n import N\n",
            "duravip/ok/n.py": "N = 1\n",
        },
    )
    assert graph["duravip.a"] == {"duravip.b"}
    assert graph["duravip.b"] == {"duravip.a"}
    assert graph["duravip.pkg.x"] == {"duravip.pkg.y"}
    assert graph["duravip.pkg.y"] == {"duravip.pkg"}
    assert cycles(graph) == [
        ["duravip.a", "duravip.b"],
        ["duravip.pkg", "duravip.pkg.x", "duravip.pkg.y"],
    ]
