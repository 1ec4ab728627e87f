"""Blocks the user names: parse_spec, find_blocks(spec=...), Block objects passed to the API."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torchvision

import probe
from probe.discovery.spec import BlockSpec, blocks_from_spec
from tiny_models import FunctionalEnds, Untraceable, randomize, tiny_vit

VIT_LAYER = "encoder.layers.encoder_layer_0"


def meta_resnet18():
    with torch.device("meta"):
        return torchvision.models.resnet18()


# -- parsing -----------------------------------------------------------------------------------


def test_parse_text_spec():
    assert probe.parse_spec(" layer1.0=bn2; layer2.0 = bn2 , downsample ;\n<model>#1=right,left;") == [
        BlockSpec("layer1.0", "bn2"),
        BlockSpec("layer2.0", "bn2", "downsample"),
        BlockSpec("<model>", "right", "left", addition=1),
    ]


def test_parse_json_text_and_files(tmp_path):
    items = [{"module": "layer1.0", "branch": "bn2"},
             {"module": VIT_LAYER, "branch": "mlp", "shortcut": "left", "addition": 1, "name": "mlp0"}]
    expected = [BlockSpec("layer1.0", "bn2"), BlockSpec(VIT_LAYER, "mlp", "left", 1, "mlp0")]
    assert probe.parse_spec(json.dumps(items)) == expected
    (tmp_path / "blocks.json").write_text(json.dumps(items))
    assert probe.parse_spec(str(tmp_path / "blocks.json")) == expected
    (tmp_path / "blocks.txt").write_text("layer1.0=bn2\nlayer2.0=bn2,downsample\n")
    assert probe.parse_spec(str(tmp_path / "blocks.txt")) == [BlockSpec("layer1.0", "bn2"),
                                                               BlockSpec("layer2.0", "bn2", "downsample")]


@pytest.mark.parametrize("text,message", [
    ("", "empty block spec"),
    ("layer1.0", "neither a spec .* nor an existing file"),
    ("layer1.0=", "has no '=BRANCH'"),
    ("layer1.0#x=bn2", "must be a number >= 0, not 'x'"),
    ("layer1.0=bn2,downsample,extra", "at most one shortcut"),
    ('[{"module": "layer1.0", "branch": "bn2", "shortcut_module": "x"}]', r"unknown key\(s\) \['shortcut_module'\]"),
    ('[{"module": "layer1.0"}]', "'module' and 'branch' are required"),
    ('[{"module": "layer1.0", "branch": "bn2", "addition": -1}]', "'addition' must be an int >= 0"),
    ('{"module": "layer1.0"}', "expected a JSON list"),
    ('[{"module": "layer1.0", "branch": 2}]', "'branch' must be a string, not 2"),
    ('[{"module": "layer1.0", "branch": "bn2", "shortcut": ["x"]}]', "'shortcut' must be a string or null"),
    ("[not json", "not valid JSON"),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(probe.ProbeError, match=message):
        probe.parse_spec(text)


# -- resolving against a model ------------------------------------------------------------------


def test_spec_reproduces_discovery_on_resnet18():
    model = meta_resnet18()
    text = ";".join(f"layer{s}.{i}=bn2" + (",downsample" if s > 1 and i == 0 else "")
                    for s in range(1, 5) for i in range(2))
    given = probe.find_blocks(model, spec=text)
    found = probe.find_blocks(model)
    fields = lambda b: (b.name, b.module, b.branch, b.shortcut, b.position, b.strategy)  # noqa: E731
    assert [fields(b) for b in given] == [fields(b) for b in found]


def test_spec_names_two_additions_of_one_module():
    blocks = probe.find_blocks(tiny_vit(), spec=f"{VIT_LAYER}=dropout;{VIT_LAYER}#1=mlp,left")
    assert blocks == [
        probe.Block(f"{VIT_LAYER}[0]", VIT_LAYER, f"{VIT_LAYER}.dropout", None, 0),
        probe.Block(f"{VIT_LAYER}[1]", VIT_LAYER, f"{VIT_LAYER}.mlp", "left", 1, "intercept", 1, 1),
    ]


@pytest.mark.parametrize("text,message", [
    ("layer9.0=bn2", r"unknown block module 'layer9.0'\. Did you mean"),
    ("layer1.0=bn9", r"unknown module for block 'layer1.0': branch 'bn9'\. Did you mean 'bn2' or 'bn1'"),
    ("layer2.0=bn2,downsampel", r"shortcut 'downsampel'\. Did you mean 'downsample'"),
    ("layer1.0=right,bn1", "with branch 'right' the shortcut is the other operand"),
    ("layer1.0=bn2;layer1.0=bn1", None),  # two blocks in one module: named [0] and [1], fine
])
def test_spec_names_are_checked_against_the_model(text, message):
    model = meta_resnet18()
    if message is None:
        assert [b.name for b in probe.find_blocks(model, spec=text)] == ["layer1.0[0]", "layer1.0[1]"]
        return
    with pytest.raises(probe.ProbeError, match=message):
        probe.find_blocks(model, spec=text)


def test_duplicate_names_are_refused():
    with pytest.raises(probe.ProbeError, match=r"names \['a'\] more than once"):
        blocks_from_spec(meta_resnet18(), [{"module": "layer1.0", "branch": "bn2", "name": "a"},
                                           {"module": "layer1.1", "branch": "bn2", "name": "a"}])


def test_block_objects_are_validated():
    with pytest.raises(probe.ProbeError, match="needs add_index"):
        probe.Block("b", "layer1.0", "right", None, 0, strategy="intercept")
    with pytest.raises(probe.ProbeError, match="strategy 'magic'"):
        probe.Block("b", "layer1.0", "bn2", None, 0, strategy="magic")
    model = torchvision.models.resnet18(num_classes=3)
    wrong = probe.Block("b", "layer1.0", "layer1.0.bn7", None, 0)
    with pytest.raises(probe.ProbeError, match=r"unknown branch module of block 'b' 'layer1.0.bn7'"):
        with probe.ablated(model, [wrong]):
            pass


# -- measuring and ablating user-named blocks ----------------------------------------------------


def test_spec_blocks_measure_like_discovered_ones():
    model = randomize(tiny_vit(), (1, 3, 32, 32))
    data = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]))]
    given = probe.find_blocks(model, spec=f"{VIT_LAYER}=dropout;{VIT_LAYER}#1=right")
    by_spec = probe.measure(model, data, blocks=given, progress=False)
    # Discovery names the two additions by their sublayers; the spec, by their place.
    assert [b.name for b in probe.find_blocks(model)][:2] == [f"{VIT_LAYER}[self_attention]", f"{VIT_LAYER}[mlp]"]
    by_discovery = probe.measure(model, data, blocks=[b.name for b in probe.find_blocks(model)][:2], progress=False)
    assert by_spec["ratio"].tolist() == pytest.approx(by_discovery["ratio"].tolist(), rel=1e-6)
    assert by_spec["shortcut"].tolist() == ["identity", "left"]


def test_untraceable_model_works_from_a_spec_without_an_example_input():
    model = randomize(Untraceable(), (1, 12))
    x, y = torch.randn(4, 12), torch.tensor([0, 1, 2, 0])
    blocks = probe.find_blocks(model, spec="blocks.0=right;blocks.1=right")
    assert [(b.name, b.strategy) for b in blocks] == [("blocks.0", "intercept"), ("blocks.1", "intercept")]
    with torch.no_grad():
        h = model.stem(x)
        expected = model.head(model.blocks[1](h))  # blocks.0 removed: its input passes through
        with probe.ablated(model, blocks[:1]):
            assert torch.allclose(model(x), expected, atol=1e-6)
        ratio = (model.blocks[0].gamma * model.blocks[0].f(h)).norm(dim=1) / h.norm(dim=1)
    table = probe.measure(model, [(x, y)], blocks=blocks, progress=False)
    assert table.loc[0, "ratio"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    swept = probe.sweep(model, [(x, y)], blocks=blocks, progress=False)
    assert swept.loc[0, "loss"] == pytest.approx(torch.nn.functional.cross_entropy(expected, y).item(), rel=1e-5)


def test_describe_blocks_from_a_spec():
    model = FunctionalEnds()
    table = probe.describe_blocks(model, torch.randn(2, 12), spec="blocks.0=fc,left;blocks.2=right")
    assert table.to_dict("records") == [
        {"name": "blocks.0", "module": "blocks.0", "branch": "blocks.0.fc", "shortcut": "left", "output_shape": (2, 6)},
        {"name": "blocks.2", "module": "blocks.2", "branch": "right", "shortcut": "left", "output_shape": (2, 6)},
    ]


def test_analyses_take_the_blocks_they_are_given():
    """Each analysis run on two named blocks gives, for them, the rows of the run on every block
    (single deletions and the proxies are per block), and nothing about the others."""
    from analyses.attribution import attribution
    from analyses.recalibration import recalibration
    from analyses.skipping import skipping
    from analyses.uncertainty import uncertainty
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = randomize(cifar_resnet(20, num_classes=3, in_channels=1), (1, 1, 8, 8))
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 1, 8, 8, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))]
    named = probe.find_blocks(model, spec="layer1.1=bn2; layer3.0=bn2,shortcut")
    names = [b.name for b in named]

    every = recalibration(model, data, calibration=data, progress=False).table
    some = recalibration(model, data, calibration=data, blocks=named, progress=False).table
    expected = every[every["block"].isin(names)].reset_index(drop=True)
    # Positions count the blocks a spec names (0, 1), as in every table made from a spec.
    pd.testing.assert_frame_equal(some.drop(columns="position"), expected.drop(columns="position"), check_exact=True)

    scores = attribution(model, data, blocks=named, progress=False).scores
    full = attribution(model, data, progress=False).scores
    full = full[full["block"].isin(names)]
    for proxy in ("ratio", "block_influence", "gradient_x_activation"):
        assert scores.loc[scores["proxy"] == proxy, "score"].tolist() == pytest.approx(
            full.loc[full["proxy"] == proxy, "score"].tolist(), rel=1e-6)

    assert uncertainty(model, data, blocks=named, resamples=20, progress=False).intervals["block"].tolist() == names
    result = skipping(model, data, blocks=named, random_draws=1, progress=False)
    assert result.curves["k"].max() == 2 and set(result.curves["removed"]) - {""} == set(names)
    skipped = result.summary.set_index("state").loc["skipped blocks removed", "blocks_removed"]
    # A pruned copy is exported (and counts both named blocks) only where a block is skipped.
    assert result.export.empty if skipped == 0 else result.export["blocks"].iloc[0] == 2
