"""notebooks/quickstart.ipynb runs top to bottom (quick config) and shows what it says it shows."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # trains small models end to end

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # The kernel inherits this environment: a fresh model cache, the quick config, probe importable.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PROBE_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not any(o.get("output_type") == "error" for o in c.outputs) for c in code)
    outputs = "\n".join(text_of(cell) for cell in code)
    assert "resnet20 from resnet20-digits-" in outputs
    assert "9 residual blocks" in outputs  # resnet20: 3 stages of 3 blocks
    assert "Block(name='layer1.0'" in outputs
    assert "baseline accuracy" in outputs and "on 120 samples" in outputs
    assert "deleting layer1.0 changes" in outputs
    assert "skipped blocks removed" in outputs
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 1
    assert (tmp_path / "cache" / "probe" / "models").is_dir()  # trained into the test's cache only
