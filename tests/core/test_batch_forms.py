"""Batches and outputs as they come: every form runs through measure, sweep and the CLI, and
gives the numbers of the plain (inputs, targets) pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import probe
from probe.errors import ProbeError
from tiny_models import SHIFT, Classifier, Forms, TwoInputs, labelled_images

HERE = Path(__file__).resolve().parents[1]  # tests/: the shared helpers
ANALYSES = ["degradation", "skipping", "attribution", "uncertainty", "representation", "recalibration"]


def pairs() -> list:
    images, labels = labelled_images().tensors
    return [(images[i:i + 10], labels[i:i + 10]) for i in range(0, 24, 10)]


BATCH_FORMS = {
    "pair": lambda: pairs(),
    "tuple with extras": lambda: [(x, y, torch.arange(len(y)), "note") for x, y in pairs()],
    "list": lambda: [[x, y] for x, y in pairs()],
    "dict image/label": lambda: [{"image": x, "label": y} for x, y in pairs()],
    "named dict": lambda: probe.Data([{"pix": x, "lab": y} for x, y in pairs()], inputs="pix", targets="lab"),
    "function": lambda: probe.Data([{"pix": x, "lab": y} for x, y in pairs()], inputs=lambda b: b["pix"],
                                   targets=lambda b: b["lab"]),
}


@pytest.mark.parametrize("form", list(BATCH_FORMS))
def test_batch_forms_give_the_pairs_numbers(form):
    model = Classifier().eval()
    expected_stats = probe.measure(model, pairs(), per_class=True, progress=False)
    expected = probe.sweep(model, pairs(), progress=False)
    data = BATCH_FORMS[form]()
    pd.testing.assert_frame_equal(probe.measure(model, data, per_class=True, progress=False), expected_stats)
    pd.testing.assert_frame_equal(probe.sweep(model, data, progress=False), expected)


def test_several_input_tensors():
    """((a, b), labels): the model takes two tensors; numbers equal a hand evaluation."""

    model = TwoInputs().eval()
    images, labels = labelled_images().tensors
    shift = SHIFT
    data = [((images, shift.expand_as(images)), labels)]
    table = probe.sweep(model, data, progress=False)
    with torch.no_grad():
        intact = model(images, shift.expand_as(images)).argmax(dim=1)
        with probe.ablated(model, ["inner.block0"]):
            deleted = model(images, shift.expand_as(images)).argmax(dim=1)
    assert table.attrs["baseline"]["accuracy"] == pytest.approx(float((intact == labels).double().mean()))
    row = table.set_index("block").loc["inner.block0"]
    assert row["accuracy"] == pytest.approx(float((deleted == labels).double().mean()))
    assert row["flip_rate"] == pytest.approx(float((deleted != intact).double().mean()))
    stats = probe.measure(model, data, progress=False)
    assert list(stats["samples"]) == [24, 24]


def test_a_dict_probe_cannot_read_names_its_keys():
    model = Classifier().eval()
    with pytest.raises(ProbeError, match=r"keys \['pix', 'lab'\].*probe\.Data\(data, inputs="):
        probe.sweep(model, [{"pix": x, "lab": y} for x, y in pairs()], progress=False)
    with pytest.raises(ProbeError, match=r"inputs='picture' is not in the batch, which has keys \['pix', 'lab'\]"):
        probe.measure(model, probe.Data([{"pix": x, "lab": y} for x, y in pairs()], inputs="picture"),
                      progress=False)
    with pytest.raises(ProbeError, match="no targets.*task='drift'"):
        probe.sweep(model, [x for x, _ in pairs()], progress=False)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "object"])
def test_output_forms_give_the_tensors_numbers(kind):
    reference = Forms("tensor").eval()
    model = Forms(kind).eval()
    blocks = probe.find_blocks(model, example_input=pairs()[0][0][:1])  # a traced or recorded forward
    assert [b.name for b in blocks] == ["inner.block0", "inner.block1"]
    expected = probe.sweep(reference, pairs(), progress=False)
    pd.testing.assert_frame_equal(probe.sweep(model, pairs(), blocks=blocks, progress=False), expected)
    pd.testing.assert_frame_equal(probe.measure(model, pairs(), blocks=blocks, progress=False),
                                  probe.measure(reference, pairs(), progress=False))


def test_a_list_of_outputs_is_compared_whole_by_drift():
    """Detection-style heads: drift joins every output tensor of a sample."""
    model = Forms("list").eval()
    images = torch.cat([x for x, _ in pairs()])
    table = probe.sweep(model, pairs(), task="drift", progress=False)
    with torch.no_grad():
        intact = model(images)
        with probe.ablated(model, ["inner.block1"]):
            deleted = model(images)
    difference = sum((d - i).double().flatten(1).square().sum(dim=1) for d, i in zip(deleted, intact))
    size = sum(i.double().flatten(1).square().sum(dim=1) for i in intact)
    assert table.set_index("block").loc["inner.block1", "drift"] == pytest.approx(
        float((difference.sqrt() / size.sqrt()).mean()), rel=1e-5)
    with pytest.raises(ProbeError, match="list of 2 items: probe cannot find class logits"):
        probe.sweep(Forms("list").eval(), [(x, y) for x, y in pairs()], task="classification", progress=False)


def run_cli(arguments: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": f"{HERE.parent}:{HERE}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "probe.ablate", *arguments, "--out", str(out), "--no-progress",
                           "--skip", *ANALYSES], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # the CLI end to end in a subprocess
def test_cli_names_the_parts_of_dict_batches(tmp_path):
    """--inputs/--targets for a data set of dicts; numbers equal the pairs' in a notebook."""
    missing = run_cli(["--model", "tiny_models:classifier", "--dataset", "tiny_models:named_items"], tmp_path / "a")
    assert missing.returncode == 2 and "keys ['pix', 'lab']" in missing.stderr and "Traceback" not in missing.stderr
    result = run_cli(["--model", "tiny_models:classifier", "--dataset", "tiny_models:named_items",
                      "--inputs", "pix", "--targets", "lab"], tmp_path / "b")
    assert result.returncode == 0, result.stderr[-2000:]
    written = pd.read_csv(tmp_path / "b" / "blocks.csv")
    expected = probe.sweep(Classifier().eval(), DataLoader(labelled_images(), batch_size=256), progress=False)
    pd.testing.assert_series_equal(written["accuracy_drop"], expected["accuracy_drop"], check_exact=False)
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["inputs"] == "pix" and record["targets"] == "lab" and record["task"] == "classification"


@pytest.mark.slow  # the CLI end to end in a subprocess
def test_cli_lm_on_your_own_model_and_text(tmp_path):
    from tiny_models import SEQUENCES, StackedLM, TokenWindows

    result = run_cli(["--model", "tiny_models:stacked_lm", "--dataset", "tiny_models:token_windows", "--task", "lm"],
                     tmp_path / "lm")
    assert result.returncode == 0, result.stderr[-2000:]
    written = pd.read_csv(tmp_path / "lm" / "blocks.csv")
    assert {"loss", "perplexity", "token_accuracy", "loss_increase", "loss_increase_se", "tokens"} <= set(written)
    assert "accuracy" not in written.columns
    expected = probe.sweep(StackedLM().eval(), DataLoader(TokenWindows(SEQUENCES), batch_size=256), task="lm",
                           progress=False)
    pd.testing.assert_series_equal(written["loss"], expected["loss"], check_exact=False, rtol=1e-6)


@pytest.mark.parametrize("model,dataset", [
    ("forms_tuple", "labelled_images"), ("forms_dict", "labelled_images"), ("forms_object", "labelled_images"),
    ("classifier", "images_with_extras"), ("two_inputs", "two_input_images"),
])
def test_cli_takes_every_output_and_batch_form(model, dataset, tmp_path):
    """Through `python -m probe.ablate`: the numbers of the plain classifier on plain pairs."""
    from probe import ablate

    code = ablate.main(["--model", f"tiny_models:{model}", "--dataset", f"tiny_models:{dataset}", "--out",
                        str(tmp_path / "out"), "--no-progress", "--skip", *ANALYSES])
    assert code == 0
    written = pd.read_csv(tmp_path / "out" / "blocks.csv")
    net = {"classifier": Classifier, "two_inputs": TwoInputs}.get(model, lambda: Forms("tensor"))().eval()
    data = [(x, y) for x, y in pairs()] if model != "two_inputs" else \
        [((x, SHIFT.expand_as(x)), y) for x, y in pairs()]
    expected = probe.sweep(net, data, progress=False)
    assert list(written["block"]) == list(expected["block"])
    for column in ("accuracy", "loss", "flip_rate"):
        assert written[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-6)
