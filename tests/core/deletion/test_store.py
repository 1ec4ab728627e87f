"""The job's outcome store (probe.deletion.store): an outcome kept is the one a new pass would give,
to the last bit, and a job evaluates no set of blocks twice."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import probe
import probe.deletion.store as store_module
from probe import ablate, job
from probe.deletion.evaluation import evaluate_ablations
from probe.deletion.store import OutcomeStore
from probe.discovery.layers import group_layers
from probe.loading.checkpoints import save_checkpoint
from probe.loading.models import cifar_resnet


def numbers(outcome) -> tuple:
    """Every number of an outcome, NaN made comparable."""
    def same(value):
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    return (same(outcome.accuracy), same(outcome.loss), outcome.samples, same(outcome.flip_rate),
            same(outcome.loss_increase_se), outcome.units, outcome.class_accuracy and [same(v) for v in
                                                                                       outcome.class_accuracy],
            outcome.nonfinite)


def resnet_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = cifar_resnet(20, num_classes=3, in_channels=1).eval()
    with torch.no_grad():  # BatchNorm statistics away from their defaults
        model.train()
        model(torch.randn(32, 1, 8, 8))
        model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    calibration = [(torch.randn(5, 1, 8, 8, generator=g), torch.zeros(5, dtype=torch.long))]
    return model, data, calibration


@pytest.mark.parametrize("recalibrated", [False, True])
def test_a_sets_outcome_does_not_depend_on_the_other_sets_of_its_pass(recalibrated):
    """The engine's rows are independent: each set alone gives, bit for bit, what it gives among
    others, also where it runs on from the set before it (nested sets, as on a deletion curve)."""
    model, data, calibration = resnet_and_data()
    blocks = probe.find_blocks(model)
    b = blocks
    sets = [[b[0]], [b[0], b[4]], [b[0], b[4], b[7]], [b[5]], [b[2], b[6]], list(b), [b[3]], [b[3], b[1]]]
    calibration = calibration if recalibrated else None
    together = evaluate_ablations(model, data, sets, calibration=calibration, per_class=True, progress=False)
    for ablation_set, outcome in zip(sets, together.sets):
        alone = evaluate_ablations(model, data, [ablation_set], calibration=calibration, per_class=True,
                                   progress=False)
        assert numbers(alone.sets[0]) == numbers(outcome)
        assert numbers(alone.baseline) == numbers(together.baseline)


def tiny_llama(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 50, (3, 10), generator=g) for _ in range(2)]
    return model, data


def test_replayed_layers_give_the_same_outcomes_alone_and_together():
    model, data = tiny_llama()
    blocks = probe.find_blocks(model, example_input=data[0][:1])
    layers = list(group_layers(model, blocks).values())
    sets = [layers[1], layers[1] + layers[3], layers[0] + layers[1] + layers[3], layers[2], layers[0] + layers[2]]
    together = evaluate_ablations(model, data, sets, task="lm", progress=False)
    for ablation_set, outcome in zip(sets, together.sets):
        alone = evaluate_ablations(model, data, [ablation_set], task="lm", progress=False)
        assert numbers(alone.sets[0]) == numbers(outcome)


class Counting:
    """The engine, counting every set it evaluates, by what fixes its numbers."""

    def __init__(self) -> None:
        self.evaluated: list[tuple] = []

    def __call__(self, model, data, sets, **options):
        recalibrated = options.get("calibration") is not None
        self.evaluated += [(recalibrated, frozenset(b.name if hasattr(b, "name") else b for b in s)) for s in sets]
        return evaluate_ablations(model, data, sets, **options)


def test_the_store_evaluates_each_set_once_and_answers_as_the_engine():
    model, data, _ = resnet_and_data()
    b = probe.find_blocks(model)
    engine = Counting()
    store = OutcomeStore(b)
    first = store.evaluate(model, data, [[b[0]], [b[1]], [b[0]]], progress=False, engine=engine)
    second = store.evaluate(model, data, [[b[1]], [b[1], b[2]], [], [b[0]]], progress=False, engine=engine)
    assert engine.evaluated == [(False, frozenset({b[0].name})), (False, frozenset({b[1].name})),
                                (False, frozenset({b[1].name, b[2].name}))]
    direct = evaluate_ablations(model, data, [[b[1]], [b[1], b[2]], [], [b[0]]], progress=False)
    assert [numbers(o) for o in second.sets] == [numbers(o) for o in direct.sets]  # the empty set too
    assert numbers(first.sets[2]) == numbers(direct.sets[3])
    assert store.counts["other"].asked == 7 and store.counts["other"].evaluated == 3
    # Other data, another mode: other numbers, evaluated anew.
    store.evaluate(model, data[:1], [[b[0]]], progress=False, engine=engine)
    store.evaluate(model, data, [[b[0]]], mode="mean", progress=False, engine=engine)
    assert len(engine.evaluated) == 5


@pytest.mark.slow  # a whole run of the command
def test_a_job_evaluates_no_set_twice(tmp_path, monkeypatch):
    """A random ResNet-20 (at chance: no block skipped) with BatchNorm recalibration: the sweep,
    the skipping analysis and the recalibration analysis ask for many of the same sets."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet20.pt"
    save_checkpoint(cifar_resnet(20, num_classes=10, in_channels=1), checkpoint)
    engine = Counting()
    monkeypatch.setattr(store_module, "evaluate_ablations", engine)
    swept = []

    def sweep(model, data, sets, **options):
        swept.extend((options.get("calibration") is not None, frozenset(b.name for b in s)) for s in sets)
        return evaluate_ablations(model, data, sets, **options)

    monkeypatch.setattr(job, "evaluate_ablations", sweep)
    out = tmp_path / "run"
    assert ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "24", "--batch-size", "8",
                        "--bn-recalibrate", "--calibration-samples", "16", "--sections", "skipping", "recalibration",
                        "--random-draws", "2", "--out", str(out), "--no-progress"]) == 0
    every = swept + engine.evaluated
    assert len(every) == len(set(every)), "a set was evaluated twice"
    assert len(swept) == 9 and all(recalibrated for recalibrated, _ in swept)
    counts = json.loads((out / "run.json").read_text())["evaluations"]
    assert counts["sweep"]["evaluated"] == 9
    assert counts["skipping"]["evaluated"] + counts["recalibration"]["evaluated"] == len(engine.evaluated)
    # Skipping: the empty skipped set, and 3 orders x 9 points; the single and full deletions are the sweep's.
    assert counts["skipping"]["asked"] == 1 + 4 * 9
    # Recalibration: the refitted single deletions are the sweep's; only the plain ones are new.
    assert counts["recalibration"] == {"asked": 18, "evaluated": 9,
                                       "forward_equivalents": counts["recalibration"]["forward_equivalents"]}
    # Nothing skipped: no pruned model saved or timed.
    assert pd.read_csv(out / "pruned_export.csv").empty and not (out / "pruned_model.pt").exists()


def test_lm_spans_and_greedy_steps_equal_the_naive_computation():
    """Spans and greedy steps run on from the replay cache (the greedy candidates from the network
    of the layers already removed): the losses of whole forwards, the same greedy choices."""
    from analyses.lm import lm_layers

    model, data = tiny_llama(5)
    blocks = probe.find_blocks(model, example_input=data[0][:1])
    layers = group_layers(model, blocks)
    names = list(layers)

    def naive(chosen: list[str]) -> float:
        ablation = [block for name in chosen for block in layers[name]]
        return evaluate_ablations(model, data, [ablation], task="lm", fast=False, progress=False).sets[0].loss

    result = lm_layers(model, data, spans=[1, 2, 3], greedy_steps=3, resamples=10, progress=False)
    for row in result.span_losses.itertuples():
        assert row.loss == naive(names[row.start:row.start + row.n])  # to the bit
    removed: list[str] = []
    greedy = result.greedy[result.greedy["order"] == "greedy"].set_index("k")
    for k in range(1, 4):
        losses = {name: naive([*removed, name]) for name in names if name not in removed}
        best = min(losses, key=lambda name: (losses[name], names.index(name)))
        removed.append(best)
        assert greedy.loc[k, "removed"] == best
        assert greedy.loc[k, "loss"] == losses[best]


@pytest.mark.slow  # a whole run of the command
def test_a_language_model_job_evaluates_no_set_twice(tmp_path, monkeypatch):
    """The sweep's single blocks, the skipping curves, the lm analysis's layers, spans (those of
    length 1 are the single layers), greedy steps (the first is the single layers again) and one-shot
    orders: each set once."""
    pytest.importorskip("transformers")
    engine = Counting()
    monkeypatch.setattr(store_module, "evaluate_ablations", engine)
    swept = []

    def sweep(model, data, sets, **options):
        swept.extend((False, frozenset(b.name for b in s)) for s in sets)
        return evaluate_ablations(model, data, sets, **options)

    monkeypatch.setattr(job, "evaluate_ablations", sweep)
    out = tmp_path / "run"
    assert ablate.main(["--model", "tiny_models:tiny_llama", "--dataset", "tiny_models:token_windows", "--task", "lm",
                        "--sections", "skipping", "lm", "--spans", "1", "2", "--greedy-steps", "2",
                        "--random-draws", "2", "--out", str(out), "--no-progress"]) == 0
    every = swept + engine.evaluated
    assert len(every) == len(set(every)), "a set was evaluated twice"
    counts = json.loads((out / "run.json").read_text())["evaluations"]
    assert counts["sweep"]["evaluated"] == 6
    # lm: 3 single layers, 2 spans of 2, greedy step 2 (2 candidates), the one-shot orders' second points.
    assert counts["lm"]["asked"] > counts["lm"]["evaluated"]
    assert counts["skipping"]["asked"] > counts["skipping"]["evaluated"]
    greedy = pd.read_csv(out / "lm_greedy.csv")
    layers = pd.read_csv(out / "lm_layers.csv")
    first = greedy[(greedy["order"] == "greedy") & (greedy["k"] == 1)]["loss"].iloc[0]
    assert first == layers[layers["kind"] == "layer"]["loss"].min()
