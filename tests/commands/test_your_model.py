"""A user's own model and data through the documented CLI, with no glue code.

The model is the widely copied CIFAR ResNet with option-A shortcuts written as a lambda
(`LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], ...))`), its checkpoint saved the way old
training scripts did (from `nn.DataParallel`, under "state_dict", without the
`num_batches_tracked` buffers older torch did not have); the data a folder of 32x32 PNG images
in class sub-folders. blocks.csv must equal a hand-written forward of the same model.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import probe
from probe import ablate
from probe.commands.config import RunConfig
from probe.loading.datasets import dataset_targets, load_dataset
from probe.errors import ProbeError
from probe.commands.inputs import load_datasets, train_loader
from probe.deletion.surgery import export_pruned, load_pruned

USER_MODEL = textwrap.dedent('''
    import torch.nn as nn
    import torch.nn.functional as F


    class LambdaLayer(nn.Module):
        def __init__(self, lambd):
            super().__init__()
            self.lambd = lambd

        def forward(self, x):
            return self.lambd(x)


    class BasicBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2],
                                                            (0, 0, 0, 0, planes // 4, planes // 4)))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return F.relu(out)


    class ResNet(nn.Module):
        def __init__(self, num_blocks=(1, 1, 1), num_classes=4):
            super().__init__()
            self.in_planes = 8
            self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.layer1 = self._stage(8, num_blocks[0], 1)
            self.layer2 = self._stage(16, num_blocks[1], 2)
            self.layer3 = self._stage(32, num_blocks[2], 2)
            self.linear = nn.Linear(32, num_classes)

        def _stage(self, planes, blocks, stride):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*layers)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            out = F.avg_pool2d(out, out.size()[3])
            return self.linear(out.view(out.size(0), -1))


    def resnet_option_a():
        return ResNet((2, 1, 1))
''')

CLASSES = ["cat", "dog", "frog", "ship"]
PER_CLASS = 6
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's module on the path, a legacy DataParallel checkpoint, and a PNG folder."""
    (tmp_path / "user_models.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    import user_models

    torch.manual_seed(0)
    model = user_models.resnet_option_a()
    with torch.no_grad():  # trained-looking statistics, so BatchNorm is not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    legacy = {k: v for k, v in nn.DataParallel(model).state_dict().items() if not k.endswith("num_batches_tracked")}
    checkpoint = tmp_path / "resnet-option-a.th"
    torch.save({"epoch": 200, "best_prec1": 91.3, "state_dict": legacy}, checkpoint)
    folder = tmp_path / "test"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return model.eval(), checkpoint, folder


def hand_forward(model, x, deleted=()):
    """The model's forward written out: logits, and per block (F(x), s(x)) before the addition."""
    pairs = {}

    def block(b, name, h):
        f = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h)))))
        if b.conv1.stride[0] == 1 and h.shape[1] == f.shape[1]:
            s = h
        else:
            pad = (f.shape[1] - h.shape[1]) // 2
            s = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))
        pairs[name] = (f, s)
        return F.relu((torch.zeros_like(f) if name in deleted else f) + s)

    h = F.relu(model.bn1(model.conv1(x)))
    for stage in ("layer1", "layer2", "layer3"):
        for i, b in enumerate(getattr(model, stage)):
            h = block(b, f"{stage}.{i}", h)
    logits = model.linear(h.mean(dim=(2, 3)))
    return logits, pairs


def test_option_a_model_on_a_png_folder_equals_a_hand_written_forward(user, tmp_path, capsys):
    model, checkpoint, folder = user
    out = tmp_path / "run"
    normalize = ",".join(map(str, (*MEAN, *STD)))
    code = ablate.main(["--model", "user_models:resnet_option_a", "--checkpoint", str(checkpoint),
                        "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "32",
                        "--normalize", normalize, "--batch-size", "10", "--out", str(out), "--no-progress",
                        "--skip", "attribution", "uncertainty", "recalibration"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    table = pd.read_csv(out / "blocks.csv")

    # The images as the hand forward reads them: PNG bytes / 255, normalized per channel.
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            pixels = np.asarray(Image.open(folder / name / f"{i}.png"), dtype=np.float32) / 255.0
            images.append((torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None])
                          / torch.tensor(STD)[:, None, None])
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    loaded = load_dataset("imagefolder", root=folder, image_size=32, normalize=normalize)
    assert torch.allclose(torch.stack([loaded[i][0] for i in range(len(loaded))]), x, atol=1e-6)

    with torch.no_grad():
        logits, pairs = hand_forward(model, x)
        assert list(table["block"]) == list(pairs)
        for _, row in table.iterrows():
            f, s = pairs[row["block"]]
            ratio = (f.flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1)).mean().item()
            cosine = F.cosine_similarity(f.flatten(1), s.flatten(1), dim=1).mean().item()
            assert row["ratio"] == pytest.approx(ratio, rel=1e-5), row["block"]
            assert row["cosine"] == pytest.approx(cosine, abs=1e-5), row["block"]
            deleted, _ = hand_forward(model, x, deleted={row["block"]})
            accuracy = (deleted.argmax(1) == y).double().mean().item()
            assert row["accuracy"] == pytest.approx(accuracy, abs=1e-12), row["block"]
            assert row["flip_rate"] == pytest.approx((deleted.argmax(1) != logits.argmax(1)).double().mean().item())
            assert row["loss"] == pytest.approx(F.cross_entropy(deleted, y).item(), rel=1e-5)

    # Random weights on random images: the intact model is at chance (25% for 4 balanced
    # classes, within two binomial standard errors on 24 samples), so no verdict is drawn.
    accuracy = (logits.argmax(1) == y).double().mean().item()
    assert accuracy <= 0.25 + 2 * (0.25 * 0.75 / 24) ** 0.5
    assert "chance" in printed.err and "no verdicts" in printed.out
    assert set(table["verdict"]) == {"unsupported"}
    assert "No verdicts:" in (out / "report.html").read_text()

    record = json.loads((out / "run.json").read_text())
    assert record["data"]["image_size"] == 32 and record["data"]["normalize"] == normalize
    assert record["shortcuts"] == {"layer1.0": "identity", "layer1.1": "identity", "layer2.0": "zero-padding",
                                   "layer3.0": "zero-padding"}
    html = (out / "report.html").read_text()
    assert "zero-padding" in html and "32x32" in html

    # At chance no block is skipped: no pruned copy is saved or timed (it would be the model
    # itself). The export of this lambda-shortcut model: the next tests.
    export = pd.read_csv(out / "pruned_export.csv")
    assert export.empty and not (out / "pruned_model.pt").exists()


def test_a_lambda_shortcut_model_exports_as_weights_and_blocks(user, tmp_path):
    model, _, _ = user
    import user_models

    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    data = [(x, torch.tensor([0, 1, 2, 3, 0, 1]))]
    with pytest.raises(Exception, match="pickle|lambda"):
        torch.save(model, tmp_path / "whole.pt")  # why the whole module cannot be saved
    _, table = export_pruned(model, data, ["layer1.1", "layer3.0"], path=tmp_path / "pruned.pt", repeats=1)
    assert table.set_index("model").loc["pruned", "path"] == str(tmp_path / "pruned.pt")
    pruned = load_pruned(tmp_path / "pruned.pt", user_models.resnet_option_a())
    with torch.no_grad():
        expected, _ = hand_forward(model, x, deleted={"layer1.1", "layer3.0"})
        assert torch.allclose(pruned(x), expected, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_model_that_fits_its_data_exports_without_its_skipped_block_through_the_cli(user, tmp_path, capsys):
    """Past chance, through the documented CLI: the near-zero block is skipped, the pruned export
    (weights + blocks: the shortcut is a lambda) leaves it out, loads back into the user's class
    and computes the hand-written forward without it."""
    model, _, _ = user
    with torch.no_grad():  # layer1.1's branch a thousandth of its size: a block the network skips
        model.layer1[1].bn2.weight.mul_(1e-3)
        model.layer1[1].bn2.bias.mul_(1e-3)
    legacy = {k: v for k, v in nn.DataParallel(model).state_dict().items() if not k.endswith("num_batches_tracked")}
    checkpoint = tmp_path / "skippable.th"
    torch.save({"state_dict": legacy}, checkpoint)
    # Images labelled with the model's own predictions (the bias centred so every class occurs).
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).float().permute(0, 3, 1, 2) / 255.0 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        logits, _ = hand_forward(model, x)
        model.linear.bias.sub_(logits.mean(0))
        predicted = hand_forward(model, x)[0].argmax(1)
    torch.save({"state_dict": {k: v for k, v in nn.DataParallel(model).state_dict().items()
                               if not k.endswith("num_batches_tracked")}}, checkpoint)
    folder, kept = tmp_path / "own", []
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        chosen = (predicted == label).nonzero().flatten()[:8].tolist()
        assert len(chosen) >= 3, f"class {name}: only {len(chosen)} images predicted"
        for i in chosen:
            Image.fromarray(pixels[i]).save(folder / name / f"{i:03d}.png")
            kept.append(i)
    out = tmp_path / "run"
    normalize = ",".join(map(str, (*MEAN, *STD)))
    code = ablate.main(["--model", "user_models:resnet_option_a", "--checkpoint", str(checkpoint),
                        "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "32",
                        "--normalize", normalize, "--out", str(out), "--no-progress", "--sections", "skipping"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "chance" not in printed.err
    table = pd.read_csv(out / "blocks.csv").set_index("block")
    assert table.loc["layer1.1", "verdict"] == "skipped"
    assert table.loc["layer1.1", "ratio"] < 0.01 and table.loc["layer1.1", "accuracy"] == 1.0
    removed = pd.read_csv(out / "skipping.csv").set_index("state").loc["skipped blocks removed", "removed"].split()
    assert "layer1.1" in removed
    import user_models

    pruned = load_pruned(out / "pruned_model.pt", user_models.resnet_option_a())
    images = x[sorted(kept)]
    with torch.no_grad():
        expected, _ = hand_forward(model, images, deleted=set(removed))
        assert torch.allclose(pruned(images), expected, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_samples_and_calibration_never_overlap(user, tmp_path):
    """--limit draws a stratified sample; calibration samples are set apart from the evaluated ones."""
    _, _, folder = user
    config = RunConfig(dataset="imagefolder", data_root=str(folder), image_size=32, limit=12, seed=3,
                       bn_recalibrate=True, calibration_samples=8)
    datasets = load_datasets(config, calibration=True)
    evaluated, calibration = datasets.evaluation, datasets.calibration
    assert len(evaluated) == 12 and len(calibration) == 8
    assert set(_files(evaluated)).isdisjoint(_files(calibration)) and len(set(_files(evaluated))) == 12
    assert torch.bincount(dataset_targets(evaluated)).tolist() == [3, 3, 3, 3]  # stratified: 12 of 4 x 4
    assert "left out of the evaluation" in datasets.calibration_source
    assert datasets.selection == "a seeded, class-stratified sample of 12 of 16 samples (seed 3)"
    digits = load_datasets(RunConfig(limit=50, bn_recalibrate=True, calibration_samples=20), calibration=True)
    assert "training split" in digits.calibration_source and len(digits.calibration) == 20


def _files(subset) -> list[str]:
    """The image files a (nested) Subset of an ImageFolder holds."""
    indices = list(range(len(subset)))
    while isinstance(subset, torch.utils.data.Subset):
        indices = [subset.indices[i] for i in indices]
        subset = subset.dataset
    return [subset.samples[i][0] for i in indices]


def test_bn_recalibration_reports_both_baselines(user, tmp_path, capsys):
    _, checkpoint, folder = user
    out = tmp_path / "run"
    assert ablate.main(["--model", "user_models:resnet_option_a", "--checkpoint", str(checkpoint),
                        "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "32",
                        "--bn-recalibrate", "--calibration-samples", "8", "--out", str(out), "--no-progress",
                        "--skip", "skipping", "attribution", "uncertainty"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert "8 samples split off" in record["calibration"] and record["samples"] == "all 16 samples"
    recal = pd.read_csv(out / "recalibration.csv")
    trained, refit = recal[~recal["bn_recalibrated"]], recal[recal["bn_recalibrated"]]
    assert trained["baseline_accuracy"].nunique() == 1 and refit["baseline_accuracy"].nunique() == 1
    assert (refit["accuracy_drop"] - (refit["baseline_accuracy"] - refit["accuracy"])).abs().max() < 1e-12
    html = (out / "report.html").read_text()
    assert "intact model as given: accuracy" in html and "recalibrated" in html
    trained_baseline = trained["baseline_accuracy"].iloc[0]
    assert f"{trained_baseline * 100:.2f}% accuracy with its trained statistics" in html


def test_a_folder_one_level_too_high_is_refused(user, tmp_path, capsys):
    _, checkpoint, folder = user
    code = ablate.main(["--model", "user_models:resnet_option_a", "--checkpoint", str(checkpoint),
                        "--dataset", "imagefolder", "--data-root", str(folder.parent), "--out", str(tmp_path / "o"),
                        "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(folder.parent) in err[0]


def test_calibration_data_can_never_be_the_evaluated_data(user, tmp_path):
    """--calibration-root is another image folder; with --split train calibration is split off."""
    _, _, folder = user
    with pytest.raises(ProbeError, match="image folders"):
        load_datasets(RunConfig(split="train", bn_recalibrate=True, calibration_root=str(tmp_path)), calibration=True)
    with pytest.raises(ProbeError, match="evaluated folder itself"):
        load_datasets(RunConfig(dataset="imagefolder", data_root=str(folder), calibration_root=str(folder),
                                bn_recalibrate=True), calibration=True)
    train = load_datasets(RunConfig(split="train", bn_recalibrate=True, calibration_samples=40), calibration=True)
    assert "split off" in train.calibration_source
    assert set(train.calibration.indices).isdisjoint(train.evaluation.indices)
    with pytest.raises(ProbeError, match="--split test"):
        train_loader(RunConfig(split="train"))


def test_the_recalibration_section_alone_never_changes_the_evaluated_samples(user, tmp_path, capsys):
    """Without --bn-recalibrate an image folder keeps all its samples; the section says why it did not run."""
    _, checkpoint, folder = user
    out = tmp_path / "run"
    assert ablate.main(["--model", "user_models:resnet_option_a", "--checkpoint", str(checkpoint),
                        "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "32",
                        "--out", str(out), "--no-progress", "--skip", "skipping", "attribution", "uncertainty",
                        "representation"]) == 0
    assert json.loads((out / "run.json").read_text())["samples"] == "all 24 samples"
    assert "no held-out data to refit BatchNorm" in capsys.readouterr().err
    assert not (out / "recalibration.csv").exists()


def test_shortcut_kinds_of_three_families():
    """identity, 1x1 projection (torchvision), zero-padding (CIFAR option A), function (no weights)."""
    import torchvision

    from probe.instrument.describe import shortcut_kinds
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18(num_classes=4).eval()
    kinds = shortcut_kinds(resnet18, torch.randn(2, 3, 64, 64), probe.find_blocks(resnet18))
    assert [kinds[n] for n in ("layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer4.0")] == \
        ["identity", "projection", "identity", "projection", "projection"]
    cifar = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    assert shortcut_kinds(cifar, torch.randn(2, 1, 8, 8), probe.find_blocks(cifar)) == \
        {"layer1.0": "identity", "layer2.0": "zero-padding", "layer3.0": "zero-padding"}

    class Smoothed(nn.Module):  # a shortcut that computes without weights: a 3x3 average
        def __init__(self):
            super().__init__()
            self.branch, self.shortcut = nn.Conv2d(2, 2, 3, padding=1), nn.AvgPool2d(3, stride=1, padding=1)

        def forward(self, x):
            return self.branch(x) + self.shortcut(x)

    smoothed = nn.Sequential(Smoothed()).eval()
    blocks = probe.find_blocks(smoothed, spec="0=branch,shortcut")  # discovery takes it for two towers
    assert shortcut_kinds(smoothed, torch.randn(2, 2, 5, 5), blocks) == {"0": "function"}


# --- data that does not fit the model: channels, classes, sizes, folders --------------------------

GREY_MODEL = textwrap.dedent('''
    from probe.loading.models import cifar_resnet


    def grey(**_):  # ignores num_classes and in_channels: a 1-channel, 4-class model
        return cifar_resnet(8, num_classes=4, in_channels=1)
''')


def _cli(capsys, *args) -> tuple[int, list[str]]:
    code = ablate.main([*map(str, args), "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def grey_checkpoint(user, tmp_path):
    """A 1-channel model (its factory ignores in_channels) and its state_dict."""
    (tmp_path / "grey_models.py").write_text(GREY_MODEL)
    sys.modules.pop("grey_models", None)
    import grey_models

    torch.manual_seed(0)
    path = tmp_path / "grey.pt"
    torch.save(grey_models.grey().state_dict(), path)
    return path


def test_a_three_channel_checkpoint_on_grey_digits_is_one_line_naming_the_channels(user, tmp_path, capsys):
    _, checkpoint, _ = user
    code, err = _cli(capsys, "--model", "user_models:resnet_option_a", "--checkpoint", checkpoint,
                     "--out", tmp_path / "o", "--limit", "20")
    assert code == 2 and len(err) == 1, err
    assert "takes 3 input channel(s)" in err[0] and "digits data has 1" in err[0] and "--in-channels 3" in err[0]


def test_a_one_channel_checkpoint_on_rgb_images_read_as_rgb_is_one_line(user, grey_checkpoint, tmp_path, capsys):
    _, _, folder = user
    code, err = _cli(capsys, "--model", "grey_models:grey", "--checkpoint", grey_checkpoint, "--dataset",
                     "imagefolder", "--data-root", folder, "--in-channels", "3", "--out", tmp_path / "o")
    assert code == 2 and len(err) == 1, err
    assert "takes 1 input channel(s)" in err[0] and "has 3" in err[0] and "--in-channels 1" in err[0]


def test_a_model_trained_here_that_ignores_in_channels_is_told_about_in_channels(user, tmp_path, capsys):
    code, err = _cli(capsys, "--model", "user_models:resnet_option_a", "--out", tmp_path / "o")
    assert code == 2 and len(err) == 1, err
    assert "takes 3 input channel(s)" in err[0] and "--in-channels 3" in err[0] and "--checkpoint" in err[0]


def test_rgb_images_are_read_grey_for_a_one_channel_model(user, grey_checkpoint, tmp_path, capsys):
    _, _, folder = user
    out = tmp_path / "run"
    code, err = _cli(capsys, "--model", "grey_models:grey", "--checkpoint", grey_checkpoint, "--dataset",
                     "imagefolder", "--data-root", folder, "--normalize", "0.5,0.25", "--out", out,
                     "--sections", "skipping")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["in_channels"] == 1 and record["data"]["normalize"] == "0.5,0.25"
    assert "32x32, 1 channel(s)" in (out / "report.html").read_text()
    # The grey images are what the run measured: the intact accuracy of a forward on them.
    grey = load_dataset("imagefolder", root=folder, in_channels=1, normalize="0.5,0.25")
    import grey_models

    model = grey_models.grey()
    model.load_state_dict(torch.load(grey_checkpoint))
    x = torch.stack([grey[i][0] for i in range(len(grey))])
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == dataset_targets(grey)).double().mean().item()
    assert x.shape[1] == 1 and record["samples"] == "all 24 samples"
    table = pd.read_csv(out / "blocks.csv")
    assert ((table["accuracy"] + table["accuracy_drop"]) - accuracy).abs().max() < 1e-9
    # Without --normalize, ImageNet's three-channel statistics cannot apply to grey images: one line.
    code, err = _cli(capsys, "--model", "grey_models:grey", "--checkpoint", grey_checkpoint, "--dataset",
                     "imagefolder", "--data-root", folder, "--out", tmp_path / "o2")
    assert code == 2 and len(err) == 1 and "--normalize" in err[0] and "grey" in err[0]


def test_mixed_image_sizes_say_what_size_was_chosen(tmp_path, capsys):
    for name, size in {"a": 32, "b": 40}.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (size, size), (0, 128, 255)).save(tmp_path / name / "x.png")
    datasets = load_datasets(RunConfig(dataset="imagefolder", data_root=str(tmp_path)), calibration=False)
    assert datasets.evaluation.info.image_size == 224
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "224x224" in err[0] and "--image-size N" in err[0]
    load_datasets(RunConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=40), calibration=False)
    assert capsys.readouterr().err == ""  # a size asked for needs no note


def test_help_names_every_checkpoint_form():
    text = " ".join(ablate._parser().format_help().split())
    for form in ("state_dict", "model_state_dict", "net", "module.", "DataParallel", "_orig_mod.", "torch.compile",
                 "pickled module", ".safetensors"):
        assert form in text, form


def test_a_model_with_more_classes_than_the_folder_is_warned_and_chance_is_the_datas(user, tmp_path, capsys):
    _, checkpoint, folder = user
    two = tmp_path / "two"
    for name in CLASSES[:2]:
        shutil.copytree(folder / name, two / name)
    code, err = _cli(capsys, "--model", "user_models:resnet_option_a", "--checkpoint", checkpoint, "--dataset",
                     "imagefolder", "--data-root", two, "--out", tmp_path / "o", "--sections", "skipping")
    assert code == 0, err
    assert [line for line in err if "predicts" in line] == [
        "probe.ablate: warning: the model predicts 4 classes but the data has 2: chance is judged on the data's 2, "
        "and a prediction of class 2 or above always counts as wrong; was the model built for another data set?"]
    assert any("(50.0%: 2 classes" in line for line in err if "chance" in line), err


def test_a_folder_two_levels_too_high_is_refused(user, tmp_path, capsys):
    _, checkpoint, folder = user
    above = tmp_path / "datasets"
    for name in ("cifar", "cinic"):
        shutil.copytree(folder, above / name / "test")
    code, err = _cli(capsys, "--model", "user_models:resnet_option_a", "--checkpoint", checkpoint, "--dataset",
                     "imagefolder", "--data-root", above, "--out", tmp_path / "o")
    assert code == 2 and len(err) == 1 and str(above) in err[0], err
    assert repr(str(above / "cifar" / "test")) in err[0]


def test_the_readme_python_example_runs_as_shown(user, tmp_path):
    _, checkpoint, folder = user
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Your own model and data", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    for shown, here in (("mypkg.models:resnet56", "user_models:resnet_option_a"), ("resnet56.th", str(checkpoint)),
                        ("cifar10/test", str(folder))):
        assert shown in code
        code = code.replace(shown, here)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert list(namespace["table"]["block"]) == ["layer1.0", "layer1.1", "layer2.0", "layer3.0"]
