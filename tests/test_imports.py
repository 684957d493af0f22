"""The library's shape, read from its source with ``ast`` (nothing is imported): no import cycle
among ``ernievil2`` modules, counting every import (module level, lazy ones inside functions,
``from . import x`` and other relative forms); no module over 550 lines, no function over 80."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ernievil2"
MAX_MODULE_LINES = 550
MAX_FUNCTION_LINES = 80

# An edge of the import graph: (importing module, imported module) -> line numbers of the imports.
Graph = dict[str, dict[str, list[int]]]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package`` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules among ``modules`` that one import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if is_package else name.split(".")[:-1]
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module or ""
        # ``from a import b``: b is the submodule a.b where there is one, else a name in a
        candidates = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in modules else base_name
                      for alias in node.names]
    found = []
    for target in candidates:
        while target and target not in modules:  # import a.b.c of a name-less path: nearest module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


def import_graph(package: Path) -> Graph:
    """Every import between the modules of ``package``, wherever in the module it is written."""
    files = module_files(package)
    graph: Graph = {name: {} for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py", set(files)):
                    lines = graph[name].setdefault(target, [])
                    if node.lineno not in lines:
                        lines.append(node.lineno)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c), c[0]) for c in sorted(components)]


def _cycle_in(graph: Graph, component: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside one strongly connected component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a component of Tarjan's


def describe_cycle(graph: Graph, cycle: list[str], files: dict[str, Path]) -> str:
    steps = [f"{a} -> {b} ({files[a].relative_to(REPO)}:{','.join(map(str, graph[a][b]))})"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


def long_functions(path: Path, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function or method longer than ``limit`` lines,
    nested ones included; a function's lines run from its ``def`` to its last statement."""
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    found.append((qualname, child.lineno, length))
                walk(child, qualname + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return found


# ------------------------------------------------------------------ the checker on a planted package


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root / "pkg"


def test_graph_counts_lazy_relative_and_from_imports(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from . import a\n",
        "pkg/a.py": "import os\nfrom .sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from .. import c\n    return c\n",
        "pkg/sub/d.py": "from . import b\nfrom ..c import NAME\nimport pkg.a.x\n",
        "pkg/c.py": "NAME = 1\nclass K:\n    def m(self):\n        from pkg.sub import b\n",
    })
    graph = import_graph(pkg)
    assert {k: sorted(v) for k, v in graph.items()} == {
        "pkg": ["pkg.a"],
        "pkg.a": ["pkg.sub.b"],
        "pkg.sub": [],
        "pkg.sub.b": ["pkg.c"],  # lazy, two dots: the top package's module c
        "pkg.sub.d": ["pkg.a", "pkg.c", "pkg.sub.b"],  # from . import b; from ..c import NAME; import pkg.a.x
        "pkg.c": ["pkg.sub.b"],  # lazy, inside a method, absolute
    }
    assert graph["pkg.sub.d"]["pkg.c"] == [2]
    # pkg.sub.b -> pkg.c -> pkg.sub.b, both edges written inside functions
    assert cycles(graph) == [["pkg.c", "pkg.sub.b", "pkg.c"]]


def test_graph_without_cycle_and_long_function_finder(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from . import b\n\ndef f():\n" + "    x = 1\n" * 5 + "\nclass C:\n    def g(self):\n"
                    + "        y = 2\n" * 3 + "\n        def inner():\n" + "            z = 3\n" * 4,
        "pkg/b.py": "import json\n",
    })
    assert cycles(import_graph(pkg)) == []
    assert long_functions(pkg / "a.py", 4) == [("f", 3, 6), ("C.g", 11, 10), ("C.g.inner", 16, 5)]
    assert long_functions(pkg / "a.py", 6) == [("C.g", 11, 10)]


def test_the_library_graph_is_read():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20 and sum(len(v) for v in graph.values()) > 40, "imports between ernievil2 modules"
    assert any(t.startswith("ernievil2.models") for t in graph.get("ernievil2.weights.load", {})), graph


# ------------------------------------------------------------------ the library


def test_no_import_cycle_in_the_library():
    files = module_files(PACKAGE)
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    assert not found, (f"{len(found)} import cycle(s) among ernievil2 modules (lazy imports count):\n  "
                       + "\n  ".join(describe_cycle(graph, c, files) for c in found))


def test_no_module_or_function_too_long():
    problems = []
    for name, path in module_files(PACKAGE).items():
        rel = path.relative_to(REPO)
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            problems.append(f"{rel}: module of {n} lines (at most {MAX_MODULE_LINES})")
        problems += [f"{rel}:{line}: {qualname}() of {length} lines (at most {MAX_FUNCTION_LINES})"
                     for qualname, line, length in long_functions(path, MAX_FUNCTION_LINES)]
    assert not problems, f"{len(problems)} too long:\n  " + "\n  ".join(problems)
