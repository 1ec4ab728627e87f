"""Hugging Face models, built tiny and random from their configs (no download): discovery finds
exactly two blocks per layer; deleting a whole layer's blocks costs what a model without that
layer costs; the fast sweep equals the naive one; `prune_layers` / `export_pruned_lm` give a
shorter model that generates with its key-value cache, and leave the original untouched."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import probe
from probe.errors import ProbeError
from probe.discovery.layers import group_layers
from probe.deletion.surgery import export_pruned_lm, load_pruned_lm, prune_layers
from tiny_models import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")

LAYERS, VOCAB, LENGTH = 4, 50, 8
# No special tokens: greedy generation never stops early. Weights drawn wider than the default
# (0.02), so that every layer changes which tokens greedy decoding picks.
SPECIAL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "initializer_range": 0.3}


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                      max_position_embeddings=64, **SPECIAL)
    return _ready(transformers.LlamaForCausalLM(config))


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_head=2, n_layer=LAYERS, n_inner=32, vocab_size=VOCAB,
                                     n_positions=64, **SPECIAL)
    return _ready(transformers.GPT2LMHeadModel(config))


def bert(cls_name: str = "BertForMaskedLM") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=64,
                                     pad_token_id=0)
    return _ready(getattr(transformers, cls_name)(config))


def _ready(model: torch.nn.Module) -> torch.nn.Module:
    model.config.use_cache = False
    return model.eval()


DECODERS = {"llama": (llama, "model.layers", ("self_attn", "mlp")),
            "gpt2": (gpt2, "transformer.h", ("attn", "mlp"))}


def token_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def padded_batches() -> list[dict]:
    """Two dict batches: right padding of several lengths, and one row padded on the left."""
    ids = token_ids(3, seed=2)
    right = torch.tensor([[1] * LENGTH, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
    left = torch.tensor([[1] * LENGTH, [0] * 3 + [1] * 5, [1] * LENGTH])
    return [{"input_ids": ids, "attention_mask": right}, {"input_ids": token_ids(3, seed=3), "attention_mask": left}]


def without_layers(model: torch.nn.Module, stack: str, deleted: set[int]) -> torch.nn.Module:
    """By hand: a copy with those elements deleted from the ModuleList and layer_idx renumbered."""
    smaller = copy.deepcopy(model)
    layers = smaller.get_submodule(stack)
    for index in sorted(deleted, reverse=True):
        del layers[index]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    smaller.config.num_hidden_layers = len(layers)
    return smaller


def layer_indices(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.layer_idx for name, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)}


def lm_loss_by_hand(model: torch.nn.Module, batches: list) -> float:
    """Mean next-token NLL over the positions whose token and next token are both unmasked."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            mask = batch["attention_mask"].bool() if isinstance(batch, dict) else torch.ones_like(ids, dtype=torch.bool)
            logits = model(**batch).logits if isinstance(batch, dict) else model(ids).logits
            nll = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
            valid = mask[:, 1:] & mask[:, :-1]
            total += float(nll[valid].sum())
            tokens += int(valid.sum())
    return total / tokens


def greedy_by_hand(model: torch.nn.Module, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence again at every step."""
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


# --- discovery ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoders_have_two_blocks_per_layer(family):
    build, stack, parts = DECODERS[family]
    model = build()
    blocks = probe.find_blocks(model, example_input=token_ids())
    assert [b.name for b in blocks] == [f"{stack}.{i}[{part}]" for i in range(LAYERS) for part in parts]
    assert len(blocks) == 2 * LAYERS  # no rotary embedding, mask or attention-score addition
    assert list(group_layers(model, blocks)) == [f"{stack}.{i}" for i in range(LAYERS)]


@pytest.mark.parametrize("cls_name,prefix", [("BertModel", ""), ("BertForMaskedLM", "bert.")])
def test_post_layernorm_bert_has_two_blocks_per_layer(cls_name, prefix):
    model = bert(cls_name)
    blocks = probe.find_blocks(model, example_input=token_ids())
    assert [b.name for b in blocks] == [f"{prefix}encoder.layer.{i}.{part}" for i in range(LAYERS)
                                        for part in ("attention.output", "output")]
    assert len(blocks) == 2 * LAYERS


# --- deleting a layer: ablation = a model without it ------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["tensors", "padded-dicts"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_ablating_a_layers_blocks_costs_what_deleting_the_layer_costs(family, padded):
    build, stack, _ = DECODERS[family]
    model = build()
    data = padded_batches() if padded else [token_ids(3, seed=4), token_ids(3, seed=5)]
    layers = group_layers(model, probe.find_blocks(model, example_input=token_ids()))
    sets = [layers[f"{stack}.1"], layers[f"{stack}.3"], layers[f"{stack}.0"] + layers[f"{stack}.2"]]
    before = snapshot(model)
    baseline, outcomes = probe.evaluate_ablations(model, data, sets, task="lm", progress=False)
    assert_unchanged(model, before)
    assert baseline.loss == pytest.approx(lm_loss_by_hand(model, data), rel=1e-5)
    for deleted, outcome in zip([{1}, {3}, {0, 2}], outcomes):
        by_hand = without_layers(model, stack, deleted)
        assert outcome.loss == pytest.approx(lm_loss_by_hand(by_hand, data), rel=1e-5), deleted
        pruned = prune_layers(model, [f"{stack}.{i}" for i in deleted])
        assert lm_loss_by_hand(pruned, data) == pytest.approx(outcome.loss, rel=1e-5)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_fast_sweep_equals_naive_sweep(family):
    model = DECODERS[family][0]()
    data = padded_batches()
    blocks = probe.find_blocks(model, example_input=token_ids())
    fast = probe.sweep(model, data, task="lm", blocks=blocks, progress=False)
    naive = probe.sweep(model, data, task="lm", blocks=blocks, fast=False, progress=False)
    assert list(fast["block"]) == [b.name for b in blocks]
    pd.testing.assert_frame_equal(fast, naive, rtol=1e-5)
    assert fast.attrs["baseline"] == pytest.approx(naive.attrs["baseline"], rel=1e-5)


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_fast_sweep_replays_the_layers_before_a_deletion(family):
    """torch.fx cannot trace these models: the fast sweep answers the layers before each deleted
    block from the baseline pass (`probe.deletion.fast_replay`), so layer 0 computes only in the baseline and
    when its own blocks are deleted; the last layer, for every deletion."""
    model = DECODERS[family][0]()
    blocks = probe.find_blocks(model, example_input=token_ids())
    layers = list(group_layers(model, blocks))
    first, last = (model.get_submodule(name) for name in (layers[0], layers[-1]))
    calls = {"first": 0, "last": 0}
    with probe.instrument.hooks.attached() as handles:
        # Hooks on a child: they see only real computation (a replayed layer runs none of its children).
        for key, layer in (("first", first), ("last", last)):
            child = next(iter(layer.children()))
            handles.append(child.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)))
        probe.sweep(model, [token_ids()], task="lm", blocks=blocks, progress=False)
    assert calls == {"first": 1 + 2, "last": 1 + len(blocks)}


# --- prune_layers and its export ---------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(DECODERS))
def test_pruned_copy_is_renumbered_and_equals_the_model_without_those_layers(family):
    build, stack, _ = DECODERS[family]
    model = build()
    pruned = prune_layers(model, [f"{stack}.2", f"{stack}.0"])
    layers = pruned.get_submodule(stack)
    assert len(layers) == LAYERS - 2 and pruned.config.num_hidden_layers == LAYERS - 2
    assert model.config.num_hidden_layers == LAYERS and len(model.get_submodule(stack)) == LAYERS
    renumbered = layer_indices(layers)  # {"0.self_attn": 0, ...}: every layer_idx is its new position
    assert renumbered and all(int(name.split(".")[0]) == index for name, index in renumbered.items())
    assert sorted(set(renumbered.values())) == [0, 1]
    by_hand = without_layers(model, stack, {0, 2})
    ids = token_ids()
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, by_hand(ids).logits, atol=1e-6)
    # The surviving layers are the original layers 1 and 3, with their weights.
    kept = model.get_submodule(stack)
    for new, old in ((0, 1), (1, 3)):
        for (name, a), b in zip(layers[new].state_dict().items(), kept[old].state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_exported_model_loads_and_generates_with_its_cache(family, tmp_path):
    build, stack, _ = DECODERS[family]
    model = build()
    model.model.layers[0].train() if family == "llama" else model.transformer.h[0].train()  # a mixed training state
    before = snapshot(model)
    config_before = model.config.to_dict()
    indices_before = layer_indices(model)
    deleted = {1, 2}
    names = [f"{stack}.{i}" for i in sorted(deleted)]
    ids = token_ids(1)
    pruned = prune_layers(model, names).eval()
    path = export_pruned_lm(model, names, tmp_path / "pruned", example_input=ids)
    assert path == tmp_path / "pruned" and (path / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "pruned"]  # no temporary folder left
    assert_unchanged(model, before)
    assert model.config.to_dict() == config_before
    assert layer_indices(model) == indices_before
    assert sorted(set(indices_before.values())) == list(range(LAYERS))

    loaded = load_pruned_lm(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.num_hidden_layers == LAYERS - len(deleted)
    with torch.no_grad():
        assert torch.allclose(loaded(token_ids(3)).logits, pruned(token_ids(3)).logits, atol=1e-6)
    by_hand = greedy_by_hand(without_layers(model, stack, deleted).eval(), ids)
    for generator in (pruned, loaded):
        generator.config.use_cache = True
        with torch.no_grad():
            tokens = generator.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                        do_sample=False, use_cache=True)
        assert tokens.shape == (1, LENGTH + 5)
        assert torch.equal(tokens, by_hand)
    assert not torch.equal(greedy_by_hand(model, ids), by_hand)  # the deletion matters


def test_export_saves_the_tokenizer_and_refuses_a_used_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    model = llama()
    path = export_pruned_lm(model, ["model.layers.1"], tmp_path / "out", tokenizer=tokenizer)
    reread = transformers.AutoTokenizer.from_pretrained(path)
    assert reread("w3 w7")["input_ids"] == [3, 7]
    with pytest.raises(ProbeError, match="not an empty folder"):
        export_pruned_lm(model, ["model.layers.1"], path)
    (tmp_path / "empty").mkdir()
    assert export_pruned_lm(model, ["model.layers.1"], tmp_path / "empty") == tmp_path / "empty"


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    # Qwen2 picks each layer's attention mask (full or sliding window) as config.layer_types[i].
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                      use_sliding_window=True, sliding_window=3, max_window_layers=2, **SPECIAL)
    model = _ready(transformers.Qwen2ForCausalLM(config))
    types = ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert model.config.layer_types == types
    names = ["model.layers.0", "model.layers.3"]
    pruned = prune_layers(model, names)
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_type for layer in pruned.model.layers] == pruned.config.layer_types
    assert model.config.layer_types == types
    ids = token_ids(1)
    loaded = load_pruned_lm(export_pruned_lm(model, names, tmp_path / "qwen", example_input=ids))
    assert loaded.config.layer_types == pruned.config.layer_types
    # The reference: the original model with both layers' blocks ablated (pre-LayerNorm: the
    # layers become the identity), decoded greedily without a cache.
    blocks = [b for name, group in group_layers(model, probe.find_blocks(model, example_input=ids)).items()
              if name in names for b in group]
    assert len(blocks) == 4
    with probe.ablated(model, blocks):
        by_hand = greedy_by_hand(model, ids)
    for generator in (pruned, loaded):
        generator.config.use_cache = True
        with torch.no_grad():
            tokens = generator.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert torch.equal(tokens, by_hand)
    # Without its layer_types entry filtered the kept sliding layer would attend to everything.
    unfiltered = without_layers(model, "model.layers", {0, 3})
    assert not torch.equal(greedy_by_hand(unfiltered, ids), by_hand)


def test_bert_layers_prune_too():
    model = bert()
    pruned = prune_layers(model, ["bert.encoder.layer.1"])
    assert pruned.config.num_hidden_layers == LAYERS - 1 and len(pruned.bert.encoder.layer) == LAYERS - 1
    with torch.no_grad():
        expected = without_layers(model, "bert.encoder.layer", {1})(token_ids()).logits
        assert torch.allclose(pruned(token_ids()).logits, expected, atol=1e-6)


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,message", [
    (["model.layers.1.mlp"], "no element of a ModuleList"),
    (["model.layers"], "no element of a ModuleList"),
    (["model.nothing.1"], "no element of a ModuleList"),
    (["model.layers.7"], "holds 4 layers"),
    ([f"model.layers.{i}" for i in range(LAYERS)], "keep at least one"),
])
def test_refuses_what_is_not_whole_layers_of_one_stack(layers, message):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ProbeError, match=message) as error:
        prune_layers(model, layers)
    assert "\n" not in str(error.value)
    assert_unchanged(model, before)


def test_refuses_other_models_and_position_dependent_settings():
    with pytest.raises(ProbeError, match="needs a Hugging Face PreTrainedModel"):
        prune_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), ["1"])
    torch.manual_seed(0)
    scaled = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_head=2, n_layer=3, vocab_size=VOCAB, n_positions=64, scale_attn_by_inverse_layer_idx=True,
        **SPECIAL))
    with pytest.raises(ProbeError, match="scale_attn_by_inverse_layer_idx"):
        prune_layers(scaled, ["transformer.h.0"])
    assert prune_layers(scaled, ["transformer.h.2"]).config.n_layer == 2  # nothing after it moves
    model = llama()
    model.config.mlp_only_layers = [0, 2]  # a list of layer indices probe cannot renumber
    with pytest.raises(ProbeError, match="mlp_only_layers"):
        prune_layers(model, ["model.layers.1"])


def test_refuses_a_config_that_would_build_other_layers():
    # Qwen2-MoE makes every decoder_sparse_step-th layer a mixture of experts, counted by position:
    # deleting layer 0 would move the expert layers, so the saved config could not load the copy.
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                         num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=8, decoder_sparse_step=2, **SPECIAL)
    model = _ready(transformers.Qwen2MoeForCausalLM(config))
    with pytest.raises(ProbeError, match="other parameters"):
        prune_layers(model, ["model.layers.0"])
    pruned = prune_layers(model, ["model.layers.0", "model.layers.1"])  # the pattern survives
    assert [type(layer.mlp) for layer in pruned.model.layers] == [type(layer.mlp) for layer in model.model.layers[2:]]


def test_export_checks_the_saved_model_on_an_example(tmp_path):
    # Attention scaled by 1 / (layer_idx + 1) when built; the config no longer says so, so the
    # saved model computes other logits than the copy: the export refuses and leaves no folder.
    torch.manual_seed(0)
    model = _ready(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_head=2, n_layer=3, vocab_size=VOCAB, n_positions=64, scale_attn_by_inverse_layer_idx=True,
        **SPECIAL)))
    model.config.scale_attn_by_inverse_layer_idx = False
    ids = token_ids()
    with pytest.raises(ProbeError, match="other logits"):
        export_pruned_lm(model, ["transformer.h.0"], tmp_path / "out",
                         example_input={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not list(tmp_path.iterdir())


def test_untraceable_models_find_their_blocks_on_the_first_batch():
    """No example input and no torch.fx: every evaluating function runs the model on the data's
    first batch to find the blocks, and finds the same ones."""
    model = llama()
    expected = [b.name for b in probe.find_blocks(llama(), example_input=token_ids())]
    table = probe.block_table(model, [token_ids()], task="lm", progress=False)
    assert list(table["block"]) == expected
    with pytest.raises(ProbeError, match="could not trace"):
        probe.sweep(llama(), iter([token_ids()]), task="lm", progress=False)  # a generator cannot be read twice
