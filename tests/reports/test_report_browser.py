"""The report of a whole `probe.ablate` run, with every analysis section, opened in headless Chromium.

Chromium must be there (Debian package `chromium`): the test is skipped without it only outside
CI; with CI set, a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from analyses.pipeline import SECTIONS
from probe.ablate import run
from probe.commands.config import RunConfig

pytestmark = pytest.mark.slow  # trains small models end to end

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PNG = b"\x89PNG\r\n\x1a\n"
# Figures per section: 4 per-block figures, then degradation 1, skipping 1, attribution 1,
# uncertainty 2 (intervals and per-class heatmap), representation 4 (probes, refinement, CKA, classes),
# recalibration 1.
FIGURES = 4 + 1 + 1 + 1 + 2 + 4 + 1
CSVS = ["blocks", "degradation", "skipping", "deletion_curves", "pruned_export", "attribution", "proxies",
        "drop_intervals", "class_drops", "linear_probes", "logit_lens", "refinement", "cka", "block_classes",
        "representation", "recalibration"]
# Tables of the intact model alone (nothing deleted): no BatchNorm statistics to recalibrate.
INTACT = ("linear_probes", "logit_lens", "refinement", "cka")

# Injected into a *copy* of the report (the report itself has no script): records every error
# event (a script error, or an image that fails to decode), and once the page has loaded writes
# how many images decoded into attributes that --dump-dom shows.
PROBE_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.tagName))), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
  document.body.setAttribute("data-errors", String(window.__errors.length) + ":" + window.__errors.join("|"));
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A real run: resnet8 trained 1 epoch, every section, degradation at depth 8 only."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("run")
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "OMP_NUM_THREADS")}
    os.environ["XDG_CACHE_HOME"], os.environ["OMP_NUM_THREADS"] = str(cache), "1"
    try:
        config = RunConfig(model="resnet8", epochs=1, limit=60, batch_size=30, out=str(out), sections=SECTIONS,
                           degradation_depths=(8,), random_draws=1, bootstrap=100, calibration_samples=60)
        run(config, progress=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out / "report.html"


def test_run_writes_every_section_and_table(report):
    text = report.read_text(encoding="utf-8")
    for name in SECTIONS:
        if name in ("lm", "detection"):  # a classifier's report mentions neither the language-model
            # nor the detection section
            assert f'<section id="{name}"' not in text and f'href="#{name}"' not in text
            continue
        assert f'<section id="{name}" class="analysis">' in text, name
        assert f'href="#{name}"' in text  # listed in the contents
    assert "Not run" not in text
    assert text.count('<img src="data:image/png;base64,') == FIGURES == text.count("<img ")
    assert "BN recalibration</dt><dd>off (trained BatchNorm statistics)" in text
    assert "BatchNorm statistics: as trained" in text  # each analysis says which statistics it used
    skipped = pd.read_csv(report.parent / "skipping.csv").set_index("state").loc["skipped blocks removed",
                                                                                  "blocks_removed"]
    for name in CSVS:
        table = pd.read_csv(report.parent / f"{name}.csv")
        assert len(table) or name == "pruned_export" and skipped == 0, name  # a pruned copy of skipped blocks
        if name not in ("blocks", *INTACT):
            assert "bn_recalibrated" in table.columns, name
    curves = pd.read_csv(report.parent / "deletion_curves.csv")
    assert set(curves["order"]) == {"ratio", "drop", "random"}
    assert (report.parent / "pruned_model.pt").is_file() == (skipped > 0)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text)  # nothing external


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"chromium is not installed ({CHROMIUM}); CI must install Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install -y chromium); not in CI, so skipped")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def console_messages(stderr: str, page: Path) -> list[str]:
    """Console output that the page itself caused (Chromium logs it as INFO:CONSOLE lines)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line and page.name in line]


def test_report_opens_in_chromium_with_every_image_loaded(report, tmp_path):
    check = tmp_path / "check.html"
    check.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>\n" + PROBE_SCRIPT, 1),
                     encoding="utf-8")
    result = chromium(tmp_path / "profile1", "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body[^>]*>", result.stdout)
    assert body, result.stdout[:500]
    assert f'data-images="{FIGURES}/{FIGURES}"' in body.group(0), body.group(0)
    assert 'data-errors="0:"' in body.group(0), body.group(0)
    assert console_messages(result.stderr, check) == []


def test_report_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    result = chromium(tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr, report) == []
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 50_000
    # IHDR: width and height are the big-endian integers at bytes 16..24.
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 3000)
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 100  # text and figures, not a blank page
