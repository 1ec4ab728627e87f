"""BatchNorm recalibration: statistics equal a hand computation, and the model comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probe
from analyses.recalibration import recalibration
from probe.deletion.batchnorm import evaluate_recalibrated, recalibrate_batchnorm, recalibrated
from tiny_models import BN_CAL, BN_EVAL, BN_EVAL_X, BN_EVAL_Y, BNNet, assert_unchanged, snapshot


def cumulative(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What momentum=None gives: the mean over batches of each batch's mean and unbiased variance."""
    means = torch.stack([b.mean(dim=0) for b in batches])
    variances = torch.stack([b.var(dim=0, unbiased=True) for b in batches])
    return means.mean(dim=0), variances.mean(dim=0)


def test_statistics_equal_hand_computation_with_the_block_deleted():
    model = BNNet().eval()
    with recalibrated(model, BN_CAL, blocks=["block"]):
        # Deleted branch: the block outputs relu(x), which is what `norm` sees.
        mean, var = cumulative([torch.relu(x) for x, _ in BN_CAL])
        torch.testing.assert_close(model.norm.running_mean, mean)
        torch.testing.assert_close(model.norm.running_var, var)
        assert model.norm.num_batches_tracked.item() == 2
        # The branch still runs (its output is replaced afterwards): its BN sees W x.
        weight = model.block.branch[0].weight.detach()
        mean, var = cumulative([x @ weight.T for x, _ in BN_CAL])
        torch.testing.assert_close(model.block.branch[1].running_mean, mean)
        torch.testing.assert_close(model.block.branch[1].running_var, var)
        assert not model.training and not model.norm.training  # evaluated in eval mode
        # And the body runs the deleted network with the refitted statistics.
        x = BN_EVAL_X[:3]
        norm = model.norm
        normalised = (torch.relu(x) - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        torch.testing.assert_close(model(x), model.head(normalised * norm.weight + norm.bias))


def test_without_blocks_the_intact_network_is_recalibrated():
    model = BNNet().eval()
    with torch.no_grad():
        before = model.block.branch[0].weight.clone()
    with recalibrated(model, BN_CAL):
        branch_bn = model.block.branch[1]
        # norm sees relu(x + BN_train(W x)): the branch normalised with each batch's own statistics.
        seen = []
        for x, _ in BN_CAL:
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
        with recalibrated(model, BN_CAL, blocks=["block"]):
            assert not torch.equal(model.norm.running_mean, before["tensors"]["norm.running_mean"])
            assert model.norm.num_batches_tracked.item() == 2
    else:
        with pytest.raises(error):
            with recalibrated(model, BN_CAL, blocks=["block"]):
                raise error("body failed")
    assert_unchanged(model, before)
    assert model.norm.momentum == 0.3 and model.block.branch[1].momentum == 0.1
    assert all(tensor is buffers[name] for name, tensor in model.named_buffers())  # same objects, refilled


def test_failing_calibration_data_restores_everything():
    model = BNNet().eval()
    before = snapshot(model)

    def broken():
        yield BN_CAL[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        with recalibrated(model, broken(), blocks=["block"]):
            pass
    assert_unchanged(model, before)


def test_recalibrate_batchnorm_changes_the_model_for_good():
    model = BNNet().eval()
    assert recalibrate_batchnorm(model, BN_CAL, blocks=["block"]) == 8
    mean, _ = cumulative([torch.relu(x) for x, _ in BN_CAL])
    torch.testing.assert_close(model.norm.running_mean, mean)
    assert model.norm.momentum == 0.1 and not model.training


def test_model_without_batchnorm_is_a_clear_error(tiny_net):
    with pytest.raises(probe.ProbeError, match="no BatchNorm"):
        with recalibrated(tiny_net, BN_CAL):
            pass


def test_evaluate_recalibrated_equals_manual_evaluation():
    model = BNNet().eval()
    before = snapshot(model)
    evaluation = evaluate_recalibrated(model, BN_EVAL, [["block"]], BN_CAL, per_class=True, outcomes=True,
                                       progress=False)
    baseline, (result,) = evaluation
    with torch.no_grad():
        as_given = model(BN_EVAL_X).argmax(1)
        with recalibrated(model, BN_CAL, blocks=[]):  # drops are against the intact model, recalibrated alike
            reference = model(BN_EVAL_X).argmax(1)
        with recalibrated(model, BN_CAL, blocks=["block"]):
            logits = model(BN_EVAL_X)
    assert_unchanged(model, before)
    correct = logits.argmax(1) == BN_EVAL_Y
    assert result["accuracy"] == pytest.approx(correct.float().mean().item())
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, BN_EVAL_Y).item(), rel=1e-6)
    assert result["flip_rate"] == pytest.approx((logits.argmax(1) != reference).float().mean().item())
    assert torch.equal(result["correct"], correct)
    assert result["class_samples"] == [5, 5]
    assert result["class_accuracy"] == pytest.approx([correct[BN_EVAL_Y == c].float().mean().item() for c in (0, 1)])
    assert baseline["accuracy"] == pytest.approx((reference == BN_EVAL_Y).float().mean().item())
    assert "flip_rate" not in baseline
    assert evaluation.trained_baseline.accuracy == pytest.approx((as_given == BN_EVAL_Y).float().mean().item())
    assert not torch.equal(reference, as_given)  # the refit alone changes predictions: the case that matters


def test_recalibration_analysis_pairs_each_block():
    model = BNNet().eval()
    before = snapshot(model)
    table = recalibration(model, BN_EVAL, calibration=BN_CAL, progress=False).table
    assert_unchanged(model, before)
    assert table[["block", "bn_recalibrated"]].values.tolist() == [["block", False], ["block", True]]
    plain = probe.sweep(model, BN_EVAL, progress=False).iloc[0]
    _, (refit,) = evaluate_recalibrated(model, BN_EVAL, [["block"]], BN_CAL, progress=False)
    assert table.iloc[0]["accuracy_drop"] == pytest.approx(plain["accuracy_drop"])
    assert table.iloc[1]["accuracy"] == pytest.approx(refit["accuracy"])
    assert table.iloc[1]["loss"] == pytest.approx(refit["loss"])


def test_analysis_runs_without_blocks_to_find_in_calibration(tiny_net):
    # TinyNet has residual blocks but no BatchNorm: recalibration must say so, not crash elsewhere.
    with pytest.raises(probe.ProbeError, match="BatchNorm"):
        recalibration(tiny_net, [(torch.ones(2, 2), torch.tensor([0, 1]))], calibration=BN_CAL, progress=False)


def test_tiny_net_unchanged_by_failed_recalibration(tiny_net):
    before = snapshot(tiny_net)
    with pytest.raises(probe.ProbeError):
        recalibrate_batchnorm(tiny_net, BN_CAL)
    assert_unchanged(tiny_net, before)
