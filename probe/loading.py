"""What a command runs on, from its `RunConfig`: the model, the evaluation data, the calibration
data for BatchNorm recalibration, and the blocks of a `--blocks-spec`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from probe import distributed
from probe.batches import device_for
from probe.blocks import Block, find_blocks
from probe.cache import cached_model
from probe.config import RunConfig
from probe.data import dataset_info, load_dataset, make_loader
from probe.models import build_model, load_checkpoint
from probe.training import TrainConfig

__all__ = ["Inputs", "calibration_loader", "data_fingerprint", "load_inputs", "load_model"]


@dataclass
class Inputs:
    """What an analysis command runs on."""

    model: nn.Module
    data: Iterable
    calibration: Iterable | None  # held-out training batches, when BN recalibration is asked for
    source: str  # where the weights came from: a checkpoint path, weights=..., or the cache entry
    blocks: list[Block] | None  # from --blocks-spec; None: the analyses discover them


def load_model(config: RunConfig, device: torch.device, *, progress: bool,
               train: bool = True) -> tuple[nn.Module, str]:
    """The model to probe in eval mode, and where its weights came from.

    Without a checkpoint or weights the model is trained on the data set's training split
    (once; then it comes from the cache). `train=False`: untrained instead, for listing blocks.
    """
    info = dataset_info(config.dataset, root=config.data_root)
    if config.checkpoint or config.weights:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            weights=config.weights)
        if config.checkpoint:
            load_checkpoint(model, config.checkpoint)
        return model.to(device).eval(), config.checkpoint or f"weights={config.weights}"
    untrained = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels)
    if not train:
        return untrained.to(device).eval(), "untrained"
    if not config.blocks_spec:
        find_blocks(untrained)  # a model with no residual block is refused before it is trained
    fields = {"epochs": config.epochs} if config.epochs else {}
    train_config = TrainConfig(model=config.model, dataset=config.dataset, seed=config.seed,
                               device=str(device), data_root=config.data_root, download=config.download,
                               **fields)
    # Under torchrun rank 0 trains (or loads) first; the others then load its checkpoint.
    if distributed.rank() != 0:
        distributed.barrier()
    model, path = cached_model(train_config, progress=progress)
    if distributed.rank() == 0:
        distributed.barrier()
    return model.to(device).eval(), str(path)


def calibration_loader(config: RunConfig) -> Iterable:
    """The first `calibration_samples` training samples (at most `limit`, so quick runs stay
    quick): data the evaluation never sees."""
    samples = min(config.calibration_samples, config.limit) if config.limit else config.calibration_samples
    train = load_dataset(config.dataset, split="train", root=config.data_root, download=config.download,
                         seed=config.seed)
    return make_loader(train, batch_size=config.batch_size, limit=samples)


def load_inputs(config: RunConfig, *, progress: bool) -> Inputs:
    """Model, evaluation batches, calibration batches (with `bn_recalibrate`) and spec blocks."""
    model, source = load_model(config, device_for(config.device), progress=progress)
    dataset = load_dataset(config.dataset, split=config.split, root=config.data_root, download=config.download,
                           seed=config.seed)
    data = make_loader(dataset, batch_size=config.batch_size, limit=config.limit)
    calibration = calibration_loader(config) if config.bn_recalibrate else None
    blocks = find_blocks(model, spec=config.blocks_spec) if config.blocks_spec else None
    return Inputs(model=model, data=data, calibration=calibration, source=source, blocks=blocks)


def data_fingerprint(dataset, samples: int = 16) -> str:
    """A short digest of what `dataset` holds: its length and `samples` evenly spaced samples
    (input and target bytes). Another folder, image size or normalization gives another digest,
    so a resumed run never mixes numbers computed on other data."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for index in sorted({round(i * (len(dataset) - 1) / max(samples - 1, 1)) for i in range(samples)}):
        for part in dataset[index][:2]:
            value = torch.as_tensor(part)
            digest.update(str((tuple(value.shape), value.dtype)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
