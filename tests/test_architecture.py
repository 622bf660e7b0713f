"""The import graph goes one way: foundations, then the method, then what uses it.

A module may import only from its own layer or the ones below; imports of this package
inside functions (a way to hide a cycle) are refused; and the graph has no cycle.
"""

import ast
from pathlib import Path

import fromage

SOURCE = Path(fromage.__file__).parent
# layer of each top-level module or package of fromage, bottom first
LAYERS = {
    "config": 0,
    "paths": 0,
    "metrics": 0,
    "ranks": 0,
    "reporting": 0,
    "model": 1,
    "data": 2,
    "infer": 3,
    "eval": 4,
    "train": 5,
    "bench": 6,
    "cli": 6,
    "doctor": 6,
    "web": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def fromage_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] if node.module.split(".")[0] == "fromage" else []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "fromage"]
    return []


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module-level imports between fromage modules, and imports found inside functions."""
    graph, hidden = {}, []
    for path in sorted(SOURCE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        graph[name] = {m for node in tree.body for m in fromage_imports(node)}
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [
                    f"{name}.{function.name} imports {m}"
                    for node in ast.walk(function)
                    for m in fromage_imports(node)
                ]
    return graph, hidden


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_every_module_has_a_layer():
    graph, _ = import_graph()
    unplaced = {m.split(".")[1] for m in graph if m != "fromage"} - set(LAYERS)
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"
    assert len(graph) > 30  # the walk really found the package


def test_imports_point_down_the_layers():
    graph, _ = import_graph()
    upward = [
        f"{importer} -> {imported}"
        for importer, imports in graph.items()
        if importer != "fromage"  # the package's facade re-exports from every layer
        for imported in imports
        if layer(imported) > layer(importer)
    ]
    assert not upward


def test_no_function_level_imports_of_fromage():
    _, hidden = import_graph()
    assert not hidden


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                return [*path, module, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, module])):
                return cycle
        state[module] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(planted) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
