"""The module graph of `rstar`, read from its `import` statements with `ast`, has no cycle.

Every import counts, also those inside functions and `if TYPE_CHECKING:` blocks: a lazy import
hides a loop from Python at import time but not from a reader, and it is the reader's loop that
makes two modules one. An edge goes to the module an import names (`from a.b import c` goes to
`a.b.c` when that is a module, else to `a.b`); importing a module also runs its packages'
`__init__`, but a package's `__init__` importing its own submodules is not counted as a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_files(src: Path = SRC) -> dict[str, Path]:
    files = {}
    for path in src.rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules its import statements name."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x`, `from ..a import b`
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in files:
                        graph[name].add(target)
                    elif base in files:
                        graph[name].add(base)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    # The check itself: a planted loop through a lazy import is found, its absence is not invented.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p.b import g\n")
    (pkg / "b.py").write_text("from . import a\nfrom .c import X\n")
    (pkg / "c.py").write_text("X = 1\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a", "p.c"}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


def test_rstar_has_no_import_cycle() -> None:
    graph = import_graph(module_files())
    assert "rstar.search.run" in graph and graph["rstar.search.run"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
