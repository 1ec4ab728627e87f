"""A decoder's anatomy: its stack of layers, their sublayers, the final norm and the unembedding.

A causal language model keeps its decoder layers as the consecutive elements of one
`ModuleList` (`model.layers.0`, `model.layers.1`, ...), each adding two of probe's blocks to the
residual stream (`model.layers.3[self_attn]`, `model.layers.3[mlp]`; grouped by
`probe.discovery.layers.group_layers`). After the stack, a pre-norm model applies a final norm
(`model.norm` of a Llama's `model`, `transformer.ln_f` of GPT-2) and the unembedding
(`get_output_embeddings()`): the two parts a logit lens applies to the stream after any layer.

    layers = decoder_layers(model, data, None, reader="my analysis")   # names, blocks, modules
    norm, unembed = lens_parts(model, layers.names)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from probe.batches import batches, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.discovery.layers import group_layers, layer_stack
from probe.errors import ProbeError

__all__ = ["DecoderLayers", "decoder_layers", "final_norm", "first_sequence", "lens_parts", "sublayer_of"]


@dataclass
class DecoderLayers:
    """The model's layers in forward order, their blocks and modules."""

    names: list[str]
    blocks: dict[str, list[Block]]
    modules: list[nn.Module]

    @property
    def every_block(self) -> list[Block]:
        return [block for name in self.names for block in self.blocks[name]]


def first_sequence(model: nn.Module, data: Iterable) -> object:
    """The first sequence of the data's first batch: the example discovery runs the model on."""
    batch = next(iter(batches(data, model_device(model), dtype=input_dtype(model))))
    return pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() else t, batch.inputs)


def decoder_layers(model: nn.Module, data: Iterable, blocks: Sequence[str | Block] | None, *,
                   reader: str) -> DecoderLayers:
    """The layers holding `blocks` (discovered on the data's first sequence when None or names:
    torch.fx cannot trace Hugging Face models). ProbeError when they are not one stack of layers;
    reader: who needs them, for that message ("the lm analysis")."""
    needs_discovery = blocks is None or any(not isinstance(b, Block) for b in blocks)
    example = first_sequence(model, data) if needs_discovery else None
    chosen = resolve_blocks(model, blocks, example_input=example)
    groups = group_layers(model, chosen)
    names = list(groups)
    if not names:
        raise ProbeError("the model has no residual block: there are no layers to analyse.")
    if layer_stack(model, names) is None:
        raise ProbeError(f"the layers {names[:4]}... are not the consecutive elements of one ModuleList: "
                         f"{reader} needs a stack of decoder layers (model.layers.0, model.layers.1, ...).")
    return DecoderLayers(names, groups, [model.get_submodule(name) for name in names])


def sublayer_of(block: Block) -> str:
    """The sublayer a block's name gives ("self_attn" of "model.layers.3[self_attn]"); "" when none."""
    found = re.search(r"\[([^\]]+)\]$", block.name)
    return found.group(1) if found else ""


def final_norm(model: nn.Module, layers: Sequence[str]) -> tuple[str, nn.Module]:
    """(name, module) of the model's final norm: the first normalization module registered after
    the layer stack in the module that holds it (`model.norm` of a Llama's `model`,
    `transformer.ln_f` of GPT-2); ProbeError when there is none."""
    found = layer_stack(model, layers)
    if found is None:
        raise ProbeError("the logit lens needs the decoder layers to be one stack (a ModuleList).")
    stack_name = found[0]
    owner_name, _, child = stack_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    after = False
    for name, module in owner.named_children():
        if name == child:
            after = True
            continue
        if after and _is_norm(module):
            return (f"{owner_name}.{name}" if owner_name else name), module
    children = ", ".join(name for name, _ in owner.named_children())
    raise ProbeError(f"the logit lens needs the final norm applied after the layer stack {stack_name!r}, but "
                     f"{owner_name or 'the model'} has no normalization module after it (its children: {children}). "
                     "The lens does not apply to this model: it is for pre-norm causal language models (Llama, "
                     "GPT-2); an encoder such as BERT normalises inside its layers.")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or \
        "norm" in type(module).__name__.lower()


def lens_parts(model: nn.Module, layers: Sequence[str]) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding) of a Hugging Face causal LM whose layers are `layers`: the norm
    from `final_norm`, the unembedding `model.get_output_embeddings()`; ProbeError when either is
    missing (say, an encoder without a language-model head: the lens does not apply)."""
    getter = getattr(model, "get_output_embeddings", None)
    unembed = getter() if callable(getter) else None
    if not isinstance(unembed, nn.Module):
        raise ProbeError(f"the logit lens needs the model's unembedding (model.get_output_embeddings()), and "
                         f"{type(model).__name__} has none (not a Hugging Face causal language model with a language-model "
                         "head); the lens does not apply.")
    return final_norm(model, layers)[1], unembed
