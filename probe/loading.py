"""What a command runs on, from its `RunConfig`: the model, the evaluation data, the calibration
data for BatchNorm recalibration, and the blocks of a `--blocks-spec`."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, Subset

from probe import distributed
from probe.batches import Data, device_for, explained_misfit
from probe.blocks import Block, find_blocks
from probe.cache import cached_model
from probe.config import RunConfig
from probe.data import dataset_info, load_dataset, make_loader, split_off, stratified_subset
from probe.errors import ProbeError
from probe.hf import is_hf_model, load_hf_model, load_tokenizer, model_source
from probe.imports import import_attribute
from probe.models import build_model, load_checkpoint
from probe.recalibrate import batchnorm_layers
from probe.text import TEXT_DATASETS, TEXT_WINDOWS, read_text, text_windows
from probe.training import TrainConfig

__all__ = ["Datasets", "Inputs", "data_fingerprint", "is_user_dataset", "load_datasets", "load_inputs", "load_model",
           "train_loader", "user_dataset"]


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
    if is_hf_model(config.model):
        folder, file = model_source(config.model)
        return load_hf_model(config.model, device), str(folder / file) if file else str(folder)
    if config.dataset in TEXT_DATASETS:
        raise ProbeError(f"--dataset {config.dataset} is text: it needs a language model with a tokenizer, "
                         "--model hf:PATH or --model smollm2.")
    if is_user_dataset(config.dataset):
        return _model_for_user_data(config, device)
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


def is_user_dataset(name: str) -> bool:
    """`--dataset package.module:function`: the user's own data set."""
    return ":" in name


def user_dataset(config: RunConfig, split: str) -> Dataset:
    """The user's data set `config.dataset` names, called with the keywords it takes of
    `split`, `seed` and `root` (`--data-root`); any torch Dataset whose items the default
    DataLoader can batch (tensors, tuples, dicts)."""
    factory = import_attribute(config.dataset, "dataset")
    if not callable(factory):
        raise ProbeError(f"dataset {config.dataset!r} is a {type(factory).__name__}, not a function that returns a "
                         "torch Dataset.")
    offered = {"split": split, "seed": config.seed, "root": config.data_root}
    parameters = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    dataset = factory(**{k: v for k, v in offered.items() if takes_all or k in parameters})
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ProbeError(f"dataset {config.dataset!r} returned a {type(dataset).__name__}; it must return a torch "
                         "Dataset (with __len__ and __getitem__), e.g. a TensorDataset.")
    if len(dataset) == 0:
        raise ProbeError(f"dataset {config.dataset!r} returned an empty data set for split {split!r}.")
    return dataset


def _model_for_user_data(config: RunConfig, device: torch.device) -> tuple[nn.Module, str]:
    """A model for the user's own data: a checkpoint for `--model`, or a factory's own weights.
    probe trains only on its built-in data sets."""
    if not (config.checkpoint or config.weights or ":" in config.model):
        raise ProbeError(f"--dataset {config.dataset}: probe trains models only on its built-in data sets; give the "
                         f"weights of {config.model} with --checkpoint, or a --model package.module:factory that "
                         "returns a trained model.")
    model = build_model(config.model, **_user_model_shape(config), weights=config.weights)
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint, allow_pickle=config.allow_pickle)
    source = config.checkpoint or (f"weights={config.weights}" if config.weights else f"{config.model} (its own weights)")
    return model.to(device).eval(), source


def _user_model_shape(config: RunConfig) -> dict:
    """num_classes and in_channels for building `--model` for the user's data: from the data
    set's `classes`/`num_classes` and `in_channels` attributes where it has them."""
    dataset = user_dataset(config, config.split)
    shape = {}
    classes = getattr(dataset, "num_classes", None) or len(getattr(dataset, "classes", ()) or ()) or None
    if classes:
        shape["num_classes"] = int(classes)
    channels = config.in_channels or getattr(dataset, "in_channels", None)
    if channels:
        shape["in_channels"] = int(channels)
    return shape


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
    if is_user_dataset(config.dataset):
        return _user_datasets(config, calibration=calibration, model=model)
    if config.dataset in TEXT_DATASETS:
        return _text_datasets(config, model=model)
    options = {"root": config.data_root, "download": config.download, "seed": config.seed,
               "image_size": config.image_size, "normalize": config.normalize, "in_channels": config.in_channels}
    evaluation = load_dataset(config.dataset, split=config.split, **options)
    if model is not None and not batchnorm_layers(model):
        _refuse_recalibration_without_batchnorm(config, model)
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


def _text_datasets(config: RunConfig, *, model: nn.Module | None) -> Datasets:
    """Windows of `--seq-len` tokens of the text (see `probe.text`); `--limit N`: the first N."""
    if not is_hf_model(config.model):
        raise ProbeError(f"--dataset {config.dataset} is text: it needs --model hf:PATH or smollm2 (their tokenizer).")
    if model is not None and not batchnorm_layers(model):
        _refuse_recalibration_without_batchnorm(config, model)
    windows = text_windows(load_tokenizer(config.model), read_text(config.dataset, config.data_root), config.seq_len)
    total = len(windows)
    # Every deletion costs a forward over all windows: a few keep a run in minutes on a CPU.
    limit = config.limit if config.limit is not None else TEXT_WINDOWS
    if limit < total:
        return Datasets(Subset(windows, range(limit)), None,
                        f"the first {limit} of {total} windows of {config.seq_len} tokens", "none")
    return Datasets(windows, None, f"all {total} windows of {config.seq_len} tokens", "none")


def _refuse_recalibration_without_batchnorm(config: RunConfig, model: nn.Module) -> None:
    if config.bn_recalibrate:
        raise ProbeError(f"--bn-recalibrate: {type(model).__name__} has no BatchNorm layer with running "
                         "statistics, so there is nothing to recalibrate; run without it.")


def _user_datasets(config: RunConfig, *, calibration: bool, model: nn.Module | None) -> Datasets:
    """The user's data set: `--limit N` keeps a class-stratified sample for classification and
    the first N samples otherwise (windows of a text keep their order); calibration samples come
    from its split "train" (the first `calibration_samples`)."""
    evaluation = user_dataset(config, config.split)
    if model is not None and not batchnorm_layers(model):
        _refuse_recalibration_without_batchnorm(config, model)
        calibration = False
    held_out, source = None, "none"
    if calibration and config.bn_recalibrate:
        if config.split == "train":
            raise ProbeError("--bn-recalibrate with --split train and your own data set: the calibration samples "
                             "come from its train split, which is the evaluated one; use --split test.")
        pool = user_dataset(config, "train")
        held_out = Subset(pool, range(min(config.calibration_samples, len(pool))))
        source = f"the first {len(held_out)} samples of {config.dataset} split 'train'"
    total = len(evaluation)
    if config.limit is not None and config.limit < total:
        if config.task == "classification":
            evaluation = stratified_subset(evaluation, config.limit, seed=config.seed)
            selection = f"a seeded, class-stratified sample of {config.limit} of {total} samples (seed {config.seed})"
        else:
            evaluation = Subset(evaluation, range(config.limit))
            selection = f"the first {config.limit} of {total} samples"
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
    data = named_parts(make_loader(datasets.evaluation, batch_size=config.batch_size), config)
    calibration = (named_parts(make_loader(datasets.calibration, batch_size=config.batch_size), config)
                   if datasets.calibration is not None else None)
    blocks = find_blocks(model, spec=config.blocks_spec) if config.blocks_spec else None
    return Inputs(model=model, data=data, calibration=calibration, source=source, blocks=blocks)


def named_parts(loader: Iterable, config: RunConfig) -> Iterable:
    """`loader`, with the batch parts `--inputs`/`--targets` name (`probe.Data`), when given."""
    if config.inputs is None and config.targets is None:
        return loader
    if config.inputs is None:
        raise ProbeError("--targets needs --inputs too: name the batch key(s) that hold the model's inputs.")
    keys = config.inputs.split(",")
    targets = None if config.targets in (None, "none") else config.targets
    return Data(loader, inputs=keys[0] if len(keys) == 1 else keys, targets=targets)


def data_fingerprint(dataset, samples: int = 16) -> str:
    """A short digest of what `dataset` holds: its length and `samples` evenly spaced samples
    (the bytes of every tensor and number in them). Another folder, image size or normalization gives another digest,
    so a resumed run never mixes numbers computed on other data."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for index in sorted({round(i * (len(dataset) - 1) / max(samples - 1, 1)) for i in range(samples)}):
        # Every tensor and number of the item, whatever its form: an (input, target) pair, a dict,
        # a tuple with extras (text in it counts by its repr).
        for part in pytree.tree_leaves(dataset[index]):
            if not isinstance(part, (torch.Tensor, int, float, bool)):
                digest.update(repr(part).encode())
                continue
            value = torch.as_tensor(part)
            digest.update(str((tuple(value.shape), value.dtype)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def train_loader(config: RunConfig) -> Iterable:
    """Batches of the training split (a seeded, class-stratified sample of `limit` samples when
    asked), for what is fitted on training data (linear probes). An image folder has no training
    split of its own: `--calibration-root` names one, else this is refused."""
    if is_user_dataset(config.dataset):
        train = user_dataset(config, "train")
        return make_loader(Subset(train, range(min(config.limit, len(train)))) if config.limit else train,
                           batch_size=config.batch_size)
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
