"""Tasks: language-model loss, output drift and a user's own metric, checked against hand
computations on tiny models; the fast sweep equals the naive loop for every task."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import probe
from probe.errors import ProbeError
from tiny_models import (SEQUENCES, StackedLM, TokenWindows, TwoHeadNet, regression_data, regressor, squared_error,
                         stacked_lm_logits_by_hand, two_heads_by_hand, unlabelled_images)

LAYERS = ["layers.0", "layers.1", "layers.2"]


def nll_by_hand(model: StackedLM, sequences: list[list[int]], skip: set[int] = frozenset()) -> tuple[float, int, int]:
    """(summed next-token NLL, predicted tokens, correct top-1 predictions) over `sequences`,
    each run alone (no padding)."""
    total, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for sequence in sequences:
            ids = torch.tensor([sequence])
            log_p = F.log_softmax(stacked_lm_logits_by_hand(model, ids, skip)[0].double(), dim=-1)
            for t in range(len(sequence) - 1):
                total -= float(log_p[t, sequence[t + 1]])
                correct += int(log_p[t].argmax()) == sequence[t + 1]
                tokens += 1
    return total, tokens, correct


def padded_loader(batch_size: int = 5) -> DataLoader:
    return DataLoader(TokenWindows(SEQUENCES), batch_size=batch_size)


def test_lm_loss_and_perplexity_by_hand():
    model = StackedLM().eval()
    table = probe.sweep(model, padded_loader(), task="lm", progress=False)
    total, tokens, correct = nll_by_hand(model, SEQUENCES)
    assert tokens == 5 + 2 + 3 + 4 + 1
    baseline = table.attrs["baseline"]
    assert baseline["tokens"] == tokens and baseline["samples"] == len(SEQUENCES)
    assert baseline["loss"] == pytest.approx(total / tokens, rel=1e-6)
    assert baseline["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-6)
    assert baseline["token_accuracy"] == pytest.approx(correct / tokens)
    assert list(table["block"]) == LAYERS
    for index, row in table.iterrows():
        deleted, _, deleted_correct = nll_by_hand(model, SEQUENCES, skip={index})
        assert row["loss"] == pytest.approx(deleted / tokens, rel=1e-6)
        assert row["loss_increase"] == pytest.approx((deleted - total) / tokens, abs=1e-6)  # float32 logits
        assert row["perplexity_ratio"] == pytest.approx(math.exp((deleted - total) / tokens), rel=1e-6)
        assert row["token_accuracy_drop"] == pytest.approx((correct - deleted_correct) / tokens)
        assert row["tokens"] == tokens
    assert "accuracy" not in table.columns and "flip_rate" not in table.columns


def test_padding_changes_nothing():
    """One padded batch, batches of two, and every sequence alone unpadded: the same numbers."""
    model = StackedLM().eval()
    padded = probe.sweep(model, padded_loader(), task="lm", progress=False)
    pairs = probe.sweep(model, padded_loader(batch_size=2), task="lm", progress=False)
    alone = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
             for s in SEQUENCES]
    unpadded = probe.sweep(model, alone, task="lm", progress=False)
    for other in (pairs, unpadded):
        pd.testing.assert_frame_equal(padded.drop(columns="loss_increase_se"),
                                      other.drop(columns="loss_increase_se"), rtol=1e-6)
        assert padded.attrs["baseline"] == pytest.approx(other.attrs["baseline"], rel=1e-6)


def test_lm_labels_of_minus_100_are_not_scored():
    """Hugging Face's labels: -100 marks a position that is not predicted."""
    model = StackedLM().eval()
    ids = torch.tensor([SEQUENCES[0]])
    labels = ids.clone()
    labels[0, 3:] = -100  # only tokens 1 and 2 are predicted
    outcome = probe.evaluate_ablations(model, [{"input_ids": ids, "labels": labels}], [], task="lm",
                                       progress=False).baseline
    total, tokens, _ = nll_by_hand(model, [SEQUENCES[0][:3]])
    assert outcome.units == tokens == 2
    assert outcome.loss == pytest.approx(total / 2, rel=1e-6)


def test_lm_deleting_a_layer_equals_a_model_without_it():
    model = StackedLM().eval()
    table = probe.sweep(model, padded_loader(), task="lm", progress=False)
    smaller = StackedLM().eval()
    smaller.layers = torch.nn.Sequential(smaller.layers[0], smaller.layers[2])
    without = probe.evaluate_ablations(smaller, padded_loader(), [], task="lm", progress=False).baseline
    assert table.loc[1, "loss"] == pytest.approx(without.loss, rel=1e-6)


def drift_by_hand(model: TwoHeadNet, x: torch.Tensor, block: str) -> np.ndarray:
    with torch.no_grad():
        intact, deleted = two_heads_by_hand(model, x), two_heads_by_hand(model, x, skip={block})
    difference = sum((d - i).double().flatten(1).square().sum(dim=1) for d, i in zip(deleted, intact))
    size = sum(i.double().flatten(1).square().sum(dim=1) for i in intact)
    return (difference.sqrt() / size.sqrt()).numpy()


def test_drift_on_two_heads_by_hand():
    model = TwoHeadNet().eval()
    images = unlabelled_images().tensors[0]
    data = DataLoader(unlabelled_images(), batch_size=5)  # batches are [images]: no labels
    table = probe.sweep(model, data, task="drift", progress=False)
    assert list(table.columns) == ["block", "position", "mode", "drift", "drift_se", "samples"]
    assert list(table["block"]) == ["block0", "block1", "block2"]
    assert table.loc[1, "drift"] == 0.0  # block1's branch is exactly zero
    for index, name in [(0, "block0"), (2, "block2")]:
        expected = drift_by_hand(model, images, name)
        assert table.loc[index, "drift"] == pytest.approx(expected.mean(), rel=1e-5)
        assert table.loc[index, "drift_se"] == pytest.approx(expected.std(ddof=1) / math.sqrt(len(expected)),
                                                             rel=1e-4)
        assert table.loc[index, "drift"] > 0.01


def test_drift_kl_on_logits_by_hand():
    """An output with `.logits` is compared as a distribution too."""
    model = StackedLM().eval()

    class WithLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return type("Output", (), {"logits": self.inner(input_ids)})()

    ids = torch.tensor([SEQUENCES[0]])
    wrapper = WithLogits().eval()
    # torch.fx cannot trace an output object: the blocks come from a recorded forward.
    blocks = [b for b in probe.find_blocks(wrapper, example_input=ids) if b.name == "inner.layers.1"]
    table = probe.sweep(wrapper, [ids], task="drift", blocks=blocks, progress=False)
    with torch.no_grad():
        p = F.log_softmax(stacked_lm_logits_by_hand(model, ids).double(), dim=-1)
        q = F.log_softmax(stacked_lm_logits_by_hand(model, ids, skip={1}).double(), dim=-1)
    kl = float((p.exp() * (p - q)).sum(dim=-1).mean())
    assert table.loc[0, "kl"] == pytest.approx(kl, rel=1e-5)


def test_user_metric_by_hand():
    model = regressor().eval()
    x, y = regression_data().tensors
    data = DataLoader(regression_data(), batch_size=7)
    table = probe.sweep(model, data, task=squared_error, progress=False)
    with torch.no_grad():
        intact = (model(x) - y).square().double()
        with probe.ablated(model, ["block0"]):
            deleted = (model(x) - y).square().double()
    assert table.attrs["baseline"]["loss"] == pytest.approx(float(intact.mean()), rel=1e-6)
    assert table.loc[0, "loss"] == pytest.approx(float(deleted.mean()), rel=1e-6)
    assert table.loc[0, "loss_increase_se"] == pytest.approx(float((deleted - intact).std() / math.sqrt(20)),
                                                             rel=1e-4)
    assert table.attrs["baseline"]["accuracy"] == pytest.approx(float((intact.sqrt() < 0.5).double().mean()))
    assert {"accuracy", "accuracy_drop"} <= set(table.columns) and "flip_rate" not in table.columns


def test_user_metric_by_name_and_bad_returns():
    model = regressor().eval()
    data = DataLoader(regression_data(), batch_size=7)
    by_name = probe.sweep(model, data, task="tiny_models:squared_error", progress=False)
    by_function = probe.sweep(model, data, task=squared_error, progress=False)
    pd.testing.assert_frame_equal(by_name, by_function)
    with pytest.raises(ProbeError, match=r"one value per sample.*\(7,\)"):
        probe.sweep(model, data, task=lambda outputs, batch: outputs.sum(), progress=False)
    with pytest.raises(ProbeError, match="unknown task 'segmentation'"):
        probe.sweep(model, data, task="segmentation", progress=False)
    with pytest.raises(ProbeError, match="has no 'nothing'"):
        probe.sweep(model, data, task="tiny_models:nothing", progress=False)


@pytest.mark.parametrize("task,model,data", [
    ("lm", StackedLM, lambda: padded_loader(batch_size=2)),
    ("drift", TwoHeadNet, lambda: DataLoader(unlabelled_images(), batch_size=5)),
    (squared_error, regressor, lambda: DataLoader(regression_data(), batch_size=7)),
])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_fast_sweep_equals_naive_loop(task, model, data, mode):
    net = model().eval()
    fast = probe.sweep(net, data(), task=task, mode=mode, progress=False)
    naive = probe.sweep(net, data(), task=task, mode=mode, fast=False, progress=False)
    pd.testing.assert_frame_equal(fast, naive, rtol=1e-6, atol=1e-9)


def test_drift_verdicts():
    """A zero branch is skipped; a block whose deletion moves the outputs by far more than the
    tolerance helps; drift has no direction, so none hurts."""
    model = TwoHeadNet().eval()
    table = probe.block_table(model, DataLoader(unlabelled_images(), batch_size=5), task="drift", progress=False)
    verdicts = dict(zip(table["block"], table["verdict"]))
    assert verdicts["block1"] == "skipped"
    for name in ("block0", "block2"):
        row = table.set_index("block").loc[name]
        assert verdicts[name] == ("helps" if row["drift"] > max(2 * row["drift_se"], 0.05) else "neutral")
    assert "hurts" not in verdicts.values()
    assert probe.scoring.verdict.cost_column(table) == "drift"
    summary = probe.scoring.verdict.summarize(table)
    assert summary["skipped"] == ["block1"]


def test_lm_verdict_noise_from_paired_differences():
    model = StackedLM().eval()
    table = probe.block_table(model, padded_loader(), task="lm", progress=False)
    noise = np.maximum(2 * table["loss_increase_se"], 1e-6 * (table["loss"] - table["loss_increase"]).abs() + 1e-12)
    np.testing.assert_allclose(table["noise"], noise)
    expected = np.where(table["loss_increase"] > noise, "helps",
                        np.where(table["loss_increase"] < -noise, "hurts",
                                 np.where(table["ratio"] < 0.5, "skipped", "neutral")))
    assert list(table["verdict"]) == list(expected)


def test_recalibrated_engine_scores_every_task():
    """BN recalibration on a model without BatchNorm statistics changes nothing: both engines agree."""

    class WithNorm(TwoHeadNet):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm2d(1)

        def forward(self, x):
            return super().forward(self.norm(x))

    model = WithNorm().eval()
    data = DataLoader(unlabelled_images(), batch_size=5)
    calibration = DataLoader(unlabelled_images("train"), batch_size=6)
    plain = probe.evaluate_ablations(model, data, [["block0"], ["block1"]], task="drift", progress=False)
    recalibrated = probe.evaluate_ablations(model, data, [["block0"], ["block1"]], task="drift",
                                            calibration=calibration, progress=False)
    assert recalibrated.sets[1].loss == 0.0  # a zero branch: the same refit with or without it
    with probe.deletion.batchnorm.recalibrated(model, calibration):
        with torch.no_grad():
            images = unlabelled_images().tensors[0]
            intact = model(images)
            with probe.ablated(model, ["block0"]):
                deleted = model(images)
    difference = sum((d - i).double().flatten(1).square().sum(dim=1) for d, i in zip(deleted, intact))
    size = sum(i.double().flatten(1).square().sum(dim=1) for i in intact)
    assert recalibrated.sets[0].loss == pytest.approx(float((difference.sqrt() / size.sqrt()).mean()), rel=1e-5)
    assert plain.sets[0].loss != recalibrated.sets[0].loss
