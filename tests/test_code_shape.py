"""The package's shape, read from its source with `ast` (nothing is imported): every function is
under 100 lines, and conceptseg's own imports form no circle, neither at module level nor through
an import deferred into a function (which would only hide the circle)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "conceptseg"
MAX_FUNCTION_LINES = 100

# Imports deferred into a function that close a circle, each with why it stays. Nothing else may.
DEFERRED_CIRCLES = {
    # the family registry imports an adapter module (and its diffusers pipeline classes) only for the
    # family a model folder names; the adapters build on families.base
    ("conceptseg.families", "conceptseg.families.*"): "a registry that loads each family's adapter on demand",
}


def _modules() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield path.relative_to(SRC), node.name, node.end_lineno - start + 1


def test_every_function_is_under_100_lines():
    long = [f"{path}: {name} ({lines} lines)" for path, name, lines in _functions() if lines >= MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def _imported(node: ast.stmt, module: str, is_package: bool) -> list[str]:
    """The conceptseg names an import statement in `module` reads (absolute, relative resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(package + ([base] if base else []))
        return [f"{base}.{a.name}" for a in node.names] + [base]
    return []


def _top_level(body: list[ast.stmt]):
    """Statements that run when the module is imported (not those inside functions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        yield from _top_level([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])


def _import_graph(deferred: bool) -> dict[str, set[str]]:
    """module -> the conceptseg modules importing it runs: the imported module and the packages
    above it (their __init__ runs first; not the importer's own packages). With `deferred`, imports
    inside functions count too."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for node in ast.walk(tree) if deferred else _top_level(tree.body):
            for name in _imported(node, module, path.name == "__init__.py"):
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                parts = name.split(".")
                for target in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):
                    if target != module and target not in own:
                        graph[module].add(target)
    return graph


def _allowed(edge: tuple[str, str]) -> bool:
    importer, imported = edge
    return any(importer == a and (imported == b or (b.endswith(".*") and imported.startswith(b[:-1])))
               for a, b in DEFERRED_CIRCLES)


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_at_module_level():
    graph = _import_graph(deferred=False)
    assert sum(map(len, graph.values())) > 100  # the graph was read
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_import_circle_hidden_by_a_deferred_import():
    graph = _import_graph(deferred=True)
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not _allowed((module, t))}
    circle = _circle(graph)
    assert circle is None, ("import circle through an import inside a function: " + " -> ".join(circle)
                            + "; move what both sides need below both (or list it in DEFERRED_CIRCLES, with why)")


def test_the_circle_check_finds_circles():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _allowed(("conceptseg.families", "conceptseg.families.sd3")) and not _allowed(("conceptseg.families.sd3", "conceptseg.families"))
