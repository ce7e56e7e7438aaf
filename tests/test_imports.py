"""No import circle among mmfl's modules: each concern has one room, and rooms import downwards.

The imports are read from the source with ``ast``, not by importing, so every module counts,
including ones that need an optional dependency to run. Every ``import`` statement of a file is
an edge, wherever it stands: at the top, inside a function (a deferred import still makes the
two rooms depend on each other; it only hides the circle until the function runs, which is how
``checkpoint -> models -> pretrained -> checkpoint`` went unnoticed) or under
``if TYPE_CHECKING:`` (a type named from another room is a dependency of this one too). An edge
goes to the most specific module named: ``from mmfl.index import store`` is an edge to
``mmfl.index.store``, ``from mmfl.models import build_model`` one to the package ``mmfl.models``
(its ``__init__``). Two things are not edges: the parent packages Python runs before a submodule
(or every package re-exporting its own modules would be a circle), and modules named by a string
(``importlib.import_module``: the CLI's command table, ``mmfl``'s lazy public names), which
``ast`` cannot see and which point down only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import mmfl

SOURCE = Path(mmfl.__file__).resolve().parent


def module_graph(package_dir: Path) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` for every ``.py`` file under ``package_dir``."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    root = package_dir.name

    def known(name: str) -> str | None:
        """The deepest module of the package that ``name`` lies in (``pkg.mod.attr`` -> ``pkg.mod``)."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names if alias.name.split(".")[0] == root)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != root:
                    continue
                # ``from pkg import sub`` names the submodule ``pkg.sub``; ``from pkg import attr`` names ``pkg``
                targets.update(known(f"{source}.{alias.name}") for alias in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]], limit: int = 100) -> list[list[str]]:
    """Every elementary cycle (up to ``limit``), each as ``[a, b, ..., a]`` starting at its smallest module.

    Each cycle is found once, from its smallest module, by a depth-first walk over modules larger
    than the start; that is exponential in the worst case but instant for a graph with few circles.
    """
    cycles: list[list[str]] = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack and len(cycles) < limit:
            node, path = stack.pop()
            for nxt in sorted(graph[node], reverse=True):
                if nxt == start:
                    cycles.append([*path, start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return sorted(cycles)[:limit]


def test_no_import_cycle_in_mmfl() -> None:
    cycles = find_cycles(module_graph(SOURCE))
    assert not cycles, f"{len(cycles)} import cycles in src/mmfl:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_counts_deferred_relative_and_type_only_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import A\n",
        "a.py": "A = 1\ndef f():\n    from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n",
        "c.py": "import os\nimport pkg.a\nfrom pkg import a as again\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = module_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
