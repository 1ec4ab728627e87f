"""The layers import one way (docs/architecture.md): core <- analyses, core <- reports, and the
entry points on top of everything; no import cycles among the project's modules.

Every import counts, at module level and inside functions, read from the source with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("probe", "analyses", "reports")
# The commands: `python -m probe.ablate`, `python -m probe.train`, `python -m analyses.NAME`.
ENTRY_POINTS = {"probe.ablate", "probe.train"}
# What each layer may import (besides itself): the core nothing above it, analyses and reports
# the core only, entry points anything but another entry point.
ALLOWED = {"core": {"core"}, "analyses": {"core", "analyses"}, "reports": {"core", "reports"},
           "entry": {"core", "analyses", "reports"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> str:
    if module in ENTRY_POINTS or module.endswith(".__main__"):
        return "entry"
    top = module.split(".")[0]
    return "core" if top == "probe" else top


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import probe.x.y` of a non-module: its module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, set(modules)) for module, path in modules.items()}


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"probe", "probe.ablate", "analyses.skipping", "analyses.skipping.__main__", "reports.html"} <= set(graph)
    assert "analyses.skipping" in graph["analyses.skipping.__main__"]  # from-imports are edges
    assert "probe.instrument.measurement" in graph["probe.ablate"]


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_go_down_only(module):
    graph = import_graph()
    mine = layer(module)
    upward = sorted(other for other in graph[module] if layer(other) != mine and layer(other) not in ALLOWED[mine])
    assert not upward, f"{module} ({mine}) imports {upward}: see docs/architecture.md for what each layer may import"
    entries = sorted(other for other in graph[module] if layer(other) == "entry")
    assert not entries, f"{module} imports the entry point(s) {entries}; nothing may import an entry point"


def test_no_import_cycles():
    graph = import_graph()
    # Depth-first search for a back edge; report the cycle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    # The rules themselves: a core module importing an analysis, and two modules importing each other.
    core = tmp_path / "core.py"
    core.write_text("def f():\n    from analyses.skipping import skipping\n")
    assert imports_of("probe.fake", core, {"analyses.skipping", "probe.fake"}) == {"analyses.skipping"}
    assert layer("analyses.skipping") not in ALLOWED[layer("probe.fake")]
    assert layer("analyses.skipping.__main__") == "entry" and layer("probe.ablate") == "entry"


# Imports inside functions only for optional dependencies (docs/architecture.md): the rest are at module level.
OPTIONAL = {"captum", "transformers"}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import inside a function of `path`'s source."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append((node.lineno, "." if node.level else (node.module or "").split(".")[0]))
    return sorted(set(found))


def test_imports_inside_functions_are_of_optional_dependencies_only():
    misplaced = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in project_modules().values()
                 for line, name in function_level_imports(path) if name not in OPTIONAL]
    assert not misplaced, "move these imports to module level: " + "; ".join(misplaced)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from sklearn.datasets import load_digits\n    import transformers\n")
    assert function_level_imports(source) == [(4, "sklearn"), (5, "transformers")]
