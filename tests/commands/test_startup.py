"""A command starts at once: `--help` and a one-line error import torch and probe's option
handling, never the analyses, plotting, data or training stacks (they load when a stage needs
them). Pinned as the modules a fresh interpreter imported, not as a time: the machines are shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What a command that does no work must not import: every analysis, the report, plotting,
# tables, the data sets and the training loop.
HEAVY = ("analyses.attribution", "analyses.degradation", "analyses.lm", "analyses.recalibration",
         "analyses.representation", "analyses.skipping", "analyses.uncertainty", "analyses.pipeline",
         "reports", "matplotlib", "seaborn", "pandas", "scipy", "sklearn", "torchvision", "transformers",
         "ultralytics", "captum", "probe.loading.training", "probe.loading.datasets", "probe.job")

_SCRIPT = """
import json, runpy, sys
before = set(sys.modules)
sys.argv = ["probe.ablate", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("probe.ablate", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted(set(sys.modules) - before)}))
"""


def imported_by(*argv: str) -> tuple[int, list[str]]:
    """(exit code, the modules imported) of `python -m probe.ablate ARGV` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["code"], found["modules"]


def torch_modules() -> set[str]:
    done = subprocess.run([sys.executable, "-c", "import sys, torch, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=300)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("argv", [("--help",), ("--mode", "nonsense"), ("--model", "resnet56", "--batch-size", "0")],
                         ids=["help", "bad-choice", "bad-value"])
def test_a_command_that_does_no_work_imports_no_stack(argv):
    code, modules = imported_by(*argv)
    assert code in (0, 2)
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or any(m == h or m.startswith(h + ".")
                                                                          for h in HEAVY))
    assert not heavy, f"`probe.ablate {' '.join(argv)}` imported {heavy[:12]}"
    # Beyond torch itself, only a handful of modules: probe's option handling and the standard
    # library it uses. Counted, not timed: the import time follows from it.
    beyond = sorted(set(modules) - torch_modules())
    assert len(beyond) < 120, f"{len(beyond)} modules beyond torch's: {beyond}"
