"""The lm analysis (analyses.lm) against hand computations on tiny random Hugging Face models.

Hidden states by hand come from `output_hidden_states=True`: HF returns the stream entering each
layer, then the last layer's output *after the final norm*; the hand computations therefore run
on a copy whose final norm is the identity (the layers' own numbers do not depend on it).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

pytest.importorskip("transformers")
from transformers import (BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)

import probe  # noqa: E402
from analyses.lm import (LMResult, best_spans, depth_finding, final_norm, greedy_deletion, layer_similarity,  # noqa: E402
                         lens_parts, lm_layers, logit_lens, residual_angles, score_agreement, single_deletions,
                         span_losses, span_summary)
from tiny_models import assert_unchanged, snapshot  # noqa: E402
from probe.discovery.layers import group_layers  # noqa: E402
from reports import figures, sections  # noqa: E402

VOCAB = 50


def llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64)).eval()
    model.config.use_cache = False
    return model


def gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.config.use_cache = False
    return model


def token_data() -> list:
    """A plain batch of token ids, and a dict batch whose second sequence is right-padded."""
    generator = torch.Generator().manual_seed(1)
    plain = torch.randint(0, VOCAB, (2, 8), generator=generator)
    ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return [plain, {"input_ids": ids, "attention_mask": mask}]


def parts(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["input_ids"], batch["attention_mask"].bool()
    return batch, torch.ones(batch.shape, dtype=torch.bool)


def without_final_norm(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    if hasattr(plain, "model"):
        plain.model.norm = nn.Identity()
    else:
        plain.transformer.ln_f = nn.Identity()
    return plain


def streams(model: nn.Module, batch) -> tuple[torch.Tensor, ...]:
    """The raw residual streams: entering each layer, then the last layer's output (no final norm)."""
    ids, mask = parts(batch)
    with torch.no_grad():
        return without_final_norm(model)(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True) \
            .hidden_states


def token_mean(pairs) -> tuple[float, float]:
    """(mean 1 - cos, mean arccos(cos) / pi) over the real tokens of (a, b, mask) triples."""
    influence = angle = tokens = 0.0
    for a, b, mask in pairs:
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1)[mask].clamp(-1, 1)
        influence += float((1 - cos).sum())
        angle += float((torch.arccos(cos) / math.pi).sum())
        tokens += int(mask.sum())
    return influence / tokens, angle / tokens


@pytest.fixture(scope="module")
def model():
    return llama()


@pytest.fixture(scope="module")
def data():
    return token_data()


@pytest.fixture(scope="module")
def blocks(model, data):
    return probe.find_blocks(model, example_input=data[0][:1])


@pytest.fixture(scope="module")
def result(model, data, blocks) -> LMResult:
    return lm_layers(model, data, blocks=blocks, resamples=200, progress=False)


def layer_sets(model, blocks):
    groups = group_layers(model, blocks)
    return list(groups), groups


# --- block influence and angles --------------------------------------------------------------------


def test_hf_last_hidden_state_is_normed_so_hand_values_use_the_raw_stream(model, data):
    ids, mask = parts(data[1])
    with torch.no_grad():
        normed = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    raw = streams(model, data[1])
    for early_normed, early_raw in zip(normed[:-1], raw[:-1]):
        assert torch.allclose(early_normed, early_raw)
    assert torch.allclose(normed[-1], model.model.norm(raw[-1]), atol=1e-6)
    assert not torch.allclose(normed[-1], raw[-1], atol=1e-3)


def test_layer_block_influence_equals_the_hand_computation(model, data, blocks, result):
    table = layer_similarity(model, data, blocks=blocks)
    layers = table[table["kind"] == "layer"].set_index("layer_index")
    hidden = [(streams(model, batch), parts(batch)[1]) for batch in data]
    for index in range(4):
        influence, angle = token_mean((h[index], h[index + 1], mask) for h, mask in hidden)
        assert layers.loc[index, "block_influence"] == pytest.approx(influence, rel=1e-5, abs=1e-7)
        assert layers.loc[index, "angular_distance"] == pytest.approx(angle, rel=1e-5, abs=1e-7)
    assert (layers["tokens"] == 16 + 8 + 5).all()  # the padded positions are left out
    pd.testing.assert_frame_equal(table, result.layers[table.columns].astype(table.dtypes), check_exact=False)


def test_sublayer_block_influence_equals_the_hand_computation(model, data, blocks):
    table = layer_similarity(model, data, blocks=blocks).set_index("unit")
    pairs = {f"model.layers.{i}[{part}]": [] for i in range(4) for part in ("self_attn", "mlp")}
    for batch in data:
        ids, mask = parts(batch)
        attention = {}
        handles = [layer.self_attn.register_forward_hook(lambda _m, _a, out, i=i: attention.__setitem__(i, out[0]))
                   for i, layer in enumerate(model.model.layers)]
        try:
            hidden = streams(model, batch)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask.long())
        finally:
            for handle in handles:
                handle.remove()
        for i in range(4):
            middle = hidden[i] + attention[i]  # the stream between the two residual additions
            pairs[f"model.layers.{i}[self_attn]"].append((hidden[i], middle, mask))
            pairs[f"model.layers.{i}[mlp]"].append((middle, hidden[i + 1], mask))
    for name, triples in pairs.items():
        influence, angle = token_mean(triples)
        assert table.loc[name, "kind"] == "sublayer"
        assert table.loc[name, "block_influence"] == pytest.approx(influence, rel=1e-4, abs=1e-7)
        assert table.loc[name, "angular_distance"] == pytest.approx(angle, rel=1e-4, abs=1e-7)
    assert table.loc["model.layers.2[mlp]", "sublayer"] == "mlp"
    assert table.loc["model.layers.2[mlp]", "layer"] == "model.layers.2"


def test_residual_angles_between_every_two_streams(model, data, blocks, result):
    angles = residual_angles(model, data, blocks=blocks)
    assert len(angles) == 4 + 3 + 2 + 1  # every (start, n) with start + n <= 4
    hidden = [(streams(model, batch), parts(batch)[1]) for batch in data]
    for _, row in angles.iterrows():
        _, expected = token_mean((h[row["start"]], h[row["start"] + row["n"]], mask) for h, mask in hidden)
        assert row["angle"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert row["end"] == row["start"] + row["n"]
    # A single layer's angle is its own angular distance.
    single = angles[angles["n"] == 1].set_index("start")["angle"]
    own = result.layers[result.layers["kind"] == "layer"].set_index("layer_index")["angular_distance"]
    np.testing.assert_allclose(single.sort_index().to_numpy(), own.sort_index().to_numpy(), rtol=1e-9)


# --- deletions ------------------------------------------------------------------------------------


def test_span_losses_are_evaluate_ablations_and_the_best_is_the_minimum(model, data, blocks, result):
    names, groups = layer_sets(model, blocks)
    spans = span_losses(model, data, blocks=blocks, spans=[1, 2, 3])
    sets = [[b for name in names[s:s + n] for b in groups[name]] for n, s in zip(spans["n"], spans["start"])]
    evaluation = probe.evaluate_ablations(model, data, sets, task="lm", progress=False)
    np.testing.assert_allclose(spans["loss"].to_numpy(), [o.loss for o in evaluation.sets], rtol=1e-9)
    np.testing.assert_allclose(spans["loss_increase"].to_numpy(),
                               [o.loss - evaluation.baseline.loss for o in evaluation.sets], rtol=1e-7, atol=1e-12)
    for n, group in spans.groupby("n"):
        assert group.loc[group["by_loss"], "loss"].item() == group["loss"].min()
        assert group.loc[group["by_angle"], "angle"].item() == group["angle"].min()
        assert group["by_loss"].sum() == group["by_angle"].sum() == 1
    summary = span_summary(spans)
    pd.testing.assert_frame_equal(summary, result.spans)
    for _, row in summary.iterrows():
        group = spans[spans["n"] == row["n"]].set_index("start")
        assert row["loss_by_loss"] == group["loss"].min()
        assert row["loss_by_angle"] == group.loc[row["start_by_angle"], "loss"]
        assert row["angle"] == group["angle"].min()
        assert row["baseline_loss"] == pytest.approx(evaluation.baseline.loss, rel=1e-12)
        assert row["same_span"] == (row["start_by_angle"] == row["start_by_loss"])
    pd.testing.assert_frame_equal(best_spans(model, data, blocks=blocks, spans=[2]),
                                  summary[summary["n"] == 2].reset_index(drop=True))


def test_greedy_steps_are_the_best_deletions_given_the_ones_before(model, data, blocks, result):
    names, groups = layer_sets(model, blocks)
    single = probe.evaluate_ablations(model, data, [groups[n] for n in names], task="lm", progress=False)
    greedy = result.greedy[result.greedy["order"] == "greedy"].set_index("k")
    first = int(np.argmin([o.loss for o in single.sets]))
    assert greedy.loc[1, "removed"] == names[first]
    assert greedy.loc[1, "loss"] == pytest.approx(single.sets[first].loss, rel=1e-12)
    rest = [n for n in names if n != names[first]]
    pairs = probe.evaluate_ablations(model, data, [groups[names[first]] + groups[n] for n in rest], task="lm",
                                     progress=False)
    second = int(np.argmin([o.loss for o in pairs.sets]))
    assert greedy.loc[2, "removed"] == rest[second]
    assert greedy.loc[2, "layers"] == f"{names[first]} {rest[second]}"
    assert greedy.loc[2, "loss"] == pytest.approx(pairs.sets[second].loss, rel=1e-12)
    assert greedy.loc[2, "perplexity"] == pytest.approx(math.exp(pairs.sets[second].loss), rel=1e-12)
    assert greedy.loc[0, "loss"] == pytest.approx(single.baseline.loss, rel=1e-12)
    assert list(greedy.index) == [0, 1, 2]  # default: half of the 4 layers
    # The one-shot orders: ranked once, cheapest first.
    layers = result.layers[result.layers["kind"] == "layer"]
    by_loss = layers.sort_values("loss_increase")["unit"].tolist()
    by_influence = layers.sort_values("block_influence")["unit"].tolist()
    for order, ranked in (("single_loss", by_loss), ("block_influence", by_influence)):
        rows = result.greedy[result.greedy["order"] == order].set_index("k")
        assert rows.loc[2, "layers"] == " ".join(ranked[:2])
        two = probe.evaluate_ablations(model, data, [groups[ranked[0]] + groups[ranked[1]]], task="lm",
                                       progress=False)
        assert rows.loc[2, "loss"] == pytest.approx(two.sets[0].loss, rel=1e-12)
    again = greedy_deletion(model, data, blocks=blocks, greedy_steps=1)
    assert again[again["order"] == "greedy"].set_index("k").loc[1, "removed"] == names[first]


def test_single_deletions_and_a_per_block_table_agree(model, data, blocks, result):
    table = probe.block_table(model, data, blocks=blocks, task="lm", progress=False)
    costs = single_deletions(model, data, blocks=blocks).set_index("unit")
    reused = single_deletions(model, data, table=table, blocks=blocks).set_index("unit")
    for name in table["block"]:
        expected = table.set_index("block").loc[name]
        assert costs.loc[name, "loss_increase"] == pytest.approx(expected["loss_increase"], rel=1e-9, abs=1e-12)
        assert reused.loc[name, "loss_increase"] == expected["loss_increase"]
    with_table = lm_layers(model, data, table=table, blocks=blocks, resamples=50, progress=False)
    sub = with_table.layers[with_table.layers["kind"] == "sublayer"].set_index("unit")
    pd.testing.assert_series_equal(sub["ratio"], table.set_index("block")["ratio"].reindex(sub.index),
                                   check_names=False)
    layer_rows = with_table.layers["kind"] == "layer"
    pd.testing.assert_frame_equal(with_table.layers[layer_rows].drop(columns="ratio"),
                                  result.layers[layer_rows].drop(columns="ratio"))
    assert ("sublayer", "ratio") in set(zip(with_table.agreement["kind"], with_table.agreement["score"]))
    assert "ratio" not in set(result.agreement["score"])  # no table, no ratio


# --- cheap scores ---------------------------------------------------------------------------------


def test_spearman_and_its_bootstrap_equal_scipy():
    rng = np.random.default_rng(5)
    layers = pd.DataFrame({"kind": "layer", "unit": [f"l{i}" for i in range(7)],
                           "block_influence": rng.random(7), "angular_distance": [0.1, 0.2, 0.2, 0.4, 0.3, 0.6, 0.9],
                           "loss_increase": rng.random(7), "ratio": float("nan")})
    table = score_agreement(layers, resamples=300, level=0.9, seed=3).set_index("score")
    assert list(table.index) == ["block_influence", "angular_distance"]  # ratio is all NaN: no row
    index = np.random.default_rng(3).integers(0, 7, (300, 7))
    for score in table.index:
        x, y = layers[score].to_numpy(), layers["loss_increase"].to_numpy()
        assert table.loc[score, "spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
        boot = []
        for rows in index:
            if len(set(x[rows])) > 1 and len(set(y[rows])) > 1:
                boot.append(stats.spearmanr(x[rows], y[rows]).statistic)
        low, high = np.percentile(boot, [5, 95])
        assert table.loc[score, "low"] == pytest.approx(low, rel=1e-9)
        assert table.loc[score, "high"] == pytest.approx(high, rel=1e-9)
    assert (table["units"] == 7).all() and (table["resamples"] == 300).all() and (table["level"] == 0.9).all()


def test_agreement_of_the_run_is_scipys_spearman(result):
    for _, row in result.agreement.iterrows():
        units = result.layers[result.layers["kind"] == row["kind"]]
        expected = stats.spearmanr(units[row["score"]], units["loss_increase"]).statistic
        assert row["spearman"] == pytest.approx(expected, rel=1e-12)
        assert row["low"] <= row["spearman"] + 1e-12 or math.isnan(row["low"])
    assert set(zip(result.agreement["kind"], result.agreement["score"])) == {
        (kind, score) for kind in ("layer", "sublayer") for score in ("block_influence", "angular_distance")}


# --- logit lens -----------------------------------------------------------------------------------


def hand_lens(model: nn.Module, data: list, norm: nn.Module, unembed: nn.Module) -> list[tuple[float, float]]:
    """(loss, agreement) of the lens on every raw stream, written out with cross-entropy."""
    totals = None
    for batch in data:
        ids, mask = parts(batch)
        hidden = streams(model, batch)
        with torch.no_grad():
            final = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].argmax(-1)
            valid = mask[:, 1:] & mask[:, :-1]
            rows = []
            for h in hidden:
                logits = unembed(norm(h))[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                rows.append((float(nll[valid].double().sum()), float(((logits.argmax(-1) == final) & valid).sum()),
                             int(valid.sum())))
        totals = rows if totals is None else [tuple(a + b for a, b in zip(t, r)) for t, r in zip(totals, rows)]
    return [(loss / units, agree / units) for loss, agree, units in totals]


def test_logit_lens_by_hand_and_its_last_layer_is_the_model(model, data, blocks, result):
    lens = logit_lens(model, data, blocks=blocks)
    pd.testing.assert_frame_equal(lens, result.lens)
    assert list(lens["stream"]) == ["embeddings", *(f"model.layers.{i}" for i in range(4))]
    assert list(lens["layer_index"]) == [-1, 0, 1, 2, 3]
    for (loss, agreement), (_, row) in zip(hand_lens(model, data, model.model.norm, model.lm_head), lens.iterrows()):
        assert row["loss"] == pytest.approx(loss, rel=1e-5)
        assert row["agreement"] == pytest.approx(agreement, rel=1e-9)
    baseline = probe.evaluate_ablations(model, data, [], task="lm", progress=False).baseline
    last = lens.iloc[-1]
    assert last["agreement"] == 1.0
    assert last["loss"] == pytest.approx(baseline.loss, rel=1e-6)
    assert last["token_accuracy"] == pytest.approx(baseline.accuracy, rel=1e-9)
    assert last["tokens"] == baseline.units == 7 + 7 + 7 + 4  # the padded sequence predicts 4
    assert "lens" not in result.notes and "lens_head" not in result.notes


def test_the_lens_finds_gpt2s_ln_f_and_refuses_bert():
    model = gpt2()
    assert final_norm(model, [f"transformer.h.{i}" for i in range(3)])[0] == "transformer.ln_f"
    assert final_norm(llama(), [f"model.layers.{i}" for i in range(4)])[0] == "model.norm"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    names = ["encoder.layer.0", "encoder.layer.1"]
    with pytest.raises(probe.ProbeError, match="get_output_embeddings.*lens does not apply"):
        lens_parts(BertModel(config), names)
    with pytest.raises(probe.ProbeError, match="no normalization module after it.*does not apply.*BERT"):
        lens_parts(BertForMaskedLM(config), ["bert." + name for name in names])


# --- GPT-2 ----------------------------------------------------------------------------------------


def test_gpt2_attention_is_measured_at_a_tensor_output():
    # HF's GPT-2 attention returns (output, weights): a hook there sees a tuple. Discovery hooks
    # the module inside it that returns the tensor, and deleting it gives the same numbers as
    # catching the addition itself.
    model, data = gpt2(), token_data()
    found = probe.find_blocks(model, example_input=data[0][:1])
    attention = found[0]
    assert attention.name == "transformer.h.0[attn]"
    outputs = {}
    handle = model.get_submodule(attention.branch).register_forward_hook(lambda _m, _a, out: outputs.update(out=out))
    with torch.no_grad():
        model(data[0])
    handle.remove()
    assert isinstance(outputs["out"], torch.Tensor)
    caught = [dataclasses.replace(block, strategy="intercept") for block in found]
    swept = probe.sweep(model, data, blocks=found, task="lm", progress=False)
    expected = probe.sweep(model, data, blocks=caught, task="lm", progress=False)
    np.testing.assert_allclose(swept["loss"], expected["loss"], rtol=1e-9)
    np.testing.assert_allclose(probe.measure(model, data, blocks=found)["ratio"],
                               probe.measure(model, data, blocks=caught)["ratio"], rtol=1e-6)


def test_gpt2_layers_and_lens_by_hand():
    model, data = gpt2(), token_data()
    result = lm_layers(model, data, spans=[1], greedy_steps=1, resamples=20, progress=False)
    layers = result.layers[result.layers["kind"] == "layer"].set_index("layer_index")
    hidden = [(streams(model, batch), parts(batch)[1]) for batch in data]
    for index in range(3):
        influence, _ = token_mean((h[index], h[index + 1], mask) for h, mask in hidden)
        assert layers.loc[index, "block_influence"] == pytest.approx(influence, rel=1e-5, abs=1e-7)
    assert set(result.layers["sublayer"]) == {"", "attn", "mlp"}
    baseline = probe.evaluate_ablations(model, data, [], task="lm", progress=False).baseline
    assert result.lens.iloc[-1]["agreement"] == 1.0
    assert result.lens.iloc[-1]["loss"] == pytest.approx(baseline.loss, rel=1e-6)


# --- the finding, checks, the run as a whole -------------------------------------------------------


def finding_table(influence, cost) -> pd.DataFrame:
    return pd.DataFrame({"kind": "layer", "layer_index": range(len(influence)), "block_influence": influence,
                         "loss_increase": cost})


def test_depth_finding_says_whether_it_holds_with_the_numbers():
    # 7 layers: the first 2 against layers 4-5 (the two before the last).
    holds = depth_finding(finding_table([0.5, 0.3, 0.2, 0.2, 0.05, 0.15, 0.9], [2.0, 1.0, 0.5, 0.4, 0.1, 0.3, 3.0]))
    assert "finding holds" in holds
    assert "layers 4\u20135" in holds and "layers 0\u20131" in holds
    assert "mean 0.1000 against 0.4000" in holds and "+0.2000 against +1.5000" in holds
    fails = depth_finding(finding_table([0.5, 0.3, 0.2, 0.2, 0.05, 0.15, 0.9], [0.1, 0.1, 0.5, 0.4, 0.3, 0.3, 3.0]))
    assert "does not hold" in fails and "lower block influence" in fails and "no less to delete" in fails
    assert "cannot be tested on 2 layer(s)" in depth_finding(finding_table([0.1, 0.2], [0.1, 0.2]))


def test_the_run_states_the_finding_of_its_own_numbers(result):
    assert result.finding == depth_finding(result.layers)
    layers = result.layers[result.layers["kind"] == "layer"]
    late = layers[layers["layer_index"] == 2]
    assert f"{late['block_influence'].item():.4f}" in result.finding  # 4 layers: layer 0 against layer 2


def test_bad_spans_and_steps_are_refused_before_any_work(model, data, blocks):
    with pytest.raises(probe.ProbeError, match=r"span lengths \[0, 5\] are not between 1 and the number of layers"):
        lm_layers(model, data, blocks=blocks, spans=[0, 2, 5], progress=False)
    with pytest.raises(probe.ProbeError, match="greedy steps must be between 1 and the number of layers \\(4\\)"):
        lm_layers(model, data, blocks=blocks, greedy_steps=5, progress=False)
    table = probe.block_table(model, data, blocks=blocks, task="drift", progress=False)
    with pytest.raises(probe.ProbeError, match="per-block table of the lm task"):
        lm_layers(model, data, table=table, blocks=blocks, progress=False)


def test_the_model_is_left_as_it_was_and_blocks_are_found_from_the_data(data):
    model = llama(layers=3)
    before = snapshot(model)
    found = lm_layers(model, data, spans=[2], greedy_steps=1, resamples=10, progress=False)
    assert_unchanged(model, before)
    assert list(found.layers["unit"][:3]) == ["model.layers.0", "model.layers.0[self_attn]", "model.layers.0[mlp]"]
    assert list(found.spans["n"]) == [2]
    assert len(found.span_losses) == 2
    assert set(found.tables()) == {"lm_layers", "lm_spans", "lm_span_losses", "lm_greedy", "lm_agreement",
                                   "lm_logit_lens"}


# --- report ---------------------------------------------------------------------------------------


def test_figures_draw_the_tables(result):
    ax = figures.layer_similarity_plot(result.layers)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["whole layer", "sublayer self_attn", "sublayer mlp"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(),
                               result.layers[result.layers["kind"] == "layer"]["block_influence"])
    ax = figures.greedy_curves(result.greedy)
    assert len(ax.get_lines()) == 3
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(),
                               result.greedy[result.greedy["order"] == "greedy"]["perplexity"])
    ax = figures.span_plot(result.spans)
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), result.spans["loss_by_loss"])
    ax = figures.logit_lens_plot(result.lens)
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["emb", "0"]
    ax = figures.agreement_intervals(result.agreement)
    assert len(ax.get_yticklabels()) == len(result.agreement)
    import matplotlib.pyplot as plt
    plt.close("all")


def test_lm_section_states_the_finding_and_why_the_lens_is_missing(result):
    section = sections.lm_section(result)
    assert section.id == "lm" and section.title == sections.TITLES["lm"]
    assert result.finding in section.lead
    assert len(section.figures) == 5 and all(f.src.startswith("data:image/png;base64,") for f in section.figures)
    greedy_rows = result.greedy[(result.greedy["order"] == "greedy") & (result.greedy["k"] > 0)]
    assert [row[1]["text"] for row in section.tables[-1].rows] == list(greedy_rows["removed"])
    without = dataclasses.replace(result, lens=result.lens.iloc[:0], notes={"lens": "the lens does not apply here."})
    section = sections.lm_section(without)
    assert len(section.figures) == 4
    assert section.notes == ["The lens does not apply here."]
    assert sections.not_run_section("lm", "the task is not lm.").title == sections.TITLES["lm"]


# --- the command ----------------------------------------------------------------------------------


@pytest.mark.slow  # a whole run of the command
def test_command_writes_the_tables_of_your_own_lm(tmp_path, capsys):
    from torch.utils.data import DataLoader

    from analyses.lm.__main__ import main
    from tiny_models import SEQUENCES, StackedLM, TokenWindows

    out = tmp_path / "lm"
    code = main(["--model", "tiny_models:stacked_lm", "--dataset", "tiny_models:token_windows", "--task", "lm",
                 "--batch-size", "2", "--resamples", "50", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "finding does not hold" in printed or "finding holds" in printed
    assert "lens: the logit lens needs the model's unembedding" in printed  # StackedLM has no LM head
    written = pd.read_csv(out / "lm_layers.csv")
    layers = written[written["kind"] == "layer"]
    assert list(layers["unit"]) == ["layers.0", "layers.1", "layers.2"]
    model = StackedLM().eval()
    data = DataLoader(TokenWindows(SEQUENCES), batch_size=2)
    groups = group_layers(model, probe.find_blocks(model))
    evaluation = probe.evaluate_ablations(model, data, list(groups.values()), task="lm", progress=False)
    np.testing.assert_allclose(layers["loss"], [o.loss for o in evaluation.sets], rtol=1e-6)
    assert len(pd.read_csv(out / "lm_logit_lens.csv")) == 0
    assert (out / "lm_greedy.png").stat().st_size > 0 and not (out / "lm_logit_lens.png").exists()
    assert main(["--task", "classification", "--out", str(tmp_path / "no"), "--no-progress"]) == 2
    assert "analyses causal language models" in capsys.readouterr().err
