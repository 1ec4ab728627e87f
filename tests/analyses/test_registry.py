"""The one registry of analyses: a new analysis is its package, its report page and its tests.

A package dropped into `analyses/` (here: a temporary folder put on `analyses.__path__`) with an
`ANALYSIS` declaration, and its page in `reports/sections/`, is run by the pipeline, written as
CSV, given a report section by `probe.ablate`, accepted by `--sections`, and runnable as
`python -m analyses.NAME`, without a change anywhere else.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pandas as pd
import pytest
import torch

import analyses
import reports.sections
from analyses import registry
from analyses.command import main_for
from analyses.pipeline import choose_sections, run_analyses
from probe.commands.config import RunConfig
from probe.deletion.evaluation import single_block_sweep
from probe.errors import ProbeError
from reports.sections.common import ReportContext

ANALYSIS = '''
"""Counts the blocks of the table handed in: a demonstration analysis."""
from dataclasses import dataclass
import pandas as pd
from analyses.registry import Analysis

@dataclass(frozen=True)
class CountResult:
    table: pd.DataFrame

    def tables(self):
        return {"block_count": self.table}

def _in_job(job):
    return CountResult(pd.DataFrame({"blocks": [len(job.table)], "mode": [job.config.mode]}))

def _alone(config, out, progress):
    return CountResult(pd.DataFrame({"blocks": [0], "mode": [config.mode]}))

ANALYSIS = Analysis(name="blockcount", summary="count the blocks", options=("ablation",), order=65,
                    in_job=_in_job, alone=_alone)
'''

PAGE = '''
from reports.sections.common import Section

TITLE = "Block count"

def section(result, context):
    return Section(id="blockcount", title="Block count", lead=[f"{int(result.table.blocks[0])} blocks ({context.cost})."])

def figure_files(result, task):
    return []

def terminal(result, task):
    return f"blocks: {int(result.table.blocks[0])}"
'''


@pytest.fixture
def new_analysis(tmp_path, monkeypatch):
    """A package `blockcount` and its page, found where analyses and pages are looked for."""
    package = tmp_path / "analyses_extra" / "blockcount"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(ANALYSIS))
    (package / "__main__.py").write_text("from analyses.command import main_for\n")
    pages = tmp_path / "pages_extra"
    pages.mkdir()
    (pages / "blockcount.py").write_text(textwrap.dedent(PAGE))
    monkeypatch.setattr(analyses, "__path__", [*analyses.__path__, str(package.parent)])
    monkeypatch.setattr(reports.sections, "__path__", [*reports.sections.__path__, str(pages)])
    yield "blockcount"
    for name in ("analyses.blockcount", "reports.sections.blockcount"):
        sys.modules.pop(name, None)


def test_a_new_package_is_registered_in_its_declared_order(new_analysis):
    names = registry.names()
    assert names.index("blockcount") == names.index("recalibration") + 1  # order 65: after 60, before 70
    assert registry.get("blockcount").summary == "count the blocks"
    chosen, _ = choose_sections(RunConfig(sections=("blockcount",)))
    assert chosen == ["blockcount"]


def test_the_pipeline_and_the_report_run_a_new_analysis(new_analysis, tiny_net, tmp_path):
    from probe.ablate import _sections

    data = [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 2.0]]), torch.tensor([0, 1, 1]))]
    sweep, evaluation = single_block_sweep(tiny_net, data, per_class=True, outcomes=True, progress=False)
    outputs = run_analyses(tiny_net, data, sweep, evaluation, config=RunConfig(sections=("blockcount",)),
                           out=tmp_path, device="cpu", calibration=None, sweep_seconds=1.0, progress=False)
    assert list(outputs.results) == ["blockcount"]
    written = pd.read_csv(tmp_path / "block_count.csv")
    assert written.to_dict("list") == {"blocks": [len(sweep)], "mode": ["zero"]}
    built = _sections(outputs, ReportContext(cost="accuracy_drop"))
    mine = [section for section in built if section.id == "blockcount"]
    assert len(mine) == 1 and mine[0].lead == [f"{len(sweep)} blocks (accuracy_drop)."]
    # every other analysis says why it did not run; the language-model and detection ones, silent
    # unless run, do not
    assert {section.id for section in built} == set(registry.names()) - {"lm", "detection"}
    from reports.sections.common import not_run_section
    assert not_run_section("blockcount", "asked not to.").title == "Block count"  # the page's heading


def test_a_new_analysis_has_its_command(new_analysis, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_for("blockcount", ["--out", str(out), "--mode", "mean", "--no-progress"]) == 0
    assert "blocks: 0" in capsys.readouterr().out
    assert pd.read_csv(out / "block_count.csv")["mode"].tolist() == ["mean"]


def test_a_package_without_a_declaration_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "extra" / "undeclared"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""An analysis that forgot to declare itself."""\n')
    monkeypatch.setattr(analyses, "__path__", [*analyses.__path__, str(package.parent)])
    try:
        with pytest.raises(TypeError, match="analyses/undeclared/__init__.py must declare ANALYSIS"):
            registry.registered()
    finally:
        sys.modules.pop("analyses.undeclared", None)


def test_an_unknown_analysis_is_one_probe_error():
    with pytest.raises(ProbeError, match="no analysis 'nope'; the analyses are detection, degradation, skipping"):
        registry.get("nope")
    assert importlib.import_module("analyses.registry") is registry


def test_the_names_a_command_offers_need_no_import(new_analysis):
    # --sections' choices and --help come from the package folders alone
    assert registry.available() == tuple(sorted(registry.names()))
    import subprocess
    code = ("import sys; from analyses import registry; names = registry.available(); "
            "print(','.join(names)); print(sorted(m for m in sys.modules if m.count('.') == 1 "
            "and m.split('.')[0] == 'analyses' and m.split('.')[1] in names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].split(",") == sorted(a for a in registry.names() if a != "blockcount") and out[1] == "[]"


@pytest.mark.slow  # the command in a subprocess
def test_the_command_help_imports_no_analysis():
    import subprocess
    code = ("import sys, runpy, io, contextlib\nsys.argv = ['probe.ablate', '--help']\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        runpy.run_module('probe.ablate', run_name='__main__')\n"
            "    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'analyses' and m.count('.') == 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['analyses.registry']"  # the pipeline too waits until there is work
