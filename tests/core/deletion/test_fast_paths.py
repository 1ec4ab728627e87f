"""The fast evaluation paths equal the whole-forward ones, on several architectures.

- Sets of several blocks (deletion curves, "remove every skipped block"): the fast sweep runs
  the network from the set's earliest block on, and a deleted block after it runs only its
  shortcut (its branch is never computed).
- BatchNorm recalibration: per set, only the BN layers from the set's earliest block on are
  refitted, in one calibration pass and one evaluation pass over all sets.

Each is compared with `fast=False` (one whole forward per set; one whole calibration and one
whole evaluation pass per set), which the rest of the suite checks against hand-written forwards.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import probe
from probe.examples.darknet import darknet_tiny
from probe.loading.models import cifar_resnet
from tiny_models import assert_unchanged, snapshot


class ScaledBlock(nn.Module):
    """x + gamma * f(x): the branch is no module's output (strategy "intercept")."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6))
        self.gamma = nn.Parameter(torch.full((6,), 0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.f(x)


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.blocks = nn.Sequential(*[ScaledBlock() for _ in range(4)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _with_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Running statistics from a few shifted random batches, so that refitting them matters."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *shape) * 1.5 + 0.2)
    return model.eval()


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(cifar_resnet(20, num_classes=4, in_channels=3), (3, 12, 12))


def _torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(torchvision.models.resnet18(num_classes=4), (3, 32, 32))


def _mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=4, width_mult=0.25)
    nn.init.normal_(model.classifier[1].weight, std=1.0)  # torchvision's 0.01 makes every loss log(4)
    return _with_statistics(model, (3, 32, 32))


def _scaled_net() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(ScaledNet(), (4,))


# name -> (model factory, input shape, task)
ARCHITECTURES = {
    "cifar-resnet20": (_resnet20, (3, 12, 12), None),
    "torchvision-resnet18": (_torchvision_resnet18, (3, 32, 32), None),
    "mobilenet-v2": (_mobilenet_v2, (3, 32, 32), None),
    "intercepted-blocks": (_scaled_net, (4,), None),
    "darknet-drift": (lambda: darknet_tiny(seed=0), (3, 32, 32), "drift"),
}


def _data(shape: tuple[int, ...], batches: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=generator), torch.randint(0, 4 if len(shape) > 1 else 3, (8,),
                                                                          generator=generator))
            for _ in range(batches)]


def _curve_sets(names: list[str]) -> list[list[str]]:
    """Nested prefixes of two orders (as deletion curves are), every block alone, and none."""
    backwards = names[::-1]
    shuffled = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(3)).tolist()]
    return ([names[:k] for k in range(1, len(names) + 1)] + [shuffled[:k] for k in (1, 2, len(names) // 2)]
            + [backwards[:k] for k in (2, 3)] + [[name] for name in names] + [[]])


def _workload(architecture: str, seed: int) -> tuple:
    """(model, data, task, block names, curve sets) of one architecture."""
    factory, shape, task = ARCHITECTURES[architecture]
    model = factory()
    names = [block.name for block in probe.find_blocks(model)]
    return model, _data(shape, 2, seed=seed), task, names, _curve_sets(names)


def _numbers(evaluation) -> list[tuple]:
    return [(o.accuracy, o.loss, o.flip_rate, o.samples, tuple(sorted((o.extra or {}).items())))
            for o in [evaluation.baseline, *evaluation.sets]]


def _assert_same(fast, slow) -> None:
    for got, want in zip(_numbers(fast), _numbers(slow), strict=True):
        for a, b in zip(got, want, strict=True):
            if isinstance(a, float) or isinstance(b, float):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
            elif isinstance(a, tuple):
                for (key_a, value_a), (key_b, value_b) in zip(a, b, strict=True):
                    assert key_a == key_b and value_a == pytest.approx(value_b, rel=1e-5, abs=1e-6)
            else:
                assert a == b


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_sets_of_blocks_equal_whole_forwards(architecture, mode):
    """Deletion-curve sets through the fast sweep equal one whole forward per set."""
    model, data, task, names, sets = _workload(architecture, seed=1)
    before = snapshot(model)
    fast = probe.evaluate_ablations(model, data, sets, mode=mode, task=task, progress=False)
    slow = probe.evaluate_ablations(model, data, sets, mode=mode, task=task, fast=False, progress=False)
    _assert_same(fast, slow)
    assert_unchanged(model, before)
    # Not a degenerate comparison: deleting every block changes the outputs.
    assert _numbers(fast)[len(names)][:2] != _numbers(fast)[0][:2]


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_suffix_only_recalibration_equals_whole_passes(architecture, mode):
    """BN recalibration refitting only each set's suffix equals a whole calibration and a whole
    evaluation pass per set; the model is left exactly as it was."""
    model, data, task, names, sets = _workload(architecture, seed=1)
    calibration = _data(ARCHITECTURES[architecture][1], 2, seed=2)
    before = snapshot(model)
    fast = probe.evaluate_ablations(model, data, sets, mode=mode, calibration=calibration, task=task,
                                    per_class=task is None, outcomes=True, progress=False)
    assert_unchanged(model, before)
    slow = probe.evaluate_ablations(model, data, sets, mode=mode, calibration=calibration, task=task,
                                    per_class=task is None, outcomes=True, fast=False, progress=False)
    _assert_same(fast, slow)
    _assert_same_trained(fast, slow)
    for got, want in zip([fast.baseline, *fast.sets], [slow.baseline, *slow.sets]):
        assert torch.allclose(torch.as_tensor(got.sample_loss), torch.as_tensor(want.sample_loss), rtol=1e-5, atol=1e-6)
        if task is None:
            assert got.class_accuracy == pytest.approx(want.class_accuracy, abs=1e-6)
    if task is None:  # the refit matters here: the recalibrated intact model differs from the one as given
        assert fast.baseline.loss != pytest.approx(fast.trained_baseline.loss, rel=1e-4)
    else:  # drift: against the intact model recalibrated, deleting every block moves the outputs
        assert fast.sets[len(names) - 1].loss > 0.01


def _assert_same_trained(fast, slow) -> None:
    assert fast.trained_baseline.loss == pytest.approx(slow.trained_baseline.loss, rel=1e-6)


def test_a_deleted_block_after_the_first_never_computes_its_branch():
    """In a set, the deleted blocks run only their shortcut: their branch modules are not called
    (the hooks' way would compute them and throw them away)."""
    model = _resnet20()
    blocks = probe.find_blocks(model)
    calls = {block.name: 0 for block in blocks}
    handles = [model.get_submodule(block.branch).register_forward_hook(
        lambda *_args, name=block.name: calls.__setitem__(name, calls[name] + 1)) for block in blocks]
    try:
        deleted = [blocks[2], blocks[5], blocks[7]]
        probe.evaluate_ablations(model, _data((3, 12, 12), 1, seed=0), [deleted], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # The baseline pass runs every branch once; the suffix runs each live block after blocks[2]
    # again, and no deleted one.
    assert [calls[block.name] for block in deleted] == [1, 1, 1]
    assert calls[blocks[0].name] == 1 and calls[blocks[3].name] == 2 and calls[blocks[8].name] == 2


def test_recalibration_refits_only_what_follows_the_deleted_block():
    """The BN layers before a set's earliest block are not run again per set: the stem's BN sees
    each calibration batch once (the intact model's pass), not once per set."""
    model = _resnet20()
    blocks = probe.find_blocks(model)
    data, calibration = _data((3, 12, 12), 1, seed=1), _data((3, 12, 12), 3, seed=2)
    calls = []
    handle = model.bn1.register_forward_hook(lambda module, *_: calls.append(module.training))
    try:
        probe.evaluate_ablations(model, data, [[block] for block in blocks], calibration=calibration, progress=False)
    finally:
        handle.remove()
    # Calibration: 3 batches in train mode; evaluation: the trained and the recalibrated intact model.
    assert calls.count(True) == 3 and calls.count(False) == 2


def test_the_next_point_of_a_deletion_curve_runs_on_from_the_last_one():
    """A set that holds the set before it runs only from its earliest new block on, fed from the
    network of the set before (nothing before a deleted block changes)."""
    model = _resnet20()
    blocks = probe.find_blocks(model)
    calls = {block.name: 0 for block in blocks}
    handles = [model.get_submodule(block.branch).register_forward_hook(
        lambda *_args, name=block.name: calls.__setitem__(name, calls[name] + 1)) for block in blocks]
    data = _data((3, 12, 12), 1, seed=0)
    sets = [[blocks[3]], [blocks[3], blocks[6]], [blocks[3], blocks[6]], [blocks[1]]]
    try:
        chained = probe.evaluate_ablations(model, data, sets, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # blocks 4, 5: the baseline pass and the first set; not again for the second (it starts at
    # block 6) nor the third (the same set); the fourth set starts from the intact network.
    assert calls[blocks[4].name] == calls[blocks[5].name] == 3
    assert calls[blocks[7].name] == 4  # baseline, sets 1, 2 and 4
    assert calls[blocks[0].name] == 1
    _assert_same(chained, probe.evaluate_ablations(model, data, sets, fast=False, progress=False))


@pytest.mark.parametrize("architecture", ["cifar-resnet20", "torchvision-resnet18", "intercepted-blocks",
                                          "darknet-drift"])
def test_stacked_ablations_equal_one_set_at_a_time(architecture, monkeypatch):
    """Several sets in one forward (their copies of the batch stacked, each copy's deletions on
    its own rows) give the numbers of one set at a time, for single blocks and curve sets; every
    batch really is stacked (its self-check would otherwise fall back to one set at a time)."""
    model, data, task, _, sets = _workload(architecture, seed=4)
    before = snapshot(model)
    answers = []
    stacked_sets = probe.deletion.evaluation._score_stacked
    monkeypatch.setattr(probe.deletion.evaluation, "_score_stacked",
                        lambda *args, **kwargs: answers.append(stacked_sets(*args, **kwargs)) or answers[-1])
    for mode in ("zero", "mean"):
        stacked = probe.evaluate_ablations(model, data, sets, mode=mode, task=task, stack=3, outcomes=True,
                                           progress=False)
        alone = probe.evaluate_ablations(model, data, sets, mode=mode, task=task, outcomes=True, progress=False)
        _assert_same(stacked, alone)
        for got, want in zip(stacked.sets, alone.sets):
            assert torch.allclose(torch.as_tensor(got.sample_loss), torch.as_tensor(want.sample_loss),
                                  rtol=1e-5, atol=1e-6)
    assert answers and all(answers)
    assert_unchanged(model, before)
    with pytest.raises(probe.ProbeError, match="stack must be a whole number >= 1"):
        probe.evaluate_ablations(model, data, sets, stack=0, progress=False)


def test_stacking_a_value_that_is_no_batch_falls_back_to_one_set_at_a_time(monkeypatch):
    """A cached constant whose first dimension happens to equal the batch size would be stacked
    by mistake: the first copy's check catches it and every set is evaluated alone."""

    class WithTable(nn.Module):  # an (8, 6) table crosses both blocks: not a batch, but 8 rows
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(6, 6)
            self.blocks = nn.Sequential(ScaledBlock(), ScaledBlock())
            self.head = nn.Linear(6, 3)
            self.register_buffer("table", torch.randn(8, 6))

        def forward(self, x):
            table = self.table + 0.0 * x.sum()  # made from the input: traced, a value the cache holds
            return self.head(self.blocks(self.stem(x)) + table.sum(0))

    torch.manual_seed(0)
    model = _with_statistics(WithTable(), (6,))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    sets = [["blocks.0"], ["blocks.1"], ["blocks.0", "blocks.1"]]
    answers = []
    stacked_sets = probe.deletion.evaluation._score_stacked
    monkeypatch.setattr(probe.deletion.evaluation, "_score_stacked",
                        lambda *args, **kwargs: answers.append(stacked_sets(*args, **kwargs)) or answers[-1])
    stacked = probe.evaluate_ablations(model, data, sets, stack=3, progress=False)
    assert answers == [False]  # tried once, refused, never again
    _assert_same(stacked, probe.evaluate_ablations(model, data, sets, fast=False, progress=False))
