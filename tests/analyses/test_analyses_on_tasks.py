"""Every analysis under tasks other than classification (`probe.scoring.tasks`): drift, causal language
modeling and a user's own loss, on tiny hand-set models, against numbers computed by hand or by
an independent numpy resampling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import probe
from analyses.attribution import NO_DRIFT_GRADIENT, attribution, gradient_x_activation
from analyses.pipeline import run_analyses
from analyses.recalibration import recalibration
from analyses.representation import CLASSES_COLUMNS, LENS_COLUMNS, PROBE_COLUMNS, representation
from reports.sections.representation import story
from analyses.skipping import deletion_orders, skipping
from analyses.uncertainty import CLASS_COLUMNS, drop_intervals, interval_columns, uncertainty
from probe.commands.config import RunConfig
from probe.deletion.evaluation import single_block_sweep
from probe.scoring.results import Evaluation, Outcome
from probe.scoring.tasks import Drift
from tiny_models import (BN_CAL, BN_EVAL_X, BNNet, LinearBlock, TinyNet, TwoBlockLM, assert_unchanged, snapshot,
                         two_block_lm_logits_by_hand)

# --- drift on TinyNet ----------------------------------------------------------------------------
#
# TinyNet (tiny_models): block1 F(x) = (x0, 0), block2 F(h) = (0, -h1 / 2), identity head. For
# positive inputs the intact output is (2 x0, x1 / 2); without block1 (x0, x1 / 2); without block2
# (2 x0, x1); without both x itself.

X = torch.tensor([[1.0, 2.0], [0.5, 3.0], [2.0, 1.0], [0.2, 0.4], [1.5, 1.5], [3.0, 0.5]])


def unlabelled() -> list[torch.Tensor]:
    return [X[:4], X[4:]]


def drift_by_hand(deleted: set[str]) -> np.ndarray:
    """Per-sample ||out_deleted - out|| / ||out|| on X."""
    values = []
    for x0, x1 in X.tolist():
        intact = (2 * x0, x1 / 2)
        h = (x0, x1) if "block1" in deleted else (2 * x0, x1)
        out = h if "block2" in deleted else (h[0], h[1] / 2)
        values.append(math.hypot(out[0] - intact[0], out[1] - intact[1]) / math.hypot(*intact))
    return np.array(values)


def drift_table() -> pd.DataFrame:
    """block1 carries the network (drift 0.3, large ratio); block2 is small and moves the
    outputs by less than max_drift (0.05): the rule calls it skipped."""
    return pd.DataFrame({"block": ["block1", "block2"], "position": [0, 1], "ratio": [0.9, 0.1],
                         "drift": [0.3, 0.01], "drift_se": [0.01, 0.001], "samples": [6, 6]})


def test_skipping_curves_for_drift_equal_the_drift_by_hand(tiny_net):
    before = snapshot(tiny_net)
    result = skipping(tiny_net, unlabelled(), table=drift_table(), task="drift", random_draws=1, seed=2, export=False,
                      progress=False)
    assert_unchanged(tiny_net, before)
    summary = result.summary.set_index("state")
    assert list(result.summary.columns) == ["state", "blocks_removed", "removed", "drift", "drift_se", "samples",
                                            "mode", "bn_recalibrated"]
    assert summary.loc["all blocks", ["drift", "drift_se"]].tolist() == [0.0, 0.0]
    after = summary.loc["skipped blocks removed"]
    assert after["removed"] == "block2"
    only2 = drift_by_hand({"block2"})
    assert after["drift"] == pytest.approx(only2.mean(), rel=1e-6)
    # The paired SE against an intact model whose drift is 0: the standard error of the mean drift.
    assert after["drift_se"] == pytest.approx(only2.std(ddof=1) / math.sqrt(6), rel=1e-6)
    curves = result.curves
    assert list(curves.columns) == ["order", "draw", "k", "removed", "drift", "drift_se", "samples", "mode",
                                    "bn_recalibrated"]
    both = drift_by_hand({"block1", "block2"}).mean()
    assert curves.loc[curves["k"] == 2, "drift"].tolist() == pytest.approx([both] * 3, rel=1e-6)
    assert curves.loc[curves["k"] == 0, "drift"].tolist() == [0.0] * 3
    # The "drop" order is by the drift: block2 (0.01) before block1 (0.3).
    drop = curves[curves["order"] == "drop"].set_index("k")
    assert drop["removed"].tolist() == ["", "block2", "block1"]
    assert drop.loc[1, "drift"] == pytest.approx(only2.mean(), rel=1e-6)


def test_deletion_orders_sort_by_the_cost_column():
    table = drift_table().assign(drift=[0.01, 0.3], ratio=[0.1, 0.9])
    assert deletion_orders(table, random_draws=0)[1] == ("drop", 0, ["block1", "block2"])
    lm = pd.DataFrame({"block": ["a", "b", "c"], "position": [0, 1, 2], "ratio": [0.3, 0.2, 0.1],
                       "loss_increase": [0.5, -0.1, 0.2], "loss_increase_se": [0.1] * 3, "samples": [9] * 3})
    assert deletion_orders(lm, random_draws=0)[1][2] == ["b", "c", "a"]


class TupleNet(TinyNet):
    """TinyNet that also returns block1's output: (logits, h)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.block1(x)
        return self.head(self.block2(h)), h


def test_skipping_exports_a_model_with_tuple_outputs(tmp_path):
    model = TupleNet().eval()
    result = skipping(model, unlabelled(), table=drift_table(), task="drift", random_draws=0,
                      export_path=tmp_path / "p.pt", progress=False)
    # Deleting block2 changes the logits by (0, x1 / 2) and leaves h = (2 x0, x1) as it was;
    # drift is over both outputs joined.
    expected = np.mean([(x1 / 2) / math.sqrt((2 * x0) ** 2 + (x1 / 2) ** 2 + (2 * x0) ** 2 + x1 ** 2)
                        for x0, x1 in X.tolist()])
    assert result.summary.set_index("state").loc["skipped blocks removed", "drift"] == pytest.approx(expected,
                                                                                                      rel=1e-6)
    pruned = result.export.set_index("model").loc["pruned"]
    assert pruned["blocks"] == 1 and pruned["max_abs_difference"] == 0.0 and result.export_note == ""
    exported = torch.load(tmp_path / "p.pt", weights_only=False)
    with torch.no_grad(), probe.ablated(model, ["block2"]):
        logits, h = model(X)
    with torch.no_grad():
        got = exported(X)
    assert torch.equal(got[0], logits) and torch.equal(got[1], h)


def test_a_table_of_another_task_is_refused(tiny_net):
    classification = drift_table().drop(columns=["drift", "drift_se"]).assign(accuracy_drop=0.0, flip_rate=0.0)
    with pytest.raises(probe.ProbeError, match="another task"):
        skipping(tiny_net, unlabelled(), table=classification, task="drift", progress=False)
    with pytest.raises(probe.ProbeError, match="another task"):
        attribution(tiny_net, unlabelled(), table=drift_table(), progress=False)  # classification by default


def numpy_interval(d: np.ndarray, w: np.ndarray, seed: list[int], resamples: int, level: float = 0.95):
    """The bootstrap written out independently: resample r draws n indices with
    rng.integers(0, n, n), one call per resample."""
    rng = np.random.default_rng(seed)
    n = len(d)
    costs = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        costs.append(d[idx].sum() / w[idx].sum())
    return tuple(np.quantile(costs, [(1 - level) / 2, (1 + level) / 2]))


def test_drift_intervals_and_decisions():
    """Synthetic per-sample drifts: a moves the outputs by 0.2 (helps), b by 0.01 with a small
    branch (skipped), c by 0.01 with a large branch (neutral), d by 0 or 0.1 (its interval
    straddles max_drift = 0.05: neutral)."""
    n = 10
    zeros = torch.zeros(n, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    drifts = {"a": torch.linspace(0.15, 0.25, n, dtype=torch.float64), "b": torch.full((n,), 0.01, dtype=torch.float64),
              "c": torch.full((n,), 0.01, dtype=torch.float64), "d": torch.tensor([0.0, 0.1] * 5, dtype=torch.float64)}
    baseline = Outcome(accuracy=None, loss=0.0, samples=n, sample_loss=zeros, sample_weight=ones)
    sets = [Outcome(accuracy=None, loss=float(v.mean()), samples=n, loss_increase_se=0.01, sample_loss=v,
                    sample_weight=ones) for v in drifts.values()]
    table = pd.DataFrame({"block": list(drifts), "position": range(4), "ratio": [0.9, 0.1, 0.9, 0.1]})
    intervals = drop_intervals(table, Evaluation(baseline, sets, task=Drift()), resamples=400, seed=3)
    assert list(intervals.columns) == interval_columns("drift")
    rows = intervals.set_index("block")
    assert rows["verdict_ci"].tolist() == ["helps", "skipped", "neutral", "neutral"]
    assert rows["skipped"].tolist() == [False, True, False, False]
    assert rows.loc["b", ["drift_low", "drift_high"]].tolist() == pytest.approx([0.01, 0.01])
    assert rows.loc["d", "drift_low"] < 0.05 < rows.loc["d", "drift_high"]
    low, high = numpy_interval(drifts["a"].numpy(), np.ones(n), [3, 0], 400)
    assert (rows.loc["a", "drift_low"], rows.loc["a", "drift_high"]) == pytest.approx((low, high), rel=1e-12)
    assert rows["drift"].tolist() == pytest.approx([float(v.mean()) for v in drifts.values()])


# --- causal language modeling ---------------------------------------------------------------------


IDS = torch.tensor([[1, 2, 3, 4, 0], [2, 2, 1, 0, 0], [4, 3, 2, 1, 0], [0, 1, 0, 1, 2],
                    [3, 3, 0, 0, 0], [1, 4, 4, 2, 3], [2, 0, 1, 0, 0], [4, 1, 3, 0, 0]])
LENGTHS = [4, 3, 4, 5, 2, 5, 3, 3]
MASK = torch.tensor([[1] * k + [0] * (5 - k) for k in LENGTHS])


def token_data() -> list[dict]:
    return [{"input_ids": IDS[i:i + 3], "attention_mask": MASK[i:i + 3]} for i in range(0, 8, 3)]


def lm_losses_by_hand(model: TwoBlockLM, skip: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(per-sequence summed next-token NLL, predicted tokens), from the weights."""
    with torch.no_grad():
        logits = two_block_lm_logits_by_hand(model, IDS, skip)
        nll = -torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(2, IDS[:, 1:, None]).squeeze(2)
        valid = (MASK[:, 1:] * MASK[:, :-1]).double()
    return (nll * valid).sum(1).numpy(), valid.sum(1).numpy()


def test_lm_intervals_match_an_independent_resampling():
    model = TwoBlockLM().eval()
    result = uncertainty(model, token_data(), task="lm", resamples=300, seed=7, progress=False)
    assert list(result.intervals.columns) == interval_columns("loss_increase")
    assert list(result.intervals.columns)[3:6] == ["loss_increase", "loss_increase_low", "loss_increase_high"]
    assert result.per_class.empty and list(result.per_class.columns) == CLASS_COLUMNS
    intact, tokens = lm_losses_by_hand(model)
    assert tokens.tolist() == [k - 1 for k in LENGTHS]
    for position, name in enumerate(["l0", "l1"]):
        deleted, _ = lm_losses_by_hand(model, {name})
        row = result.intervals.iloc[position]
        assert row["block"] == name
        assert row["loss_increase"] == pytest.approx((deleted.sum() - intact.sum()) / tokens.sum(), rel=1e-6)
        low, high = numpy_interval(deleted - intact, tokens, [7, position], 300)
        assert (row["loss_increase_low"], row["loss_increase_high"]) == pytest.approx((low, high), rel=1e-5)
        assert row["verdict_ci"] == ("helps" if low > 0 else "hurts" if high < 0 else
                                     "skipped" if row["ratio"] < 0.5 else "neutral")


def test_lm_gradient_x_activation_is_per_token():
    """Checked against autograd written out here: sum over samples of -dNLL/dF . F, divided by
    the predicted tokens."""
    model = TwoBlockLM().eval()
    scores = gradient_x_activation(model, token_data(), task="lm").set_index("block")["gradient_x_activation"]
    branches = {}
    handles = [getattr(model, name).f.register_forward_hook(
        lambda _m, _i, out, name=name: branches.__setitem__(name, out)) for name in ("l0", "l1")]
    logits = model(IDS, MASK)
    for handle in handles:
        handle.remove()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), IDS[:, 1:], reduction="none")
    valid = MASK[:, 1:] * MASK[:, :-1]
    total = (nll * valid).sum()
    grads = torch.autograd.grad(total, [branches["l0"], branches["l1"]])
    for name, grad in zip(("l0", "l1"), grads):
        expected = -(grad * branches[name]).sum().item() / valid.sum().item()
        assert scores[name] == pytest.approx(expected, rel=1e-5)
    model.zero_grad(set_to_none=True)


# --- a user's own loss ---------------------------------------------------------------------------


A = [[[0.5, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.3, 0.0]], [[0.0, -0.2], [0.0, 0.4]]]
V = [1.0, 2.0]


class Chain(nn.Module):
    """Three linear residual blocks and a linear read-out to one number per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.b0, self.b1, self.b2 = (LinearBlock(a) for a in A)
        self.out = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.out.weight.copy_(torch.tensor([V]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b2(self.b1(self.b0(x)))).squeeze(1)


def squared_error(outputs: torch.Tensor, batch) -> torch.Tensor:
    return (outputs - batch[1]).square()


G = torch.Generator().manual_seed(5)
RX = torch.randn(9, 2, generator=G, dtype=torch.float64)
RT = torch.randn(9, generator=G, dtype=torch.float64)


def regression_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(RX[:5].float(), RT[:5].float()), (RX[5:].float(), RT[5:].float())]


def chain_by_hand(skip: int | None = None) -> dict:
    """Per sample (float64): inputs h_k of each block, branches F_k, the output, and the
    products M_k = prod_{j >= k} (I + A_j) that carry h_k to the last block's output."""
    mats = [torch.tensor(a, dtype=torch.float64) for a in A]
    v = torch.tensor(V, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    hs, fs, h = [], [], RX
    for k, a in enumerate(mats):
        hs.append(h)
        fs.append(h @ a.T if k != skip else torch.zeros_like(h))
        h = h + fs[-1]
    out = h @ v
    carry = []
    for k in range(3):
        m = eye
        for a in mats[k:]:
            m = (eye + a) @ m
        carry.append(m)
    return {"h": hs, "f": fs, "out": out, "carry": carry, "v": v, "mats": mats}


def test_custom_loss_intervals_match_an_independent_resampling():
    model = Chain().eval()
    result = uncertainty(model, regression_data(), task=squared_error, resamples=250, seed=1, progress=False)
    intact = (chain_by_hand()["out"] - RT).square().numpy()
    for k in range(3):
        deleted = (chain_by_hand(skip=k)["out"] - RT).square().numpy()
        row = result.intervals.iloc[k]
        assert row["loss_increase"] == pytest.approx((deleted - intact).mean(), rel=1e-5)
        low, high = numpy_interval(deleted - intact, np.ones(9), [1, k], 250)
        assert (row["loss_increase_low"], row["loss_increase_high"]) == pytest.approx((low, high), rel=1e-5,
                                                                                      abs=1e-7)


def test_attribution_for_a_custom_loss_by_hand():
    """L = (out - t)^2. Deleting block k sets F_k = A_k h_k to 0; dL/dF_k = 2 (out - t) M_{k+1}^T v,
    so gradient x activation is the mean over samples of -2 (out - t) v . M_{k+1} F_k."""
    model = Chain().eval()
    before = snapshot(model)
    result = attribution(model, regression_data(), task=squared_error, progress=False)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    hand = chain_by_hand()
    residual = hand["out"] - RT
    eye = torch.eye(2, dtype=torch.float64)
    expected_gxa, expected_truth = [], []
    for k in range(3):
        after = hand["carry"][k + 1] if k < 2 else eye  # the blocks after block k
        expected_gxa.append(float((-2 * residual * ((hand["f"][k] @ after.T) @ hand["v"])).mean()))
        expected_truth.append(float(((chain_by_hand(skip=k)["out"] - RT).square() - residual.square()).mean()))
    assert list(result.scores.columns) == ["block", "position", "proxy", "score", "loss_increase", "bn_recalibrated"]
    assert list(result.summary.columns) == ["proxy", "spearman_loss_increase", "seconds", "bn_recalibrated"]
    gxa = result.scores[result.scores["proxy"] == "gradient_x_activation"]
    assert gxa["score"].tolist() == pytest.approx(expected_gxa, rel=1e-5)
    assert gxa["loss_increase"].tolist() == pytest.approx(expected_truth, rel=1e-5)
    rho = stats.spearmanr(expected_gxa, expected_truth).statistic
    assert result.summary.set_index("proxy").loc["gradient_x_activation", "spearman_loss_increase"] == \
        pytest.approx(rho)
    assert result.notes == {}


def test_refinement_for_a_custom_loss_by_hand():
    """dL/dh_k = 2 (out - t) M_k^T v: cos(F_k, dL/dh_k) per sample, averaged; the probes that need
    class labels are empty and say why."""
    model = Chain().eval()
    result = representation(model, regression_data(), task=squared_error, progress=False)
    hand = chain_by_hand()
    residual = hand["out"] - RT
    refinement = result.refinement.set_index("block")
    for k, name in enumerate(["b0", "b1", "b2"]):
        grad = (2 * residual)[:, None] * (hand["v"] @ hand["carry"][k])[None, :]
        cosine = F.cosine_similarity(hand["f"][k], grad, dim=1)
        ratio = hand["f"][k].norm(dim=1) / hand["h"][k].norm(dim=1)
        assert refinement.loc[name, "grad_cosine"] == pytest.approx(cosine.mean().item(), rel=1e-5, abs=1e-6)
        assert refinement.loc[name, "step_ratio"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    assert result.probes.empty and result.lens.empty and result.classes.empty
    assert set(result.notes) == {"probes", "lens", "classes"} and "no class labels" in result.notes["probes"]
    assert "loss_increase" in result.summary.columns and "accuracy_drop" not in result.summary.columns


# --- drift: attribution, representation, recalibration ------------------------------------------------


def test_attribution_for_drift_says_why_there_is_no_gradient_proxy(tiny_net):
    result = attribution(tiny_net, unlabelled(), task="drift", progress=False)
    assert result.notes == {"gradient_x_activation": NO_DRIFT_GRADIENT}
    assert list(result.summary.columns) == ["proxy", "spearman_drift", "seconds", "bn_recalibrated"]
    scores = result.scores
    assert scores.loc[scores["proxy"] == "gradient_x_activation", "score"].isna().all()
    ratio = scores[scores["proxy"] == "ratio"]
    assert ratio["drift"].tolist() == pytest.approx([drift_by_hand({"block1"}).mean(),
                                                     drift_by_hand({"block2"}).mean()], rel=1e-6)
    summary = result.summary.set_index("proxy")
    assert math.isnan(summary.loc["gradient_x_activation", "spearman_drift"])
    assert summary.loc["ratio", "spearman_drift"] == stats.spearmanr(ratio["score"], ratio["drift"]).statistic
    with pytest.raises(probe.ProbeError, match="drift has no gradient proxy"):
        gradient_x_activation(tiny_net, unlabelled(), task="drift")


def test_representation_on_drift_gives_cka_and_says_why_probes_do_not_apply(tiny_net):
    # Centred block outputs over these inputs: block1 (+-2, +-1), block2 (+-2, +-0.5), so
    # CKA = (16^2 + 2^2) / sqrt((16^2 + 4^2) (16^2 + 1^2)) (see test_analyses_representation).
    data = [torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0]]), torch.tensor([[3.0, 3.0]])]
    before = snapshot(tiny_net)
    result = representation(tiny_net, data, task="drift", progress=False)
    assert_unchanged(tiny_net, before)
    expected = 260 / math.sqrt(272 * 257)
    assert result.cka["cka"].tolist() == pytest.approx([1.0, expected, expected, 1.0])
    assert list(result.probes.columns) == PROBE_COLUMNS and result.probes.empty
    assert list(result.lens.columns) == LENS_COLUMNS and result.lens.empty
    assert list(result.classes.columns) == CLASSES_COLUMNS and result.classes.empty
    assert result.refinement.empty
    assert set(result.notes) == {"probes", "lens", "classes", "refinement"}
    assert "the task 'drift' has no class labels" in result.notes["probes"]
    assert "drift has no loss to descend" in result.notes["refinement"]
    summary = result.summary.set_index("block")
    assert "drift" in summary.columns and "accuracy_drop" not in summary.columns
    sweep = probe.sweep(tiny_net, data, task="drift", progress=False).set_index("block")
    assert summary["drift"].tolist() == pytest.approx(sweep["drift"].tolist())
    assert summary["stage"].tolist() == [1, 1]
    assert summary.loc["block1", "cka_next"] == pytest.approx(expected)
    assert summary["probe_accuracy"].isna().all() and summary["top_class"].isna().all()
    lines = story(result)
    assert lines[0] == "No linear probes, logit lens or drop per class: " + result.notes["probes"]
    assert lines[1] == "No refinement: " + result.notes["refinement"]
    assert lines[-1].startswith("Together: not a clean iterative-refinement story (the task has no loss gradient")


def test_recalibration_compares_the_drift_with_and_without_refitted_statistics():
    from probe.deletion.batchnorm import recalibrated

    model = BNNet().eval()
    data = [BN_EVAL_X[:6], BN_EVAL_X[6:]]
    before = snapshot(model)
    table = recalibration(model, data, calibration=BN_CAL, task="drift", progress=False).table
    assert_unchanged(model, before)
    assert list(table.columns) == ["block", "position", "drift", "drift_se", "samples", "mode", "bn_recalibrated"]

    def drift(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm(dim=1) / b.norm(dim=1)).mean().item()

    with torch.no_grad():
        intact = model(BN_EVAL_X)
        with probe.ablated(model, ["block"]):
            deleted = model(BN_EVAL_X)
        with recalibrated(model, BN_CAL, blocks=[]):
            refit_intact = model(BN_EVAL_X)
        with recalibrated(model, BN_CAL, blocks=["block"]):
            refit_deleted = model(BN_EVAL_X)
    assert table["bn_recalibrated"].tolist() == [False, True]
    assert table["drift"].tolist() == pytest.approx([drift(deleted, intact), drift(refit_deleted, refit_intact)],
                                                    rel=1e-5)


# --- the pipeline ------------------------------------------------------------------------------------


def test_pipeline_takes_the_task_of_the_evaluation_and_leaves_out_degradation(tiny_net, tmp_path):
    sweep, evaluation = single_block_sweep(tiny_net, unlabelled(), per_class=True, outcomes=True, task="drift",
                                           progress=False)
    table = probe.join_block_table(probe.measure(tiny_net, unlabelled(), progress=False), sweep)
    outputs = run_analyses(tiny_net, unlabelled(), table, evaluation,
                           config=RunConfig(sections=("degradation", "uncertainty"), bootstrap=50),
                           out=tmp_path, device="cpu", calibration=None, sweep_seconds=1.0, progress=False)
    assert list(outputs.results) == ["uncertainty"]
    assert "degradation" in outputs.reasons and "'drift'" in outputs.reasons["degradation"]
    intervals = outputs.results["uncertainty"].intervals
    assert intervals["drift"].tolist() == pytest.approx([drift_by_hand({"block1"}).mean(),
                                                         drift_by_hand({"block2"}).mean()], rel=1e-6)
    written = pd.read_csv(tmp_path / "drop_intervals.csv")
    assert list(written.columns) == interval_columns("drift")
    assert (tmp_path / "class_drops.csv").exists()


def test_cka_of_a_language_model_pools_only_the_real_tokens():
    """Each block's output averaged over the unmasked positions, then linear CKA in numpy:
    ||Xc^T Yc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    model = TwoBlockLM().eval()
    result = representation(model, token_data(), task="lm", progress=False)
    with torch.no_grad():
        h0 = model.embed.weight[IDS]
        h1 = model.l0(h0)
        h2 = model.l1(h1)
    mask = MASK[:, :, None].double()
    pooled = [((h * mask).sum(1) / mask.sum(1)).numpy() for h in (h1, h2)]
    centred = [x - x.mean(0) for x in pooled]

    def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
        return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    pairs = result.cka.set_index(["block_a", "block_b"])["cka"]
    assert pairs[("l0", "l1")] == pytest.approx(linear_cka(*centred), rel=1e-5)
    assert pairs[("l0", "l0")] == pytest.approx(1.0)
    # Refinement for lm differentiates the next-token NLL: it is defined at both blocks.
    assert result.refinement["grad_cosine"].notna().all() and result.refinement["samples"].tolist() == [8, 8]
