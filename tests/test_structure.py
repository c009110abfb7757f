"""The code's shape, held by tests: no import cycles (imports inside functions count), no
private name imported from another module, no function over 60 lines in fastsd/, and a
Pipeline that reads as request -> encode -> denoise -> decode (under 250 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (export/ installs as fastsd.export)."""
    out = {}
    for folder, package in ((ROOT / "fastsd", "fastsd"), (ROOT / "export", "fastsd.export")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(module imported, names taken from it) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            if len(subs) == len(node.names):  # `from . import a, b`: the submodules themselves
                yield from ((s, ()) for s in subs)
            else:
                yield target, tuple(a.name for a in node.names)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t, _ in _imports(m, p, modules) if t in modules and t != m} for m, p in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_cross_modules():
    modules = _modules()
    crossing = [(m, target, name) for m, p in modules.items() for target, names in _imports(m, p, modules)
                if target.startswith("fastsd") for name in names if name.startswith("_") and not name.startswith("__")]
    assert not crossing, crossing


def test_functions_are_short_and_pipeline_shows_its_stages():
    long = []
    for path in (ROOT / "fastsd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
    tree = ast.parse((ROOT / "fastsd" / "pipeline.py").read_text())
    pipeline = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pipeline")
    assert pipeline.end_lineno - pipeline.lineno + 1 < 250
    assert ast.get_docstring(pipeline)
