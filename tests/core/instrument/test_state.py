"""Every public call leaves the model exactly as it found it, also when it raises."""

import pytest
import torch
import torchvision

import probe
from tiny_models import assert_unchanged, snapshot


def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    model.train()
    model.layer2.eval()  # mixed flags must come back as they were
    return model


def batches(n=2, fail_at=None, error=RuntimeError):
    torch.manual_seed(1)
    for i in range(n):
        if i == fail_at:
            raise error("loader broke")
        yield torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2,))


CALLS = {
    "find_blocks": lambda m, d: probe.find_blocks(m),
    "measure": lambda m, d: probe.measure(m, d, progress=False),
    "measure_per_class": lambda m, d: probe.measure(m, d, per_class=True, progress=False),
    "measure_graphs": lambda m, d: probe.measure(m, d, progress=False, graphs=True),
    "branch_means": lambda m, d: probe.branch_means(m, d, progress=False),
    "sweep": lambda m, d: probe.sweep(m, d, progress=False),
    "sweep_mean": lambda m, d: probe.sweep(m, d, mode="mean", progress=False),
}


@pytest.mark.parametrize("call", CALLS)
def test_call_leaves_model_unchanged(call):
    """model, flags, hooks and global torch state exactly as before: after each public call."""
    model = resnet()
    before = snapshot(model)
    CALLS[call](model, list(batches()))
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", [c for c in CALLS if c != "find_blocks"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_loader_raising_midway_leaves_model_unchanged(call, error):
    """model, flags, hooks and global torch state exactly as before: when the data raises (or Ctrl-C) midway."""
    model = resnet()
    before = snapshot(model)
    with pytest.raises(error):
        CALLS[call](model, batches(n=3, fail_at=1, error=error))
    assert_unchanged(model, before)


def test_bad_batch_raises_probe_error_and_leaves_model_unchanged():
    """ProbeError naming the value (the batch and its targets' dtype), the model as before."""
    model = resnet()
    before = snapshot(model)
    good = next(batches())
    with pytest.raises(probe.ProbeError, match="batch 2 has targets of dtype torch.float32"):
        probe.sweep(model, [good, (good[0], good[1].float())], progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_ablated_removes_hooks(error):
    """model, flags, hooks and global torch state exactly as before: an error inside `ablated` removes its hooks."""
    model = resnet().eval()  # the body's own forward must not move BN statistics
    before = snapshot(model)
    with pytest.raises(error):
        with probe.ablated(model, ["layer1.0", "layer2.0"]):
            model(torch.randn(1, 3, 32, 32))
            raise error("user code failed")
    assert_unchanged(model, before)


def test_ablated_leaves_model_unchanged_after_normal_exit():
    """model, flags, hooks and global torch state exactly as before: after `ablated` ends normally."""
    model = resnet()
    before = snapshot(model)
    with probe.ablated(model, ["layer3.1"]):
        assert len(model.layer3[1].bn2._forward_hooks) == 1
    assert_unchanged(model, before)
