"""The layers import one way (docs/architecture.md): core <- analyses, core <- reports, and the
entry points on top of everything; inside the core, its subpackages in their order; no import
cycles among the project's modules; one registry of analyses, and no analysis wired elsewhere.

Every import counts, at module level and inside functions, read from the source with `ast`.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("probe", "analyses", "reports")
# The commands: `python -m probe.ablate`, `python -m probe.train`, `python -m analyses.NAME` (whose
# `__main__`s share `analyses.command`).
ENTRY_POINTS = {"probe.ablate", "probe.job", "probe.train", "analyses.command"}
# An entry point that imports its job (the part that does the work) once its options are read.
JOBS = {"probe.ablate": "probe.job"}
# What each layer may import (besides itself): the core nothing above it, analyses and reports
# the core only, entry points anything but another entry point.
ALLOWED = {"core": {"core"}, "analyses": {"core", "analyses"}, "reports": {"core", "reports"},
           "entry": {"core", "analyses", "reports"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache  # read once per session: every parametrized test asks
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


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, set(modules)) for module, path in modules.items()}


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"probe", "probe.ablate", "analyses.skipping", "analyses.skipping.__main__", "reports.html"} <= set(graph)
    assert "analyses.command" in graph["analyses.skipping.__main__"]  # from-imports are edges
    assert "analyses.registry" in graph["analyses.skipping"]
    assert "probe.instrument.measurement" in graph["probe.job"] and "probe.job" in graph["probe.ablate"]


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_go_down_only(module):
    graph = import_graph()
    mine = layer(module)
    upward = sorted(other for other in graph[module] if layer(other) != mine and layer(other) not in ALLOWED[mine])
    assert not upward, f"{module} ({mine}) imports {upward}: see docs/architecture.md for what each layer may import"
    entries = sorted(other for other in graph[module]
                     if layer(other) == "entry" and other != "analyses.command" and other != JOBS.get(module))
    assert not entries, f"{module} imports the entry point(s) {entries}; nothing may import an entry point"
    if "analyses.command" in graph[module]:
        assert module.endswith(".__main__"), f"{module} imports analyses.command: only the __main__s may"


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
OPTIONAL = {"accelerate", "captum", "torchmetrics", "transformers", "ultralytics", "cv2"}  # cv2: OpenCV, which Ultralytics brings


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
    # Besides, an entry point imports its job inside main: `--help` does not wait for it.
    misplaced = [f"{path.relative_to(ROOT)}:{line} imports {name}" for module, path in project_modules().items()
                 for line, name in function_level_imports(path)
                 if name not in OPTIONAL and not (module in JOBS and name == "probe")]
    assert not misplaced, "move these imports to module level: " + "; ".join(misplaced)


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from sklearn.datasets import load_digits\n    import transformers\n")
    assert function_level_imports(source) == [(4, "sklearn"), (5, "transformers")]


# --- inside the core: its subpackages, each importing only those below it ---------------------------

# The core's parts, bottom to top, and what each may import besides itself (docs/architecture.md).
BASE = {"probe.errors", "probe.files", "probe.imports", "probe.batches", "probe.distributed"}
CORE_ALLOWED = {
    "base": {"base"},
    "discovery": {"base", "instrument"},   # discovery records a forward with the instrumentation's guards,
    "instrument": {"base", "discovery"},   # which attach to the blocks discovery found: one level
    "scoring": {"base"},
    "deletion": {"base", "discovery", "instrument", "scoring"},
    "loading": {"base"},
    "commands": {"base", "discovery", "instrument", "scoring", "deletion", "loading"},
    # The public surface: `import probe`, and modules kept where users import them.
    "surface": {"base", "discovery", "instrument", "scoring", "deletion", "loading"},
}
SUBPACKAGES = ("discovery", "instrument", "scoring", "deletion", "loading", "commands")
MAX_TOP_LEVEL = 12  # modules directly in probe/
MAX_LINES = 700


def core_part(module: str) -> str:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] in SUBPACKAGES or len(parts) == 2 and parts[1] in SUBPACKAGES:
        return parts[1]
    if module.startswith("probe.examples"):
        return "commands"  # example models: loaded by name, like the user's own
    return "surface"


def test_every_core_module_has_a_part():
    graph = import_graph()
    top = sorted(m for m in graph if layer(m) == "core" and core_part(m) == "surface")
    assert top == ["probe", "probe.surgery", "probe.verdict"], top


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if layer(m) == "core"))
def test_the_core_imports_down_its_parts(module):
    mine = core_part(module)
    upward = sorted(other for other in import_graph()[module] if layer(other) == "core"
                    and core_part(other) != mine and core_part(other) not in CORE_ALLOWED[mine])
    assert not upward, f"{module} ({mine}) imports {upward}: see docs/architecture.md for what each part may import"


def test_the_core_is_grouped_and_no_module_is_long():
    top = sorted(path.name for path in (ROOT / "probe").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules directly in probe/ (at most {MAX_TOP_LEVEL}): {top}"
    long = {module: len(path.read_text().splitlines()) for module, path in project_modules().items()}
    long = {module: lines for module, lines in long.items() if lines > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by topic): {long}"


def test_no_two_siblings_are_a_letter_apart():
    import difflib
    for folder in [ROOT / package for package in PACKAGES] + [p for p in (ROOT / "probe").iterdir() if p.is_dir()]:
        names = sorted(p.stem for p in folder.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.stem.startswith("_"))
        close = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                 if difflib.SequenceMatcher(None, a, b).ratio() > 0.9 and abs(len(a) - len(b)) <= 1]
        assert not close, f"{folder.relative_to(ROOT)} has siblings a letter apart: {close}"


# --- one registry of analyses --------------------------------------------------------------------

def analysis_packages() -> list[str]:
    return sorted(p.name for p in (ROOT / "analyses").iterdir() if (p / "__init__.py").exists())


def test_every_analysis_package_is_registered_and_complete():
    from analyses import registry

    assert list(registry.names()) == [a.name for a in sorted(registry.registered(), key=lambda a: a.order)]
    assert sorted(registry.names()) == analysis_packages()
    for name in analysis_packages():
        main = (ROOT / "analyses" / name / "__main__.py").read_text()
        assert f'main_for("{name}", argv)' in main, f"analyses/{name}/__main__.py must call main_for({name!r}, argv)"
        page = ROOT / "reports" / "sections" / f"{name}.py"
        assert page.exists(), f"analyses/{name} has no report page reports/sections/{name}.py"
        source = page.read_text()
        for function in ("section", "figure_files", "terminal"):
            assert f"\ndef {function}(" in source, f"reports/sections/{name}.py must define {function}()"
        assert "\nTITLE = " in source, f"reports/sections/{name}.py must give its heading, TITLE"


def test_no_analysis_is_wired_elsewhere():
    # Only an analysis's own package (and another analysis reusing its parts) names it; the
    # commands, the pipeline, the core and the reports go through the registry.
    graph = import_graph()
    wired = sorted(f"{module} imports {other}" for module, others in graph.items() for other in others
                   if other.split(".")[0] == "analyses" and other.count(".") >= 1
                   and other.split(".")[1] in analysis_packages()
                   and module.split(".")[0] != "analyses")
    wired += sorted(f"{module} imports {other}" for module in ("analyses.pipeline", "analyses.command", "analyses.registry")
                    for other in graph[module] if other.count(".") >= 1 and other.split(".")[1] in analysis_packages())
    assert not wired, "analyses are reached through analyses.registry only: " + "; ".join(wired)


def test_the_registry_checker_sees_an_analysis_wired_elsewhere(tmp_path):
    source = tmp_path / "ablate.py"
    source.write_text("from analyses.skipping import skipping\n")
    found = imports_of("probe.ablate", source, {"analyses.skipping", "probe.ablate"})
    assert found == {"analyses.skipping"} and found.pop().split(".")[1] in analysis_packages()
    assert core_part("probe.deletion.ablated") == "deletion" and "loading" not in CORE_ALLOWED["deletion"]
