"""The command line's promises under bad input and changed configurations (adversarial cases).

Each test names the promise it checks: "one-line error with exit 2" (the bad value named, no
traceback, nothing written or overwritten), or "no stale or mixed numbers" (a rerun into the
same --out never reuses pieces computed under another configuration).
"""

import errno
import json

import pytest
import torch

from probe import ablate
from probe.loading.checkpoints import save_checkpoint
from tiny_models import saved_cifar_resnet
from probe.loading.models import cifar_resnet

SKIP_ANALYSES = ["--skip", "degradation", "skipping", "attribution", "uncertainty", "recalibration"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_cifar_resnet(tmp_path_factory.mktemp("ckpt"))


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
    """Promise: one-line error with exit 2, naming the value; nothing is written."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out, *extra)) == 2
    assert named in one_line_error(capsys)
    assert not out.exists()


def test_an_out_folder_holding_someone_elses_report_is_refused(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2; the user's own report.html is not overwritten."""
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
    """Promise: one-line error with exit 2; no half-written file is left."""
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
    """Promise: one-line error with exit 2, naming the factory and what it raised."""
    assert ablate.main(["--model", model, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert named in one_line_error(capsys)


def test_a_factory_that_passes_keywords_on_is_built_without_in_channels(tmp_path, capsys):
    """Promise: one-line error with exit 2. torchvision's resnet18 takes **kwargs and hands them to
    ResNet, which has no in_channels: it is built without it, and on 1-channel digits the CLI says
    in one line that the channels do not fit, not a traceback."""
    from probe.loading.models import build_model

    model = build_model("torchvision.models:resnet18", num_classes=10, in_channels=1)
    assert model.fc.out_features == 10 and model.conv1.in_channels == 3
    # On 1-channel digits it cannot run: one line that says so, not a traceback.
    assert ablate.main(["--model", "torchvision.models:resnet18", "--out", str(tmp_path / "o"),
                        "--no-progress", "--epochs", "1"]) == 2
    assert "channel" in one_line_error(capsys)


PAUSED_MID_SWEEP = """
import runpy, sys, time
from probe.commands.run_folder import RunDirectory
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


@pytest.mark.slow  # whole runs of the command, one in a subprocess
def test_a_second_run_on_a_busy_folder_is_refused(checkpoint, tmp_path, capsys):
    """Promise: no stale or mixed numbers. Two runs never write into one --out at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
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
    """Promise: one-line error with exit 2, saying what is wrong (the spec), not blaming the data."""
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--blocks-spec", "layer2.0=bn2")) == 2
    error = one_line_error(capsys)
    assert "layer2.0" in error and "projection" in error and "data set" not in error


def test_a_binary_spec_file_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the file."""
    spec = tmp_path / "blocks.spec"
    spec.write_bytes(bytes(range(256)))
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--blocks-spec", str(spec))) == 2
    assert str(spec) in one_line_error(capsys)


def test_recalibration_refuses_one_shot_data():
    """Promise: ProbeError naming the value: BN recalibration reads its data once per set."""
    import probe
    from probe.deletion.batchnorm import evaluate_recalibrated

    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(probe.ProbeError, match="calibration .* one-shot list_iterator"):
        evaluate_recalibrated(model, batches, [["layer1.0"]], iter(batches), progress=False)


def test_the_answer_comes_before_the_analyses(checkpoint, tmp_path):
    """Promise: no stale or mixed numbers. The per-block table is handed out (and printed by the
    CLI) before any analysis runs, and it is the table blocks.csv then holds."""
    from probe.commands.config import RunConfig

    out = tmp_path / "run"
    seen = []
    config = RunConfig(model="resnet8", checkpoint=str(checkpoint), limit=24, batch_size=12, out=str(out),
                       sections=("skipping",))
    tables = []
    ablate.run(config, progress=False,
               on_table=lambda table: seen.append((list(table["block"]), (out / "skipping.csv").exists()))
               or tables.append(table))
    assert seen == [(["layer1.0", "layer2.0", "layer3.0"], False)] and (out / "skipping.csv").exists()
    import pandas as pd

    written = pd.read_csv(out / "blocks.csv")
    assert list(written.columns) == list(tables[0].columns)
    assert written["verdict"].tolist() == tables[0]["verdict"].tolist()
    assert written["accuracy_drop"].tolist() == pytest.approx(tables[0]["accuracy_drop"].tolist())


# -- more bad input: files, numbers, devices --------------------------------------------------


def test_a_blocks_spec_file_that_does_not_exist_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the missing file; nothing is written."""
    missing = tmp_path / "nope.spec"
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--blocks-spec", str(missing))) == 2
    assert f"block spec {str(missing)!r} is neither a spec" in one_line_error(capsys)
    assert not (tmp_path / "o" / "run.json").exists()


def test_an_out_that_is_a_file_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the file; the file is left as it was."""
    out = tmp_path / "afile"
    out.write_text("mine")
    assert ablate.main(argv(checkpoint, out)) == 2
    assert f"--out {str(out)!r} is a file" in one_line_error(capsys)
    assert out.read_text() == "mine"


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the checkpoint and the keys that do not fit."""
    other = tmp_path / "resnet20.pt"
    save_checkpoint(cifar_resnet(20, num_classes=10, in_channels=1), other)
    assert ablate.main(argv(other, tmp_path / "o")) == 2
    error = one_line_error(capsys)
    assert str(other) in error and "does not fit CifarResNet" in error and "unexpected keys: layer1.1" in error


@pytest.mark.parametrize("kind", ["directory", "empty", "random bytes"])
def test_a_checkpoint_that_is_no_checkpoint_is_one_line(kind, tmp_path, capsys):
    """Promise: one-line error with exit 2, saying what the file is instead (no colour codes,
    no advice to unpickle it)."""
    path = tmp_path / "ckpt"
    if kind == "directory":
        path.mkdir()
        (path / "inside.pt").write_bytes(b"")
    else:
        path.write_bytes(b"" if kind == "empty" else bytes(range(256)) * 4)
    assert ablate.main(argv(path, tmp_path / "o")) == 2
    error = one_line_error(capsys)
    assert str(path) in error and "\x1b" not in error and "weights_only=False" not in error
    assert {"directory": "is a directory", "empty": "empty file (0 bytes)", "random bytes": "checkpoint"}[kind] in error


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_a_limit_below_one_is_one_line(limit, checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the value; nothing is written."""
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--limit", limit)) == 2
    assert f"--limit must be a positive integer, got {limit}" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_batch_size_of_zero_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the value; nothing is written."""
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--batch-size", "0")) == 2
    assert "--batch-size must be a positive integer, got 0" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the device and what would work."""
    assert ablate.main(argv(checkpoint, tmp_path / "o", "--device", "cuda")) == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu or auto" in one_line_error(capsys)


# -- run folders: changed configurations, damaged or unwritable pieces, Ctrl-C ----------------


def test_a_rerun_with_another_mode_is_refused(checkpoint, tmp_path, capsys):
    """Promise: no stale or mixed numbers. --mode zero's pieces are never served to --mode mean."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 0
    before = (out / "blocks.csv").read_text()
    capsys.readouterr()
    assert ablate.main(argv(checkpoint, out, "--mode", "mean")) == 2
    assert "another configuration (mode: 'zero' there, 'mean' now)" in one_line_error(capsys)
    assert (out / "blocks.csv").read_text() == before


def test_a_changed_image_in_the_folder_is_never_reused(tmp_path, capsys):
    """Promise: no stale or mixed numbers. Changing one image of the evaluated folder (one the
    old 16-sample fingerprint skipped) makes the rerun another configuration, not a resume."""
    from PIL import Image

    folder = tmp_path / "images"
    for klass in range(2):
        (folder / f"c{klass}").mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), (10 * i, 100 * klass, 0)).save(folder / f"c{klass}" / f"{i:02d}.png")
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet8.pt"
    save_checkpoint(cifar_resnet(8, num_classes=2, in_channels=3), checkpoint)
    out = tmp_path / "run"
    args = ["--model", "resnet8", "--checkpoint", str(checkpoint), "--dataset", "imagefolder", "--data-root",
            str(folder), "--batch-size", "20", "--out", str(out), "--no-progress", *SKIP_ANALYSES,
            "representation"]
    assert ablate.main(args) == 0
    before = (out / "blocks.csv").read_text()
    capsys.readouterr()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(folder / "c0" / "01.png")
    assert ablate.main(args) == 2
    assert "another configuration (data_sha256:" in one_line_error(capsys)
    assert (out / "blocks.csv").read_text() == before


def test_a_read_only_partial_folder_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """Promise: one-line error with exit 2, naming the folder; nothing half-written is left, and
    the run record written before is kept. (Tests run as root, whom chmod does not stop: the
    system's refusal is simulated where probe creates its temporary files.)"""
    import os
    import tempfile

    from probe import files

    mkstemp = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if os.path.basename(str(dir)) == "partial":
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 2
    error = one_line_error(capsys)
    assert f"Permission denied ({out / 'partial'}); nothing half-written was left behind" in error
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp")) and not list((out / "partial").iterdir())
    assert not (out / "blocks.csv").exists() and json.loads((out / "run.json").read_text())["mode"] == "zero"


def test_a_partial_that_is_a_file_says_what_to_do(checkpoint, tmp_path, capsys):
    """Promise: one-line error with exit 2, naming the file and what to do about it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "partial").write_text("mine")
    assert ablate.main(argv(checkpoint, out)) == 2
    error = one_line_error(capsys)
    assert str(out / "partial") in error and "remove or rename that file, or choose another --out" in error
    assert (out / "partial").read_text() == "mine"


@pytest.mark.slow  # whole runs of the command
def test_a_damaged_piece_found_by_the_cli_is_recomputed_with_one_warning_line(checkpoint, tmp_path, capsys):
    """Promise: no stale or mixed numbers. A cut-short piece is recomputed (the same table),
    and the CLI says so in one line "probe.ablate: warning: ...", not Python's two-line warning."""
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 0
    before = (out / "blocks.csv").read_text()
    piece = out / "partial" / "measure.pt"
    piece.write_bytes(piece.read_bytes()[:100])
    capsys.readouterr()
    assert ablate.main(argv(checkpoint, out)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("probe.ablate: warning: ") for line in err), err
    assert [line for line in err if "measure.pt" in line] == [
        next(line for line in err if line.startswith(f"probe.ablate: warning: {piece} cannot be read back"))]
    assert (out / "blocks.csv").read_text() == before


@pytest.mark.slow  # whole runs of the command
def test_ctrl_c_mid_run_then_rerun_gives_the_uninterrupted_table(checkpoint, tmp_path, capsys, monkeypatch):
    """Promise: no stale or mixed numbers. A run interrupted after its first piece exits 130 with
    one line and no blocks.csv; the rerun resumes and writes the table of an uninterrupted run."""
    from probe.commands.run_folder import RunDirectory

    clean = tmp_path / "clean"
    assert ablate.main(argv(checkpoint, clean, "--save-every", "1")) == 0
    save = RunDirectory.save

    def save_then_interrupt(self, name, value):
        save(self, name, value)
        if name == "sweep-0":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDirectory, "save", save_then_interrupt)
    out = tmp_path / "run"
    capsys.readouterr()
    assert ablate.main(argv(checkpoint, out, "--save-every", "1")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["probe.ablate: interrupted. Finished pieces are kept in the out folder: rerun the same command "
                   "to resume."]
    assert not (out / "blocks.csv").exists() and sorted(p.name for p in (out / "partial").iterdir()) == [
        "measure.pt", "seconds-measure.pt", "seconds-sweep-0.pt", "sweep-0.pt"]  # each piece, and what it cost
    monkeypatch.setattr(RunDirectory, "save", save)
    assert ablate.main(argv(checkpoint, out, "--save-every", "1")) == 0
    assert (out / "blocks.csv").read_text() == (clean / "blocks.csv").read_text()
