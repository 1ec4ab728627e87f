"""What the lm analysis deletes and how it scores: a causal language model's decoder layers (and
their sublayers, probe's blocks), scored by the `lm` task."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from probe.discovery.decoder import DecoderLayers, decoder_layers
from probe.discovery.find import Block
from probe.scoring.tasks import LanguageModeling

LM = LanguageModeling()
# Who reads the layers, in the messages of the core's checks.
READER = "the lm analysis"


def layers_of(model: nn.Module, data: Iterable, blocks: Sequence[str | Block] | None) -> DecoderLayers:
    """The layers holding `blocks` (`probe.discovery.decoder.decoder_layers`)."""
    return decoder_layers(model, data, blocks, reader=READER)
