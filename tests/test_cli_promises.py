"""The command line's promises under bad input and changed configurations (adversarial cases).

Each test names the promise it checks: "one-line error, exit 2" (the bad value named, no
traceback, nothing written or overwritten), or "no stale or mixed numbers" (a rerun into the
same --out never reuses pieces computed under another configuration).
"""

import errno
import json

import pytest
import torch

from probe import ablate
from probe.models import cifar_resnet, save_checkpoint

SKIP_ANALYSES = ["--skip", "degradation", "skipping", "attribution", "uncertainty", "recalibration"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet8.pt"
    save_checkpoint(cifar_resnet(8, num_classes=10, in_channels=1), path)
    return path


def argv(checkpoint, out, *extra):
    return ["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "24", "--batch-size", "12",
            "--out", str(out), "--no-progress", *SKIP_ANALYSES, *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("probe.ablate: error:"), err
    return err[0]


@pytest.mark.parametrize("extra,named", [
    (["--seed", "-1"], "-1"),
    (["--degradation-depths", "7"], "[7]"),
    (["--bootstrap", "0"], "--bootstrap"),
    (["--curve-points", "1"], "--curve-points"),
    (["--level", "1.5"], "--level"),
])
def test_bad_settings_are_refused_before_any_work(extra, named, checkpoint, tmp_path, capsys):
    """Promise: one-line error, exit 2, naming the value; nothing is written."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out, *extra)) == 2
    assert named in one_line_error(capsys)
    assert not out.exists()


def test_an_out_folder_holding_someone_elses_report_is_refused(checkpoint, tmp_path, capsys):
    """Promise: one-line error, exit 2; the user's own report.html is not overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    assert ablate.main(argv(checkpoint, out)) == 2
    assert "report.html" in one_line_error(capsys)
    assert (out / "report.html").read_text() == "my own report"


@pytest.mark.parametrize("first,second,differs", [
    (["--blocks-spec", "layer1.0=bn2"], ["--blocks-spec", "layer1.0=conv2"], "blocks"),
    (["--bn-recalibrate", "--calibration-samples", "12"], ["--bn-recalibrate", "--calibration-samples", "24"],
     "calibration_samples"),
    (["--data-root", "one"], ["--data-root", "two"], "data_root"),
])
def test_a_rerun_with_another_setting_never_reuses_pieces(first, second, differs, checkpoint, tmp_path, capsys):
    """Promise: no stale or mixed numbers. A change that alters a number is in the run record."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out, *first)) == 0
    capsys.readouterr()
    before = (out / "blocks.csv").read_text()
    assert ablate.main(argv(checkpoint, out, *second)) == 2
    error = one_line_error(capsys)
    assert "another configuration" in error and differs in error
    assert (out / "blocks.csv").read_text() == before


def test_the_record_holds_the_blocks_and_the_data(checkpoint, tmp_path):
    """Promise: no stale or mixed numbers. Block definitions and the data's identity are recorded."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out, "--blocks-spec", "layer1.0=bn2")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["blocks"] == [{"name": "layer1.0", "module": "layer1.0", "branch": "layer1.0.bn2",
                                 "shortcut": None, "position": 0, "strategy": "hooks", "add_index": None,
                                 "branch_operand": None}]
    assert len(record["data_sha256"]) == 16
    other = tmp_path / "other"
    assert ablate.main(argv(checkpoint, other, "--blocks-spec", "layer1.0=bn2", "--split", "train")) == 0
    assert json.loads((other / "run.json").read_text())["data_sha256"] != record["data_sha256"]


def test_a_full_disk_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """Promise: one-line error, exit 2; no half-written file is left."""
    def full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert not list(out.rglob("*.tmp")) and not (out / "blocks.csv").exists()


@pytest.mark.parametrize("model,named", [
    ("torch.nn:Linear", "in_features"),
    ("math:sqrt", "math:sqrt"),
    ("probe.nowhere:build", "probe.nowhere"),
])
def test_a_factory_that_cannot_build_a_model_is_one_line(model, named, tmp_path, capsys):
    """Promise: one-line error, exit 2, naming the factory and what it raised."""
    assert ablate.main(["--model", model, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert named in one_line_error(capsys)


def test_a_factory_that_passes_keywords_on_is_built_without_in_channels(tmp_path, capsys):
    """torchvision's resnet18 takes **kwargs and hands them to ResNet, which has no in_channels."""
    from probe.models import build_model

    model = build_model("torchvision.models:resnet18", num_classes=10, in_channels=1)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 3
    # On 1-channel digits it cannot run: one line that says so, not a traceback.
    assert ablate.main(["--model", "torchvision.models:resnet18", "--out", str(tmp_path / "o"),
                        "--no-progress", "--epochs", "1"]) == 2
    assert "channel" in one_line_error(capsys)


PAUSED_MID_SWEEP = """
import runpy, sys, time
from probe.rundir import RunDirectory
save = RunDirectory.save
def save_then_pause(self, name, value):
    save(self, name, value)
    if name == "measure":
        print("paused", flush=True)
        time.sleep(60)
RunDirectory.save = save_then_pause
sys.argv = ["probe.ablate", *sys.argv[1:]]
runpy.run_module("probe.ablate", run_name="__main__", alter_sys=True)
"""


def test_a_second_run_on_a_busy_folder_is_refused(checkpoint, tmp_path, capsys):
    """Promise: no stale or mixed numbers. Two runs never write into one --out at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen([sys.executable, "-c", PAUSED_MID_SWEEP, *argv(checkpoint, out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "paused"  # it holds the folder, mid-run
        assert ablate.main(argv(checkpoint, out, "--mode", "mean")) == 2
        assert "another probe run is using" in one_line_error(capsys)
        assert ablate.main(argv(checkpoint, out)) == 2  # the same configuration waits its turn too
        one_line_error(capsys)
    finally:
        first.kill()
        first.communicate()
    assert ablate.main(argv(checkpoint, out)) == 0  # the lock went with the killed process


def test_a_spec_that_forgets_a_projection_blames_the_spec(checkpoint, tmp_path, capsys):
    """Promise: one-line error, exit 2, saying what is wrong (the spec), not blaming the data."""
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--blocks-spec", "layer2.0=bn2")) == 2
    error = one_line_error(capsys)
    assert "layer2.0" in error and "projection" in error and "data set" not in error


def test_a_binary_spec_file_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error, exit 2, naming the file."""
    spec = tmp_path / "blocks.spec"
    spec.write_bytes(bytes(range(256)))
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--blocks-spec", str(spec))) == 2
    assert str(spec) in one_line_error(capsys)


def test_recalibration_refuses_one_shot_data():
    """Promise: ProbeError naming the value: BN recalibration reads its data once per set."""
    import probe
    from probe.recalibrate import evaluate_recalibrated

    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(probe.ProbeError, match="calibration .* one-shot list_iterator"):
        evaluate_recalibrated(model, batches, [["layer1.0"]], iter(batches), progress=False)


def test_the_answer_comes_before_the_analyses(checkpoint, tmp_path):
    """The per-block table is handed out (and printed by the CLI) before any analysis runs."""
    from probe.config import RunConfig

    out = tmp_path / "run"
    seen = []
    config = RunConfig(model="resnet8", checkpoint=str(checkpoint), limit=24, batch_size=12, out=str(out),
                       sections=("skipping",))
    ablate.run(config, progress=False,
               on_table=lambda table: seen.append((list(table["block"]), (out / "skipping.csv").exists())))
    assert seen == [(["layer1.0", "layer2.0", "layer3.0"], False)] and (out / "skipping.csv").exists()
