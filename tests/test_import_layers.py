"""The package's import graph: features stand side by side over the engine, not stacked.

A module stands one floor above the highest module it imports. `from . import x` of a submodule
imports that submodule; a registry package importing its own modules (methods/, encoders/) is the
one cycle allowed, since each module there imports only the registry's ``register``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dynbert"
MAX_FLOORS = 8


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [module, *submodules]
                found |= {target for target in targets if target in modules and target != name}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in modules and alias.name != name}
        graph[name] = found
    return graph


def _longest_chain(graph: dict[str, set[str]], start: str) -> list[str]:
    @functools.lru_cache(maxsize=None)
    def chain(module: str, seen: frozenset) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for imported in graph[module]:
            if imported not in seen:
                candidate = chain(imported, seen | {imported})
                best = candidate if len(candidate) > len(best) else best
        return (module, *best)

    return list(chain(start, frozenset({start})))


def test_the_import_graph_is_at_most_eight_floors_deep():
    graph = _imports(_modules())
    deepest = max((_longest_chain(graph, module) for module in graph), key=len)
    assert len(deepest) <= MAX_FLOORS, " -> ".join(deepest)


def test_only_registry_packages_import_back_up():
    graph = _imports(_modules())
    back = [(module, imported) for module, imports in graph.items() for imported in imports
            if module in graph[imported] and not (module.startswith(imported + ".") or imported.startswith(module + "."))]
    assert not back, f"modules importing each other: {back}"


def test_the_floor_count_sees_a_deeper_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _longest_chain(graph, "a") == ["a", "b", "c"]
