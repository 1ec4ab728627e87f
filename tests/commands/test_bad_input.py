"""Bad input gets a one-line ProbeError naming the bad value and what would work."""

import pytest
import torch

import probe
from probe.loading.checkpoints import load_checkpoint, save_checkpoint
from probe.loading.models import build_model, cifar_resnet
from tiny_models import assert_unchanged, snapshot


def gray_model():
    torch.manual_seed(0)
    return cifar_resnet(20, num_classes=4, in_channels=1).eval()


@pytest.mark.parametrize("call", [
    lambda m, d: probe.measure(m, d, progress=False),
    lambda m, d: probe.sweep(m, d, progress=False),
])
def test_channels_that_do_not_fit(call):
    """ProbeError naming the value: inputs whose channels the model cannot take; the model as before."""
    model = gray_model()
    before = snapshot(model)
    data = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]
    with pytest.raises(probe.ProbeError, match=r"inputs of shape \(2, 3, 16, 16\).*input channels"):
        call(model, data)
    assert_unchanged(model, before)


def test_class_labels_that_do_not_fit():
    """ProbeError naming the value: a class label beyond the model's outputs."""
    model = gray_model()
    data = [(torch.randn(2, 1, 16, 16), torch.tensor([0, 7]))]
    with pytest.raises(probe.ProbeError, match="class label 7, but the model outputs 4 classes"):
        probe.sweep(model, data, progress=False)


def test_empty_data():
    """ProbeError naming the value: data that yields no batch."""
    with pytest.raises(probe.ProbeError, match="empty"):
        probe.measure(gray_model(), [], progress=False)


def test_checkpoint_of_another_architecture(tmp_path):
    """ProbeError naming the value: the keys that do not fit; the model as before."""
    path = tmp_path / "r32.pt"
    save_checkpoint(cifar_resnet(32, num_classes=4, in_channels=1), path)
    model = build_model("resnet20", num_classes=4, in_channels=1)
    before = snapshot(model)
    with pytest.raises(probe.ProbeError, match=r"unexpected.*layer1\.3"):
        load_checkpoint(model, path)
    assert_unchanged(model, before)


def test_nonfinite_activations_are_reported_per_block():
    """no stale or mixed numbers: a sample with an Inf is left out of every block's statistics and counted."""
    model = gray_model()
    inputs = torch.randn(3, 1, 16, 16)
    inputs[1, 0, 0, 0] = float("inf")
    table = probe.measure(model, [(inputs, torch.tensor([0, 1, 2]))], progress=False)
    assert (table["nonfinite"] == 1).all()  # inf reaches every block through the shortcuts
    assert (table["samples"] == 2).all()
    assert table["ratio"].notna().all()
