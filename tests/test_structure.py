"""The package's shape: no import circle among its modules, the command line on top of the library only, the
builders of random-weight models kept out of the library's runtime, and tests that import no other test."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmzip"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every vlmzip module ``name`` imports, at the top or inside a function (``from X import y`` counts as an
    import of ``X.y`` when that is a module, else of ``X``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    graph = {name: imports(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def test_no_import_circle_among_the_packages_modules():
    assert cycles() == []


def test_the_detector_finds_a_circle(monkeypatch):
    real = imports
    monkeypatch.setitem(globals(), "imports", lambda name: real(name) | ({"vlmzip.api"} if name == "vlmzip.budgets"
                                                                          else set()))
    assert any("vlmzip.api" in group and "vlmzip.budgets" in group for group in cycles())


def test_no_library_module_imports_the_command_line():
    users = [name for name in MODULES if name != "vlmzip.cli" and "vlmzip.cli" in imports(name)]
    assert users == []


def test_the_library_runtime_does_not_import_the_model_builders():
    """Random-weight builders serve tests, ``arch:`` speed models and the lab's training; compressing, evaluating
    and drawing a real checkpoint never needs them."""
    runtime = ("vlmzip.api", "vlmzip.runtime", "vlmzip.llm_hooks", "vlmzip.kvcache", "vlmzip.sequence",
               "vlmzip.viz", "vlmzip.compose", "vlmzip.budgets")
    builders = {name for name in MODULES if name.startswith("vlmzip.builders")}
    offenders = {name: sorted(imports(name) & builders) for name in MODULES
                 if (name.startswith(runtime) or name.startswith(("vlmzip.adapters", "vlmzip.methods", "vlmzip.eval")))
                 and imports(name) & builders}
    assert offenders == {}


def test_tests_import_no_other_test_module():
    tests = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    offenders = {}
    for path in Path(__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        if names & tests:
            offenders[path.name] = sorted(names & tests)
    assert offenders == {}
