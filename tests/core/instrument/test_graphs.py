"""`measure` replaying its instrumented forward from a captured graph (`probe.instrument.graphs`).

On a GPU the capture is a CUDA graph; on a CPU, with `graphs=True`, it is a `make_fx` graph that
keeps the same promises (Python runs once, at capture; parameters are read by reference), so
these tests check, on the CPU, the code a GPU runs around each replay: numbers equal the eager
forward's, replays really replace forwards, odd shapes and models that cannot be replayed fall
back or are refused, and the model is left as it was. `benchmarks/gpu_correctness.py` checks
the CUDA graphs themselves where there is a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import probe
from probe.errors import ProbeError
from probe.examples.darknet import darknet_tiny
from probe.instrument import measurement
from probe.instrument.graphs import capture
from probe.instrument.measurement import COLUMNS
from probe.loading.models import cifar_resnet
from tiny_models import assert_unchanged, snapshot

NUMBERS = [c for c in COLUMNS if c not in ("block", "position", "branch", "shortcut")]


def _data(shape: tuple[int, ...], sizes: list[int], seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=generator), torch.randint(0, 4, (n,), generator=generator))
            for n in sizes]


def _architectures() -> dict:
    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18(num_classes=4)
    resnet18.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)  # 16x16 inputs keep their size through the stem
    return {"resnet20": (cifar_resnet(20, num_classes=4, in_channels=3), (3, 16, 16)),
            "torchvision resnet18": (resnet18, (3, 16, 16)),
            "darknet": (darknet_tiny(), (3, 32, 32))}


def _counting(model: nn.Module) -> list[int]:
    """How many times the model's forward has run as Python (a replay does not run it)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["resnet20", "torchvision resnet18", "darknet"])
@pytest.mark.parametrize("per_class", [False, True])
def test_replayed_measure_equals_the_eager_one(name, per_class):
    """Same numbers with and without replays, per block and per class, on three architectures;
    the model is left exactly as it was."""
    model, shape = _architectures()[name]
    model.eval()
    data = _data(shape, [6, 6, 6, 6, 5])
    eager = probe.measure(model, data, per_class=per_class, progress=False, graphs=False)
    before = snapshot(model)
    replayed = probe.measure(model, data, per_class=per_class, progress=False, graphs=True)
    assert_unchanged(model, before)
    assert replayed["block"].tolist() == eager["block"].tolist()
    numbers = [c for c in NUMBERS if c in eager]
    torch.testing.assert_close(torch.tensor(replayed[numbers].to_numpy(float)),
                               torch.tensor(eager[numbers].to_numpy(float)), rtol=1e-6, atol=1e-9)


def test_batches_of_a_captured_shape_are_replayed_not_run():
    """Six batches of 6 and one of 5: the first two of 6 run eagerly (the second is also captured
    and checked), the next four are replays; the odd last batch runs eagerly."""
    model, shape = _architectures()["resnet20"]
    model.eval()
    calls = _counting(model)
    probe.measure(model, _data(shape, [6] * 6 + [5]), progress=False, graphs=True)
    # eager: batches 1, 2 and 7; the capture traces the forward once
    assert calls[0] == 4
    calls[0] = 0
    probe.measure(model, _data(shape, [6] * 6 + [5]), progress=False, graphs=False)
    assert calls[0] == 7


def test_graphs_are_off_on_a_cpu_unless_asked_for():
    model, shape = _architectures()["resnet20"]
    model.eval()
    calls = _counting(model)
    probe.measure(model, _data(shape, [4] * 5), progress=False)
    assert calls[0] == 5


class _Counter(nn.Module):
    """x + c * conv(x), where c counts this module's forwards: Python state a replay freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.calls * self.conv(x)


class _Syncing(nn.Module):
    """Chooses its branch from a tensor's value: no graph can hold that choice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if float(x.mean()) > 0 else 0.5
        return x + scale * self.conv(x)


@pytest.mark.parametrize("model, why", [(_Counter(), "differs from the forward itself"),
                                         (_Syncing(), "cannot be captured")])
def test_a_model_that_cannot_be_replayed_is_refused_or_measured_eagerly(model, why):
    """graphs=True: ProbeError naming why. graphs=None (as on a GPU) falls back to the eager
    forward: silently where the forward cannot be captured, with one warning where its replay
    differs (the model's Python does more than its shapes say)."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), model, nn.Flatten(), nn.Linear(2 * 8 * 8, 4)).eval()
    data = _data((2, 8, 8), [3, 3, 3, 3])
    with pytest.raises(ProbeError, match=why):
        probe.measure(net, data, progress=False, graphs=True)
    eager = probe.measure(net, data, progress=False, graphs=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _measure_wanting_graphs(net, data)
    assert [why in str(w.message) for w in caught] == ([True] if isinstance(model, _Counter) else [])
    if isinstance(model, _Syncing):  # the Counter's numbers depend on how often it ran: not comparable
        torch.testing.assert_close(torch.tensor(fallback[NUMBERS].to_numpy(float)),
                                   torch.tensor(eager[NUMBERS].to_numpy(float)))


def _measure_wanting_graphs(model, data):
    """`measure` as on a GPU with graphs=None: replays where they work, else eager with a warning."""
    original = measurement._graphs_wanted
    measurement._graphs_wanted = lambda graphs, device: None
    try:
        return probe.measure(model, data, progress=False)
    finally:
        measurement._graphs_wanted = original


class _Tied(nn.Module):
    """One block module run twice per forward (weights tied): its rows hold two calls each."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Counter()
        self.block.forward = lambda x: x + self.block.conv(x)  # no counting: only the calls matter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))


def test_a_block_run_twice_per_forward_is_measured_eagerly():
    """Replays hold one call per block: graphs=True refuses, graphs=None measures eagerly."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), _Tied(), nn.Flatten(), nn.Linear(2 * 8 * 8, 4)).eval()
    data = _data((2, 8, 8), [3, 3, 3, 3])
    with pytest.raises(ProbeError, match="more than once per forward"):
        probe.measure(net, data, progress=False, graphs=True)
    eager = probe.measure(net, data, progress=False, graphs=False)
    fallback = _measure_wanting_graphs(net, data)
    assert fallback["samples"].tolist() == eager["samples"].tolist() == [24]  # 12 inputs, 2 calls each
    torch.testing.assert_close(torch.tensor(fallback[NUMBERS].to_numpy(float)),
                               torch.tensor(eager[NUMBERS].to_numpy(float)))


def test_graphs_must_be_a_boolean_or_none():
    model, shape = _architectures()["resnet20"]
    with pytest.raises(ProbeError, match="graphs must be True, False or None"):
        probe.measure(model, _data(shape, [2]), progress=False, graphs="yes")


def test_a_capture_replays_into_one_static_output_and_reads_parameters_by_reference():
    """The promise both kinds of capture keep: each run overwrites the one output tensor, and a
    parameter changed in place after the capture is seen by the next replay."""
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        captured = capture(lambda x: linear(x).sum(dim=1), torch.zeros(4, 3))
        x = torch.randn(4, 3)
        first = captured.run(x)
        assert torch.equal(first, linear(x).sum(dim=1))
        linear.weight.mul_(2)
        second = captured.run(x)
        assert second is first
        assert torch.equal(second, linear(x).sum(dim=1))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_data_raising_after_a_capture_leaves_the_model_unchanged(error):
    """model, flags, hooks and global torch state exactly as before: when the data raises (or
    Ctrl-C) after a shape was captured and replayed."""
    model, shape = _architectures()["torchvision resnet18"]
    model.train()
    model.layer2.eval()  # mixed flags must come back as they were
    before = snapshot(model)

    def data():
        yield from _data(shape, [4] * 4)
        raise error("loader broke")

    with pytest.raises(error, match="loader broke"):
        probe.measure(model, data(), progress=False, graphs=True)
    assert_unchanged(model, before)


def test_a_batch_with_nan_or_inf_is_replayed_like_any_other():
    """measure counts non-finite samples apart; a NaN in the capture batch must not read as a
    replay that differs."""
    model, shape = _architectures()["resnet20"]
    model.eval()
    data = _data(shape, [4] * 5)
    data[1][0][0, 0, 0, 0] = float("inf")  # the capture batch
    data[3][0][1, 0, 0, 0] = float("nan")  # a replayed one
    eager = probe.measure(model, data, progress=False, graphs=False)
    replayed = probe.measure(model, data, progress=False, graphs=True)
    assert replayed["nonfinite"].tolist() == eager["nonfinite"].tolist() and eager["nonfinite"].max() > 0
    torch.testing.assert_close(torch.tensor(replayed[NUMBERS].to_numpy(float)),
                               torch.tensor(eager[NUMBERS].to_numpy(float)), rtol=1e-6, atol=1e-9)


def test_at_most_two_shapes_are_captured():
    """Each graph keeps a forward's activations: a third shape that comes back runs eagerly."""
    model, shape = _architectures()["resnet20"]
    model.eval()
    calls = _counting(model)
    probe.measure(model, _data(shape, [2, 2, 2, 3, 3, 3, 4, 4, 4, 4]), progress=False, graphs=True)
    # sizes 2 and 3: two eager, one trace, one replay each; size 4: four eager (captured: 3)
    assert calls[0] == 2 * 3 + 4
