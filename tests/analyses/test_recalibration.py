"""BatchNorm recalibration: statistics equal a hand computation, and the model comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probe
from analyses.recalibration import recalibration
from conftest import assert_unchanged, snapshot
from probe.deletion.batchnorm import evaluate_recalibrated, recalibrate_batchnorm, recalibrated


class BNBlock(nn.Module):
    """out = relu(x + BN(W x)): the branch ends in its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
        with torch.no_grad():
            self.branch[0].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


class BNNet(nn.Module):
    """block -> BatchNorm1d -> linear head over 2 classes; BN buffers set away from their defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.block = BNBlock()
        self.norm = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.head.bias.zero_()
            for bn, mean, var in ((self.block.branch[1], [0.5, -0.5], [2.0, 3.0]), (self.norm, [1.0, 0.2], [0.5, 4.0])):
                bn.running_mean.copy_(torch.tensor(mean))
                bn.running_var.copy_(torch.tensor(var))
                bn.num_batches_tracked.fill_(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x)))


G = torch.Generator().manual_seed(3)
CAL_X = torch.randn(8, 2, generator=G)
CAL = [(CAL_X[:4], torch.zeros(4, dtype=torch.long)), (CAL_X[4:], torch.zeros(4, dtype=torch.long))]
EVAL_X = torch.randn(10, 2, generator=G)
EVAL_Y = torch.tensor([0, 1] * 5)
EVAL = [(EVAL_X[:6], EVAL_Y[:6]), (EVAL_X[6:], EVAL_Y[6:])]


def cumulative(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What momentum=None gives: the mean over batches of each batch's mean and unbiased variance."""
    means = torch.stack([b.mean(dim=0) for b in batches])
    variances = torch.stack([b.var(dim=0, unbiased=True) for b in batches])
    return means.mean(dim=0), variances.mean(dim=0)


def test_statistics_equal_hand_computation_with_the_block_deleted():
    model = BNNet().eval()
    with recalibrated(model, CAL, blocks=["block"]):
        # Deleted branch: the block outputs relu(x), which is what `norm` sees.
        mean, var = cumulative([torch.relu(x) for x, _ in CAL])
        torch.testing.assert_close(model.norm.running_mean, mean)
        torch.testing.assert_close(model.norm.running_var, var)
        assert model.norm.num_batches_tracked.item() == 2
        # The branch still runs (its output is replaced afterwards): its BN sees W x.
        weight = model.block.branch[0].weight.detach()
        mean, var = cumulative([x @ weight.T for x, _ in CAL])
        torch.testing.assert_close(model.block.branch[1].running_mean, mean)
        torch.testing.assert_close(model.block.branch[1].running_var, var)
        assert not model.training and not model.norm.training  # evaluated in eval mode
        # And the body runs the deleted network with the refitted statistics.
        x = EVAL_X[:3]
        norm = model.norm
        normalised = (torch.relu(x) - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        torch.testing.assert_close(model(x), model.head(normalised * norm.weight + norm.bias))


def test_without_blocks_the_intact_network_is_recalibrated():
    model = BNNet().eval()
    with torch.no_grad():
        before = model.block.branch[0].weight.clone()
    with recalibrated(model, CAL):
        branch_bn = model.block.branch[1]
        # norm sees relu(x + BN_train(W x)): the branch normalised with each batch's own statistics.
        seen = []
        for x, _ in CAL:
            w = x @ before.T
            seen.append(torch.relu(x + (w - w.mean(0)) / torch.sqrt(w.var(0, unbiased=False) + branch_bn.eps)))
        mean, var = cumulative(seen)
        torch.testing.assert_close(model.norm.running_mean, mean)
        torch.testing.assert_close(model.norm.running_var, var)


@pytest.mark.parametrize("error", [None, RuntimeError, KeyboardInterrupt])
def test_every_buffer_flag_and_momentum_is_restored_bit_for_bit(error):
    model = BNNet().train()
    model.norm.eval()  # mixed flags must come back as they were
    model.norm.momentum = 0.3
    before = snapshot(model)
    buffers = {name: tensor for name, tensor in model.named_buffers()}
    if error is None:
        with recalibrated(model, CAL, blocks=["block"]):
            assert not torch.equal(model.norm.running_mean, before["tensors"]["norm.running_mean"])
            assert model.norm.num_batches_tracked.item() == 2
    else:
        with pytest.raises(error):
            with recalibrated(model, CAL, blocks=["block"]):
                raise error("body failed")
    assert_unchanged(model, before)
    assert model.norm.momentum == 0.3 and model.block.branch[1].momentum == 0.1
    assert all(tensor is buffers[name] for name, tensor in model.named_buffers())  # same objects, refilled


def test_failing_calibration_data_restores_everything():
    model = BNNet().eval()
    before = snapshot(model)

    def broken():
        yield CAL[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        with recalibrated(model, broken(), blocks=["block"]):
            pass
    assert_unchanged(model, before)


def test_recalibrate_batchnorm_changes_the_model_for_good():
    model = BNNet().eval()
    assert recalibrate_batchnorm(model, CAL, blocks=["block"]) == 8
    mean, _ = cumulative([torch.relu(x) for x, _ in CAL])
    torch.testing.assert_close(model.norm.running_mean, mean)
    assert model.norm.momentum == 0.1 and not model.training


def test_model_without_batchnorm_is_a_clear_error(tiny_net):
    with pytest.raises(probe.ProbeError, match="no BatchNorm"):
        with recalibrated(tiny_net, CAL):
            pass


def test_evaluate_recalibrated_equals_manual_evaluation():
    model = BNNet().eval()
    before = snapshot(model)
    evaluation = evaluate_recalibrated(model, EVAL, [["block"]], CAL, per_class=True, outcomes=True,
                                       progress=False)
    baseline, (result,) = evaluation
    with torch.no_grad():
        as_given = model(EVAL_X).argmax(1)
        with recalibrated(model, CAL, blocks=[]):  # drops are against the intact model, recalibrated alike
            reference = model(EVAL_X).argmax(1)
        with recalibrated(model, CAL, blocks=["block"]):
            logits = model(EVAL_X)
    assert_unchanged(model, before)
    correct = logits.argmax(1) == EVAL_Y
    assert result["accuracy"] == pytest.approx(correct.float().mean().item())
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, EVAL_Y).item(), rel=1e-6)
    assert result["flip_rate"] == pytest.approx((logits.argmax(1) != reference).float().mean().item())
    assert torch.equal(result["correct"], correct)
    assert result["class_samples"] == [5, 5]
    assert result["class_accuracy"] == pytest.approx([correct[EVAL_Y == c].float().mean().item() for c in (0, 1)])
    assert baseline["accuracy"] == pytest.approx((reference == EVAL_Y).float().mean().item())
    assert "flip_rate" not in baseline
    assert evaluation.trained_baseline.accuracy == pytest.approx((as_given == EVAL_Y).float().mean().item())
    assert not torch.equal(reference, as_given)  # the refit alone changes predictions: the case that matters


def test_recalibration_analysis_pairs_each_block():
    model = BNNet().eval()
    before = snapshot(model)
    table = recalibration(model, EVAL, CAL, progress=False)
    assert_unchanged(model, before)
    assert table[["block", "bn_recalibrated"]].values.tolist() == [["block", False], ["block", True]]
    plain = probe.sweep(model, EVAL, progress=False).iloc[0]
    _, (refit,) = evaluate_recalibrated(model, EVAL, [["block"]], CAL, progress=False)
    assert table.iloc[0]["accuracy_drop"] == pytest.approx(plain["accuracy_drop"])
    assert table.iloc[1]["accuracy"] == pytest.approx(refit["accuracy"])
    assert table.iloc[1]["loss"] == pytest.approx(refit["loss"])


def test_analysis_runs_without_blocks_to_find_in_calibration(tiny_net):
    # TinyNet has residual blocks but no BatchNorm: recalibration must say so, not crash elsewhere.
    with pytest.raises(probe.ProbeError, match="BatchNorm"):
        recalibration(tiny_net, [(torch.ones(2, 2), torch.tensor([0, 1]))], CAL, progress=False)


def test_tiny_net_unchanged_by_failed_recalibration(tiny_net):
    before = snapshot(tiny_net)
    with pytest.raises(probe.ProbeError):
        recalibrate_batchnorm(tiny_net, CAL)
    assert_unchanged(tiny_net, before)
