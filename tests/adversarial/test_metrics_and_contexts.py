"""No silent wrong numbers: metrics and the contexts a call runs in.

Each test's docstring states the promise it checks, on tiny models with numbers worked out by
hand: non-finite outputs are counted apart and left out of every metric; a language model's
per-token statistics count only the positions its attention mask keeps; a batch whose parts
cannot be told apart is refused; every call works inside `torch.no_grad()`,
`torch.inference_mode()` and autocast, with the numbers it gives outside them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import probe
from analyses.representation.iterative_refinement import refinement
from probe.deletion.batchnorm import batchnorm_layers, recalibrate_batchnorm, recalibrated
from probe.errors import ProbeError
from tiny_models import (BN_CAL, BN_EVAL, SEQUENCES, TINY_X, TINY_Y, BNNet, StackedLM, TinyNet,
                         stacked_lm_logits_by_hand)

LAYERS = ["layers.0", "layers.1", "layers.2"]


def _ce(logits: tuple[float, float], label: int) -> float:
    """Cross-entropy of two logits: log(1 + e^(other - own))."""
    return math.log1p(math.exp(logits[1 - label] - logits[label]))


def _nonfinite_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "non-finite" in str(w.message)]


# -- 6. non-finite outputs ------------------------------------------------------------------------------
#
# TinyNet by hand: h1 = relu(2 x0, x1), logits = relu(h1_0, h1_1 / 2) (head = identity).
#   (3, 4), label 0 -> (6, 2): right     (1, 1), label 1 -> (2, 0.5): wrong     (0.3, 1), label 1 -> (0.6, 0.5): wrong
# Without block1 (h1 = x): (3, 2) right, (1, 0.5) wrong, (0.3, 0.5) right (a flip).
# Without block2 (logits = h1): (6, 4) right, (2, 1) wrong, (0.6, 1) right (a flip).
# Two more samples, (NaN, 1) and (Inf, 1), both labelled 0: their logits hold NaN and Inf, their
# argmax is class 0, so before the fix they counted as right (accuracy 3/5, loss NaN).

BAD_X = torch.cat([TINY_X, torch.tensor([[math.nan, 1.0], [math.inf, 1.0]])])
BAD_Y = torch.cat([TINY_Y, torch.tensor([0, 0])])
CLEAN = {"intact": [(6, 2), (2, 0.5), (0.6, 0.5)], "block1": [(3, 2), (1, 0.5), (0.3, 0.5)],
         "block2": [(6, 4), (2, 1), (0.6, 1)]}


def _by_hand(state: str) -> tuple[float, float]:
    """(accuracy, loss) of TinyNet's three finite samples in `state`."""
    logits = CLEAN[state]
    right = sum(int(max(range(2), key=lambda c: pair[c]) == int(label)) for pair, label in zip(logits, TINY_Y))
    return right / 3, sum(_ce(pair, int(label)) for pair, label in zip(logits, TINY_Y)) / 3


def test_nonfinite_outputs_are_left_out_of_accuracy_and_loss_and_counted():
    """Promise: a sample whose outputs are NaN or Inf counts neither as right nor wrong, adds
    nothing to the loss, and is counted in `nonfinite_outputs` (`Outcome.nonfinite`); the rest are
    scored as if it were absent, with one one-line warning per call."""
    model = TinyNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = probe.sweep(model, [(BAD_X[:3], BAD_Y[:3]), (BAD_X[3:], BAD_Y[3:])], progress=False)
    accuracy, loss = _by_hand("intact")
    baseline = table.attrs["baseline"]
    assert baseline["accuracy"] == pytest.approx(accuracy) and accuracy == pytest.approx(1 / 3)
    assert baseline["loss"] == pytest.approx(loss, rel=1e-6)
    assert baseline["samples"] == 5 and baseline["nonfinite_outputs"] == 2
    for name in ("block1", "block2"):
        row = table.set_index("block").loc[name]
        deleted_accuracy, deleted_loss = _by_hand(name)
        assert row["accuracy"] == pytest.approx(deleted_accuracy) == pytest.approx(2 / 3)
        assert row["loss"] == pytest.approx(deleted_loss, rel=1e-6)
        assert row["accuracy_drop"] == pytest.approx(accuracy - deleted_accuracy)
        assert row["loss_increase"] == pytest.approx(deleted_loss - loss, rel=1e-6)
        assert row["flip_rate"] == pytest.approx(1 / 3)  # one flip among the three scored samples
        assert row["nonfinite_outputs"] == 2 and row["samples"] == 5
    messages = _nonfinite_warnings(caught)
    assert len(messages) == 1 and "\n" not in messages[0] and "2 of 5 samples" in messages[0]


def test_nonfinite_samples_leave_per_class_and_per_sample_outcomes_consistent():
    """Promise: with non-finite samples, per-class accuracies count only the finite samples of
    each class, and per-sample outcomes give them weight 0 and loss 0 (so a bootstrap over
    samples reproduces the accuracy and loss)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluation = probe.evaluate_ablations(TinyNet(), [(BAD_X, BAD_Y)], [["block1"]], per_class=True,
                                              outcomes=True, progress=False)
    baseline, (deleted,) = evaluation
    assert baseline.class_samples == [1, 2] and deleted.class_samples == [1, 2]  # the two bad samples: class 0
    assert baseline.class_accuracy == pytest.approx([1.0, 0.0])
    assert deleted.class_accuracy == pytest.approx([1.0, 0.5])
    assert baseline.sample_weight.tolist() == [1, 1, 1, 0, 0]
    assert baseline.sample_loss[3:].tolist() == [0, 0] and baseline.correct.tolist() == [True, False, False,
                                                                                           False, False]
    assert float(baseline.sample_loss.sum() / baseline.sample_weight.sum()) == pytest.approx(baseline.loss)
    assert baseline.nonfinite == deleted.nonfinite == 2
    assert math.isfinite(deleted.loss_increase_se)


def test_finite_outputs_add_no_column_and_no_warning():
    """Promise: for finite outputs nothing changes: no `nonfinite_outputs` column, no warning, the
    same numbers as by hand."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = probe.sweep(TinyNet(), [(TINY_X, TINY_Y)], progress=False)
    assert "nonfinite_outputs" not in table.columns and "nonfinite_outputs" not in table.attrs["baseline"]
    assert table.attrs["baseline"]["accuracy"] == pytest.approx(1 / 3)
    assert not _nonfinite_warnings(caught)


def test_the_block_table_keeps_both_counts_apart():
    """Promise: the per-block table keeps measure's `nonfinite` (samples whose norms were NaN or
    Inf) and the sweep's `nonfinite_outputs` as two columns, next to the accuracies of the finite
    samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = probe.block_table(TinyNet(), [(BAD_X, BAD_Y)], progress=False)
    assert list(table["nonfinite_outputs"]) == [2, 2] and list(table["nonfinite"]) == [2, 2]
    assert not [c for c in table.columns if c.endswith(("_x", "_y"))]
    assert table["accuracy"].tolist() == pytest.approx([2 / 3, 2 / 3])


def test_nonfinite_drift_is_left_out():
    """Promise: under task='drift' a sample whose outputs are not finite is left out of the
    drift and counted in `nonfinite_outputs`; the drift is that of the finite samples."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = probe.sweep(TinyNet(), [(BAD_X, BAD_Y)], task="drift", progress=False)
    for name in ("block1", "block2"):
        drift = sum(math.dist(a, b) / math.hypot(*b) for a, b in zip(CLEAN[name], CLEAN["intact"])) / 3
        row = table.set_index("block").loc[name]
        assert row["drift"] == pytest.approx(drift, rel=1e-6) and row["nonfinite_outputs"] == 2
    assert len(_nonfinite_warnings(caught)) == 1


def test_nonfinite_tokens_are_left_out_of_the_lm_loss():
    """Promise: under task='lm' a position whose logits are not finite is left out of the loss,
    the token accuracy and the token count, and counted in `nonfinite_outputs` (tokens)."""
    model = StackedLM()
    with torch.no_grad():
        model.embed.weight[10] = math.nan  # token 10's position predicts nothing finite
    sequence = [3, 1, 10, 4, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = probe.sweep(model, [{"input_ids": torch.tensor([sequence])}], task="lm", progress=False)
    with torch.no_grad():
        log_p = F.log_softmax(stacked_lm_logits_by_hand(model, torch.tensor([sequence]))[0].double(), dim=-1)
    kept = [0, 1, 3]  # position 2 holds token 10
    nll = -sum(float(log_p[t, sequence[t + 1]]) for t in kept) / len(kept)
    baseline = table.attrs["baseline"]
    assert baseline["tokens"] == 3 and baseline["nonfinite_outputs"] == 1
    assert baseline["loss"] == pytest.approx(nll, rel=1e-6)
    assert list(table["nonfinite_outputs"]) == [1, 1, 1] and list(table["tokens"]) == [3, 3, 3]
    assert table["loss"].notna().all()
    messages = _nonfinite_warnings(caught)
    assert len(messages) == 1 and "1 of 4 tokens" in messages[0]


def test_nonfinite_outputs_under_bn_recalibration_warn_once():
    """Promise: the recalibrating engine leaves non-finite samples out as the plain one does,
    with one warning for the call."""
    x = torch.cat([BN_EVAL_X_WITH_NAN, BN_EVAL[1][0]])
    y = torch.cat([BN_EVAL[0][1], BN_EVAL[1][1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluation = probe.evaluate_ablations(BNNet(), [(x, y)], [["block"]], calibration=BN_CAL, progress=False)
    clean = probe.evaluate_ablations(BNNet(), [(x[1:], y[1:])], [["block"]], calibration=BN_CAL, progress=False)
    assert evaluation.baseline.nonfinite == evaluation.sets[0].nonfinite == 1
    assert evaluation.baseline.accuracy == pytest.approx(clean.baseline.accuracy)
    assert evaluation.baseline.loss == pytest.approx(clean.baseline.loss)
    assert evaluation.sets[0].accuracy == pytest.approx(clean.sets[0].accuracy)
    assert evaluation.sets[0].loss == pytest.approx(clean.sets[0].loss)
    assert len(_nonfinite_warnings(caught)) == 1


BN_EVAL_X_WITH_NAN = BN_EVAL[0][0].clone()
BN_EVAL_X_WITH_NAN[0, 0] = math.nan


# -- 7. padding and a language model's per-token statistics -------------------------------------------


def _lm_statistics_by_hand(model: StackedLM, sequences: list[list[int]]) -> dict[str, list[float]]:
    """Per layer, the mean over sequences of ||F||, ||s||, ||F|| / ||s|| and cos(F, s), each over
    the sequence's own tokens (run alone: no padding)."""
    columns = {name: [] for name in ("branch_norm", "shortcut_norm", "ratio", "cosine")}
    per_layer = [[] for _ in model.layers]
    with torch.no_grad():
        for sequence in sequences:
            h = model.embed.weight[torch.tensor(sequence)].double()  # (tokens, width)
            for index, layer in enumerate(model.layers):
                f = h @ layer.f.weight.double().T + layer.f.bias.double()
                per_layer[index].append((f.norm(), h.norm(), (f * h).sum()))
                h = h + f
    for samples in per_layer:
        columns["branch_norm"].append(sum(float(f) for f, _, _ in samples) / len(samples))
        columns["shortcut_norm"].append(sum(float(s) for _, s, _ in samples) / len(samples))
        columns["ratio"].append(sum(float(f / s) for f, s, _ in samples) / len(samples))
        columns["cosine"].append(sum(float(d / (f * s)) for f, s, d in samples) / len(samples))
    return columns


def _padded(sequences: list[list[int]], side: str, length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        where = slice(0, len(tokens)) if side == "right" else slice(length - len(tokens), length)
        ids[row, where] = torch.tensor(tokens)
        mask[row, where] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("form", ["unpadded", "right", "left"])
def test_lm_statistics_count_only_the_tokens_the_mask_keeps(form):
    """Promise: measure's norms, ratios and cosines of a language model are over the positions
    the attention mask keeps: unpadded, right- and left-padded batches give the numbers of each
    sequence run alone; a row with no real token is no sample."""
    model = StackedLM()
    pair = [SEQUENCES[0], SEQUENCES[1]]  # 6 and 3 tokens
    if form == "unpadded":
        data = [{"input_ids": torch.tensor([tokens])} for tokens in pair]
    else:
        batch = _padded(pair + [[]], form)  # a third row of padding only
        data = [batch]
    table = probe.measure(model, data, progress=False)
    expected = _lm_statistics_by_hand(model, pair)
    assert list(table["block"]) == LAYERS and list(table["samples"]) == [2, 2, 2]
    assert list(table["nonfinite"]) == [0, 0, 0]
    for column, values in expected.items():
        assert table[column].tolist() == pytest.approx(values, rel=1e-5), column


def test_lm_statistics_of_replayed_batches_read_each_batchs_mask():
    """Promise: where measure replays a captured forward (graphs=True), each batch's own attention
    mask decides which positions count, not the mask of the batch it was captured on."""
    model = StackedLM()
    sequences = [*SEQUENCES, SEQUENCES[1]]  # three batches of two, one shape: the third is replayed
    data = [_padded(sequences[i:i + 2], "right") for i in range(0, 6, 2)]
    table = probe.measure(model, data, graphs=True, progress=False)
    expected = _lm_statistics_by_hand(model, sequences)
    for column, values in expected.items():
        assert table[column].tolist() == pytest.approx(values, rel=1e-5), column


# -- 8. batches whose parts cannot be told apart -------------------------------------------------------


def test_a_tuple_of_token_ids_and_a_mask_is_refused_under_lm():
    """Promise: a batch of two integer tensors of one shape (TensorDataset(input_ids,
    attention_mask)) under task='lm' is refused with a one-line ProbeError that says how to name
    the mask, instead of scoring the mask as the next tokens."""
    batch = _padded([SEQUENCES[0], SEQUENCES[1]], "right")
    data = DataLoader(TensorDataset(batch["input_ids"], batch["attention_mask"]), batch_size=2)
    for call in (lambda: probe.sweep(StackedLM(), data, task="lm", progress=False),
                 lambda: probe.evaluate_ablations(StackedLM(), data, [], task="lm", progress=False)):
        with pytest.raises(ProbeError, match="attention_mask") as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "probe.Data" in message and "two integer tensors" in message
    # What the message suggests reads the mask as one: the numbers of the dict form.
    named = probe.Data(data, inputs=lambda b: {"input_ids": b[0], "attention_mask": b[1]}, targets=None)
    assert probe.sweep(StackedLM(), named, task="lm", progress=False).attrs["baseline"] == pytest.approx(
        probe.sweep(StackedLM(), [batch], task="lm", progress=False).attrs["baseline"])


def test_a_tuple_of_token_ids_and_their_labels_is_still_read():
    """Promise: (input_ids, labels) where the labels are the ids (-100 where nothing is predicted)
    is no ambiguity: it gives the numbers of the same batch as a dict."""
    batch = _padded([SEQUENCES[0], SEQUENCES[1]], "right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pair = probe.sweep(StackedLM(), DataLoader(TensorDataset(batch["input_ids"], labels), batch_size=2),
                       task="lm", progress=False)
    named = probe.sweep(StackedLM(), [batch], task="lm", progress=False)
    assert pair.attrs["baseline"] == pytest.approx(named.attrs["baseline"])
    assert pair.attrs["baseline"]["tokens"] == 5 + 2


# -- 10. no_grad, inference_mode, autocast -----------------------------------------------------------------


def _tiny_calls() -> dict:
    data = [(TINY_X[:2], TINY_Y[:2]), (TINY_X[2:], TINY_Y[2:])]
    return {
        "measure": lambda m: probe.measure(m, data, progress=False)["ratio"].tolist(),
        "sweep": lambda m: probe.sweep(m, data, progress=False)["accuracy"].tolist(),
        "sweep unfast": lambda m: probe.sweep(m, data, fast=False, progress=False)["accuracy"].tolist(),
        "sweep mean": lambda m: probe.sweep(m, data, mode="mean", progress=False)["loss"].tolist(),
        "block_table": lambda m: probe.block_table(m, data, progress=False)["accuracy_drop"].tolist(),
        "branch_means": lambda m: probe.branch_means(m, data, progress=False)["block1"].tolist(),
    }


# TinyNet by hand: block1's ratio |x0| / ||x|| per sample; accuracy 2/3 without either block.
TINY_RATIO_1 = (0.6 + 1 / math.sqrt(2) + 0.3 / math.sqrt(1.09)) / 3


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
@pytest.mark.parametrize("call", list(_tiny_calls()))
def test_every_call_works_inside_the_users_context(context, call):
    """Promise: every probe call works inside torch.no_grad(), torch.inference_mode() (the model
    and data made there too) and autocast, with the numbers it gives outside them (autocast: to
    its precision), and leaves the context as it found it."""
    enter = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
             "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    outside = _tiny_calls()[call](TinyNet())
    with enter():
        state = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"))
        model = TinyNet()  # made in the context: inference tensors under inference_mode
        inside = _tiny_calls()[call](model)
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                torch.is_autocast_enabled("cpu")) == state
    assert inside == pytest.approx(outside, rel=1e-2 if context == "autocast" else 1e-6)
    if call == "measure":
        assert outside[0] == pytest.approx(TINY_RATIO_1)
    if call == "sweep":
        assert outside == pytest.approx([2 / 3, 2 / 3])


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("context", ["plain", "inference_mode"])
def test_recalibration_of_weights_made_in_inference_mode(fast, context):
    """Promise: BatchNorm recalibration works on a model whose weights were made under
    torch.inference_mode(), inside it or not, with the numbers of the same model made normally,
    and leaves its buffers as they were (the same inference tensors, the same values)."""
    expected = probe.evaluate_ablations(BNNet(), BN_EVAL, [["block"]], calibration=BN_CAL, fast=fast,
                                        progress=False)
    with torch.inference_mode():
        model = BNNet()
    buffers = {name: (tensor, tensor.clone()) for name, tensor in model.named_buffers()}
    with torch.inference_mode() if context == "inference_mode" else torch.no_grad():
        got = probe.evaluate_ablations(model, BN_EVAL, [["block"]], calibration=BN_CAL, fast=fast, progress=False)
    assert got.baseline.accuracy == pytest.approx(expected.baseline.accuracy)
    assert got.baseline.loss == pytest.approx(expected.baseline.loss, rel=1e-6)
    assert got.sets[0].loss == pytest.approx(expected.sets[0].loss, rel=1e-6)
    assert got.trained_baseline.loss == pytest.approx(expected.trained_baseline.loss, rel=1e-6)
    for name, tensor in model.named_buffers():
        assert tensor is buffers[name][0] and tensor.is_inference() and torch.equal(tensor, buffers[name][1]), name


def test_recalibrating_for_good_writes_into_inference_buffers():
    """Promise: recalibrate_batchnorm changes an inference-mode model's BN statistics for good, to
    those a normally made model gets, and `recalibrated` puts them back on the way out."""
    normal = BNNet()
    recalibrate_batchnorm(normal, BN_CAL, blocks=["block"], progress=False)
    with torch.inference_mode():
        model = BNNet()
    before = {name: tensor.clone() for name, tensor in model.named_buffers()}
    with recalibrated(model, BN_CAL, blocks=["block"], progress=False):
        inside = {name: tensor.clone() for name, tensor in model.named_buffers()}
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.named_buffers())
    samples = recalibrate_batchnorm(model, BN_CAL, blocks=["block"], progress=False)
    assert samples == 8
    for (name, tensor), (_, expected) in zip(model.named_buffers(), normal.named_buffers()):
        assert tensor.is_inference() and torch.allclose(tensor, expected), name
        assert torch.allclose(inside[name], expected), name
    assert [m.momentum for _, m in batchnorm_layers(model)] == [0.1, 0.1]


def test_lm_measure_and_sweep_inside_inference_mode():
    """Promise: a language model's measure and sweep work inside torch.inference_mode() with
    padded batches, with the numbers outside it."""
    batch = _padded([SEQUENCES[0], SEQUENCES[1]], "right")
    outside = probe.measure(StackedLM(), [batch], progress=False)["ratio"].tolist()
    loss = probe.sweep(StackedLM(), [batch], task="lm", progress=False)["loss"].tolist()
    with torch.inference_mode():
        model, data = StackedLM(), [_padded([SEQUENCES[0], SEQUENCES[1]], "right")]
        assert probe.measure(model, data, progress=False)["ratio"].tolist() == pytest.approx(outside, rel=1e-6)
        assert probe.sweep(model, data, task="lm", progress=False)["loss"].tolist() == pytest.approx(loss, rel=1e-6)


def test_gradients_inside_inference_mode():
    """Promise: an analysis that needs gradients works inside torch.inference_mode() (probe
    leaves it for the call), with the numbers outside it."""
    data, model = [(TINY_X, TINY_Y)], TinyNet()
    outside = refinement(model, data, progress=False)
    with torch.inference_mode():
        inside = refinement(model, data, progress=False)
    assert inside["grad_cosine"].tolist() == pytest.approx(outside["grad_cosine"].tolist(), rel=1e-6)
    assert inside["step_ratio"].tolist() == pytest.approx(outside["step_ratio"].tolist(), rel=1e-6)


def test_gradients_through_inference_weights_are_refused_in_one_line():
    """Promise: gradients through weights made under torch.inference_mode() cannot be had (torch
    keeps no autograd record of inference tensors): a one-line ProbeError says so and what to
    do, not torch's raw RuntimeError."""
    with torch.inference_mode():
        model = TinyNet()
    with pytest.raises(ProbeError, match="inference") as info:
        refinement(model, [(TINY_X, TINY_Y)], progress=False)
    assert "\n" not in str(info.value)


def test_bootstrap_intervals_leave_out_non_finite_samples(tiny_net):
    """An interval is over the samples both states scored: a NaN or Inf output is no sample, as it
    is none of the accuracy (two non-finite samples once diluted [-1, 0] to [-0.6, 0])."""
    import warnings

    from analyses.uncertainty import drop_intervals
    from probe.deletion.block_table import join_block_table
    from probe.deletion.evaluation import single_block_sweep
    from tiny_models import TINY_X, TINY_Y

    def intervals(x, y):
        data = [(x, y)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sweep, evaluation = single_block_sweep(tiny_net, data, per_class=True, outcomes=True, progress=False)
            table = join_block_table(probe.measure(tiny_net, data, progress=False), sweep)
            return drop_intervals(table, evaluation, resamples=200)[["accuracy_drop", "drop_low", "drop_high"]]

    dirty = intervals(torch.cat([TINY_X, torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0]])]),
                      torch.cat([TINY_Y, torch.tensor([0, 0])]))
    clean = intervals(TINY_X, TINY_Y)
    assert dirty.values.tolist() == clean.values.tolist()
    assert clean["drop_low"].tolist() == [-1.0, -1.0] and clean["drop_high"].tolist() == [0.0, 0.0]


def test_branch_means_of_a_language_model_leave_out_padding():
    """mode="mean" replaces a branch by its mean over the data: for a language model, over the real
    tokens at each position, so padding changes nothing (a position only padding reaches is 0)."""
    from probe.instrument.measurement import branch_means

    model = StackedLM()
    pair = [SEQUENCES[0], SEQUENCES[1]]  # 6 and 3 tokens
    means = branch_means(model, [_padded(pair, "right")], progress=False)
    # by hand: each layer's branch f(h) at each position, averaged over the sequences that reach it
    by_layer = [[] for _ in model.layers]
    with torch.no_grad():
        for tokens in pair:
            h = model.embed.weight[torch.tensor(tokens)].double()  # (tokens, width)
            for index, layer in enumerate(model.layers):
                f = h @ layer.f.weight.double().T + layer.f.bias.double()
                by_layer[index].append(f)
                h = h + f
    for name, outputs in zip(LAYERS, by_layer):
        expected = torch.zeros(6, outputs[0].shape[1], dtype=torch.float64)
        for position in range(6):
            reaching = [f[position] for f in outputs if len(f) > position]
            expected[position] = torch.stack(reaching).mean(dim=0)
        assert torch.allclose(means[name].double(), expected, atol=1e-6), name


def test_an_empty_batch_among_full_ones_counts_for_nothing(tiny_net):
    """An empty batch (a filtered shard, a last batch of nothing) scores nothing: every number is
    the one the full batches give, where it raised a raw torch error (max() of no labels)."""
    from tiny_models import TINY_X, TINY_Y

    full = [(TINY_X, TINY_Y)]
    with_empty = [(TINY_X[:0], TINY_Y[:0]), (TINY_X, TINY_Y), (TINY_X[:0], TINY_Y[:0])]
    pd.testing.assert_frame_equal(probe.measure(tiny_net, with_empty, progress=False),
                                  probe.measure(tiny_net, full, progress=False))
    for fast in (True, False):
        pd.testing.assert_frame_equal(probe.sweep(tiny_net, with_empty, fast=fast, progress=False),
                                      probe.sweep(tiny_net, full, fast=fast, progress=False))
    assert [t.tolist() for t in probe.branch_means(tiny_net, with_empty, progress=False).values()] == \
        [t.tolist() for t in probe.branch_means(tiny_net, full, progress=False).values()]
