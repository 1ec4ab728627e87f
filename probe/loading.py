"""What a command runs on, from its `RunConfig`: the model, the evaluation data, the calibration
data for BatchNorm recalibration, and the blocks of a `--blocks-spec`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from probe import distributed
from probe.batches import device_for, explained_misfit
from probe.blocks import Block, find_blocks
from probe.cache import cached_model
from probe.config import RunConfig
from probe.data import dataset_info, load_dataset, make_loader, split_off, stratified_subset
from probe.errors import ProbeError
from probe.models import build_model, load_checkpoint
from probe.recalibrate import batchnorm_layers
from probe.training import TrainConfig

__all__ = ["Datasets", "Inputs", "data_fingerprint", "load_datasets", "load_inputs", "load_model", "train_loader"]


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
    info = dataset_info(config.dataset, root=config.data_root, image_size=config.image_size,
                        normalize=config.normalize, in_channels=config.in_channels)
    if config.checkpoint or config.weights:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            weights=config.weights)
        if config.checkpoint:
            load_checkpoint(model, config.checkpoint, allow_pickle=config.allow_pickle)
        return model.to(device).eval(), config.checkpoint or f"weights={config.weights}"
    untrained = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels)
    if not train:
        return untrained.to(device).eval(), "untrained"
    chosen = [f"--{name.replace('_', '-')}" for name in ("image_size", "normalize", "in_channels")
              if getattr(config, name) is not None]
    if chosen:  # the cache trains with the data set's own preparation: evaluating otherwise would mislead
        raise ProbeError(f"{', '.join(chosen)} prepare the data for a model you bring (--checkpoint or --weights); "
                         "a model trained here uses the data set's own image size and normalization.")
    if not config.blocks_spec:
        find_blocks(untrained)  # a model with no residual block is refused before it is trained
    # ... and so is one the data does not fit (channels, image size), before minutes of training.
    example = load_dataset(config.dataset, split="train", root=config.data_root, download=config.download,
                           seed=config.seed)[0][0].unsqueeze(0)
    with torch.no_grad(), explained_misfit(example):
        untrained.eval()(example)
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


@dataclass
class Datasets:
    """The evaluation data and the BatchNorm calibration data of a run, and how each was chosen.

    The two never share a sample: calibration comes from the training split, from
    `--calibration-root`, or is split off the evaluated folder and left out of the evaluation.
    """

    evaluation: Dataset
    calibration: Dataset | None
    selection: str  # which samples are evaluated, in words
    calibration_source: str  # where the calibration samples come from, in words ("none" without)


def load_datasets(config: RunConfig, *, calibration: bool, model: nn.Module | None = None) -> Datasets:
    """The evaluation split (a seeded, class-stratified sample of `limit` samples when asked) and,
    when `calibration` is true and `model` has BatchNorm statistics, `calibration_samples`
    calibration samples (at most `limit`, so quick runs stay quick). Data with one pool only
    (an image folder without `--calibration-root`, `--split train`) gives calibration samples
    only with `bn_recalibrate`, set apart from the evaluated ones; otherwise none."""
    options = {"root": config.data_root, "download": config.download, "seed": config.seed,
               "image_size": config.image_size, "normalize": config.normalize, "in_channels": config.in_channels}
    evaluation = load_dataset(config.dataset, split=config.split, **options)
    if model is not None and not batchnorm_layers(model):
        if config.bn_recalibrate:
            raise ProbeError(f"--bn-recalibrate: {type(model).__name__} has no BatchNorm layer with running "
                             "statistics, so there is nothing to recalibrate; run without it.")
        calibration = False  # nothing to refit: no sample needs to be set aside
    samples = min(config.calibration_samples, config.limit) if config.limit else config.calibration_samples
    held_out, source = None, "none"
    if config.calibration_root:
        _check_calibration_root(config)
    if calibration and config.calibration_root:
        pool = load_dataset(config.dataset, split="train", **{**options, "root": config.calibration_root})
        held_out = _sample(pool, samples, config.seed)
        source = f"{len(held_out)} samples of --calibration-root {config.calibration_root} (seeded, stratified)"
    elif calibration and config.dataset != "imagefolder" and config.split == "test":
        pool = load_dataset(config.dataset, split="train", **options)
        held_out = _sample(pool, samples, config.seed)
        source = f"{len(held_out)} samples of the training split (seeded, stratified)"
    elif calibration and config.bn_recalibrate:
        # One pool of data: set the calibration samples apart from the evaluated ones, but only
        # when asked: an analysis section alone must not change which samples the table holds.
        held_out, evaluation = split_off(evaluation, min(samples, len(evaluation) // 2), seed=config.seed)
        source = (f"{len(held_out)} samples split off the evaluated {config.split} data (seeded, stratified) "
                  "and left out of the evaluation")
    total = len(evaluation)
    if config.limit is not None and config.limit < total:
        evaluation = stratified_subset(evaluation, config.limit, seed=config.seed)
        selection = f"a seeded, class-stratified sample of {config.limit} of {total} samples (seed {config.seed})"
    else:
        selection = f"all {total} samples"
    return Datasets(evaluation, held_out, selection, source)


def _check_calibration_root(config: RunConfig) -> None:
    """`--calibration-root` is another image folder: never the evaluated one."""
    if config.dataset != "imagefolder":
        raise ProbeError(f"--calibration-root is for image folders; {config.dataset} has a training split, "
                         "which probe uses for calibration (or splits off with --split train).")
    if config.data_root and Path(config.calibration_root).resolve() == Path(config.data_root).resolve():
        raise ProbeError(f"--calibration-root {config.calibration_root!r} is the evaluated folder itself; give "
                         "another folder, or leave it out to set calibration samples apart from the evaluated ones.")


def _sample(dataset: Dataset, n: int, seed: int) -> Dataset:
    return stratified_subset(dataset, n, seed=seed) if n < len(dataset) else dataset


def load_inputs(config: RunConfig, *, progress: bool) -> Inputs:
    """Model, evaluation batches, calibration batches (with `bn_recalibrate`) and spec blocks."""
    model, source = load_model(config, device_for(config.device), progress=progress)
    datasets = load_datasets(config, calibration=config.bn_recalibrate, model=model)
    data = make_loader(datasets.evaluation, batch_size=config.batch_size)
    calibration = (make_loader(datasets.calibration, batch_size=config.batch_size)
                   if datasets.calibration is not None else None)
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


def train_loader(config: RunConfig) -> Iterable:
    """Batches of the training split (a seeded, class-stratified sample of `limit` samples when
    asked), for what is fitted on training data (linear probes). An image folder has no training
    split of its own: `--calibration-root` names one, else this is refused."""
    if config.dataset == "imagefolder" and not config.calibration_root:
        raise ProbeError("an image folder has no training split: give one with --calibration-root FOLDER "
                         "(class sub-folders) to fit on.")
    if config.split == "train":
        raise ProbeError("with --split train the evaluated samples are the training split, so nothing held out "
                         "is left to score what is fitted on it; use --split test.")
    if config.calibration_root:
        _check_calibration_root(config)
    root = config.calibration_root if config.dataset == "imagefolder" else config.data_root
    train = load_dataset(config.dataset, split="train", root=root, download=config.download, seed=config.seed,
                         image_size=config.image_size, normalize=config.normalize, in_channels=config.in_channels)
    return make_loader(_sample(train, config.limit, config.seed) if config.limit else train,
                       batch_size=config.batch_size)
