"""What a command runs on, from its `RunConfig`: the model, the evaluation data, the calibration
data for BatchNorm recalibration, and the blocks of a `--blocks-spec`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.datasets import CIFAR10, MNIST, DatasetFolder

from probe import distributed
from probe.batches import Batch, Data, device_for, explained_misfit
from probe.discovery.find import Block, find_blocks
from probe.loading.cache import cached_model
from probe.commands.config import RunConfig
from probe.loading.datasets import _LabelledTensors, dataset_info, load_dataset, make_loader, split_off, stratified_subset
from probe.errors import ProbeError
from probe.loading.big_models import dispatch, dtype_of, read_device_map, read_max_memory
from probe.loading.huggingface import is_hf_model, load_hf_model, load_tokenizer, model_source
from probe.imports import import_attribute
from probe.loading.checkpoints import load_checkpoint
from probe.loading.detection_images import load_detection_images
from probe.loading.detectors import (YOLO_PREFIX, DetectorInput, build_torchvision_detector, detector_input, is_detector,
                                     is_yolo, load_yolo)
from probe.loading.models import build_model, is_builtin_model
from probe.scoring.tasks import Detection, Task, resolve_task
from probe.deletion.batchnorm import batchnorm_layers
from probe.loading.text import TEXT_DATASETS, TEXT_WINDOWS, read_text, text_windows
from probe.loading.training import TrainConfig

__all__ = ["Datasets", "Inputs", "data_fingerprint", "explained_channels", "first_convolution", "fit_channels",
           "is_user_dataset", "load_datasets", "load_inputs", "load_model", "load_task", "placed", "train_loader", "user_dataset"]


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
        model = load_hf_model(config.model, device, dtype=dtype_of(config.dtype),
                              device_map=read_device_map(config.device_map),
                              max_memory=read_max_memory(config.max_memory), offload_folder=config.offload_folder)
        return model, str(folder / file) if file else str(folder)
    if config.dataset in TEXT_DATASETS:
        raise ProbeError(f"--dataset {config.dataset} is text: it needs a language model with a tokenizer, "
                         "--model hf:PATH or --model smollm2.")
    if is_detector(config.model):
        return _detector(config, device, train=train)
    if is_user_dataset(config.dataset) or config.dataset == "images":
        return _model_for_user_data(config, device)
    info = dataset_info(config.dataset, root=config.data_root, image_size=config.image_size,
                        normalize=config.normalize, in_channels=config.in_channels)
    if config.checkpoint or config.weights:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            weights=config.weights, origins=_data_origins(config, info))
        if config.checkpoint:
            load_checkpoint(model, config.checkpoint, allow_pickle=config.allow_pickle, dtype=dtype_of(config.dtype))
        return placed(model, config, device), config.checkpoint or f"weights={config.weights}"
    untrained = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            origins=_data_origins(config, info))
    if not train:
        return placed(untrained, config, device), "untrained"
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
    with torch.no_grad(), explained_channels(untrained, example, config, trained_here=True):
        untrained.eval()(example)
    train_config = training_settings(config, device)
    # Under torchrun rank 0 trains (or loads) first; the others then load its checkpoint.
    if distributed.rank() != 0:
        distributed.barrier()
    model, path = cached_model(train_config, progress=progress)
    if distributed.rank() == 0:
        distributed.barrier()
    return placed(model, config, device), str(path)


def placed(model: nn.Module, config: RunConfig, device: torch.device) -> nn.Module:
    """`model` in eval mode, in `--dtype`, on `device`; with `--device-map`, dispatched over devices
    by accelerate instead (its residual blocks kept whole: shortcut and branch meet on one device)."""
    dtype = dtype_of(config.dtype)
    if config.device_map is None:
        return model.to(device=device, dtype=dtype).eval()
    try:
        no_split = {type(model.get_submodule(block.module)).__name__ for block in find_blocks(model) if block.module}
    except ProbeError:  # not traceable: accelerate splits where it likes (whole modules, as always)
        no_split = set()
    return dispatch(model.eval(), read_device_map(config.device_map), max_memory=config.max_memory,
                    offload_folder=config.offload_folder, no_split=no_split, dtype=dtype)


def first_convolution(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's first convolution in module order whose input channels are
    known (a lazy one's are not until its first forward), or None for a model without one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels > 0:
            return name, module
    return None


def fit_channels(config: RunConfig, model: nn.Module | None) -> RunConfig:
    """`config` with `in_channels` set to what the model's first convolution takes, for an image
    folder read without `--in-channels`: grey images become RGB for a 3-channel model, RGB
    images grey for a 1-channel one. Unchanged for every other data set (their defaults stay)."""
    if config.dataset != "imagefolder" or config.in_channels is not None or model is None:
        return config
    first = first_convolution(model)
    if first is None or first[1].in_channels != 1:
        return config  # 3 is the image folder's own default; other counts get explained_channels' error
    if config.normalize is None:
        raise ProbeError(f"the model's first convolution {first[0]!r} takes 1 channel, so the images of "
                         f"{config.data_root!r} are read as grey, which the default normalization (imagenet: "
                         "3 channels) does not fit; give --normalize MEAN,STD (e.g. mnist or none).")
    return dataclasses.replace(config, in_channels=1)


def _channel_misfit(model: nn.Module, inputs: object, config: RunConfig, trained_here: bool) -> str | None:
    """Why the data's channels do not fit the model's first convolution, and what to do; None
    when they fit (or cannot be told apart)."""
    first = first_convolution(model)
    if first is None or not isinstance(inputs, torch.Tensor) or inputs.dim() != first[1].weight.dim():
        return None
    name, wanted, have = first[0], first[1].in_channels, inputs.shape[1]
    if wanted == have:
        return None
    head = (f"the model takes {wanted} input channel(s) (its first convolution {name!r}) but the "
            f"{config.dataset} data has {have}")
    if is_user_dataset(config.dataset):
        return (f"{head}: --in-channels does not convert your own data set; give inputs of {wanted} channel(s), or a "
                f"model for {have} (a --model factory that takes in_channels gets --in-channels {have}).")
    if wanted not in (1, 3):
        return (f"{head}: probe reads images as grey (--in-channels 1) or RGB (--in-channels 3); give a model "
                "that takes 1 or 3 channels.")
    if trained_here:
        return (f"{head}: probe builds --model with in_channels={have} for this data, but its factory made a "
                f"{wanted}-channel model; make it take in_channels, or give its weights with --checkpoint and "
                f"--in-channels {wanted} to read the images with {wanted} channel(s).")
    return f"{head}: give --in-channels {wanted} to read the images as {'grey' if wanted == 1 else 'RGB'}."


@contextlib.contextmanager
def explained_channels(model: nn.Module, batch: Batch | torch.Tensor, config: RunConfig, *,
                       trained_here: bool = False):
    """`probe.batches.explained_misfit`, and for data whose channels do not fit the model's first
    convolution a ProbeError naming both counts and the `--in-channels` that fixes it.
    trained_here: the model is being trained by probe (no --checkpoint or --weights)."""
    inputs = batch.inputs if isinstance(batch, Batch) else batch
    with explained_misfit(batch):
        try:
            yield
        except RuntimeError as error:
            message = _channel_misfit(model, inputs, config, trained_here)
            if message is None or "channels" not in str(error):
                raise
            raise ProbeError(message) from error


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
    try:
        dataset = factory(**{k: v for k, v in offered.items() if takes_all or k in parameters})
    except ProbeError:
        raise
    except Exception as error:  # the user's own code: what it raised, on one line
        said = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ProbeError(f"dataset {config.dataset!r}: the function raised {type(error).__name__}"
                         f"{': ' + said if said else ''} (split={split!r}).") from error
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ProbeError(f"dataset {config.dataset!r} returned a {type(dataset).__name__}; it must return a torch "
                         "Dataset (with __len__ and __getitem__), e.g. a TensorDataset.")
    if len(dataset) == 0:
        raise ProbeError(f"dataset {config.dataset!r} returned an empty data set for split {split!r}.")
    return dataset


def _data_origins(config: RunConfig, info) -> dict[str, str]:
    """Where the num_classes and in_channels a model is built with come from, for messages."""
    channels = "--in-channels" if config.in_channels is not None else f"--dataset {config.dataset}'s images"
    return {"num_classes": f"the {info.num_classes} classes of --dataset {config.dataset}",
            "in_channels": f"the {info.in_channels} channel(s) of {channels}"}


def _detector(config: RunConfig, device: torch.device, *, train: bool) -> tuple[nn.Module, str]:
    """A detector: an Ultralytics checkpoint (`yolo:PATH`), or a torchvision detection model with
    its `--checkpoint` (or torchvision's `--weights`); scored on images (`--dataset images`) or the
    user's own data. `train=False` (listing blocks): an untrained torchvision detector will do."""
    if config.dataset != "images" and not is_user_dataset(config.dataset):
        raise ProbeError(f"--model {config.model} is a detector, which --dataset {config.dataset} (classes) cannot "
                         "score; give --dataset images --data-root DIR (a folder of images), or your own data set.")
    if is_yolo(config.model):
        if config.checkpoint or config.weights:
            raise ProbeError(f"--model {config.model} is the checkpoint itself; leave out "
                             f"{'--checkpoint' if config.checkpoint else '--weights'}.")
        model = load_yolo(config.model)
        return placed(model, config, device), str(Path(config.model[len(YOLO_PREFIX):]).expanduser())
    if train and not (config.checkpoint or config.weights):
        raise ProbeError(f"--model {config.model}: probe does not train detectors; give its weights with --checkpoint "
                         "FILE, or --weights DEFAULT (torchvision's, downloaded).")
    model = build_torchvision_detector(config.model, checkpoint=config.checkpoint, weights=config.weights,
                                       allow_pickle=config.allow_pickle)
    source = config.checkpoint or (f"weights={config.weights}" if config.weights else "untrained")
    return placed(model, config, device), source


def load_task(config: RunConfig, model: nn.Module) -> Task:
    """The task `config.task` names; detection with `--conf` and `--nms-iou`, and an Ultralytics
    model's class count (what its predictions hold beyond the classes: mask coefficients, keypoints)."""
    if config.task != "detection":
        return resolve_task(config.task)
    found = detector_input(model)
    return Detection(conf=config.conf, iou=config.nms_iou,
                     classes=found.num_classes if found.family == "ultralytics" else None)


def _model_for_user_data(config: RunConfig, device: torch.device) -> tuple[nn.Module, str]:
    """A model for the user's own data or an images folder: a checkpoint for `--model`, or a
    factory's own weights. probe trains only on its built-in data sets."""
    if config.dataset == "images" and is_builtin_model(config.model):
        raise ProbeError(f"--model {config.model} is a classifier: --dataset images has no classes to build it for "
                         "or to score it by; give a detector (yolo:PATH, a torchvision detection model, or your own "
                         "package.module:factory).")
    if not (config.checkpoint or config.weights or ":" in config.model):
        raise ProbeError(f"--dataset {config.dataset}: probe trains models only on its built-in data sets; give the "
                         f"weights of {config.model} with --checkpoint, or a --model package.module:factory that "
                         "returns a trained model.")
    shape, origins = _user_model_shape(config)
    if ":" in config.model:  # a factory gets only what the data says (no num_classes for data without classes)
        shape = {"num_classes": None, "in_channels": None, **shape}
    model = build_model(config.model, **shape, weights=config.weights, origins=origins)
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint, allow_pickle=config.allow_pickle, dtype=dtype_of(config.dtype))
    source = config.checkpoint or (f"weights={config.weights}" if config.weights else f"{config.model} (its own weights)")
    return placed(model, config, device), source


def _user_model_shape(config: RunConfig) -> tuple[dict, dict[str, str]]:
    """(num_classes and in_channels for building `--model` for the user's data, where each came
    from): from the data set's `classes`/`num_classes` and `in_channels` attributes where it has
    them, and `--in-channels`. Data without classes (an images folder, a data set without those
    attributes) gives no num_classes: the factory keeps its own."""
    dataset = user_dataset(config, config.split) if config.dataset != "images" else None
    shape, origins = {}, {}
    if getattr(dataset, "num_classes", None):
        shape["num_classes"] = int(dataset.num_classes)
        origins["num_classes"] = f"the num_classes attribute of --dataset {config.dataset}'s data set"
    elif getattr(dataset, "classes", None):
        shape["num_classes"] = len(dataset.classes)
        origins["num_classes"] = f"the {len(dataset.classes)} classes of --dataset {config.dataset}'s data set"
    if config.in_channels or getattr(dataset, "in_channels", None):
        shape["in_channels"] = int(config.in_channels or dataset.in_channels)
        origins["in_channels"] = ("--in-channels" if config.in_channels else
                                  f"the in_channels attribute of --dataset {config.dataset}'s data set")
    return shape, origins


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
    only with `bn_recalibrate`, set apart from the evaluated ones; otherwise none. An image
    folder without `in_channels` is read with the channels `model` takes (`fit_channels`)."""
    if is_user_dataset(config.dataset):
        return _user_datasets(config, calibration=calibration, model=model)
    if config.dataset in TEXT_DATASETS:
        return _text_datasets(config, model=model)
    if config.dataset == "images":
        return _image_datasets(config, calibration=calibration, model=model)
    config = fit_channels(config, model)
    options = {"root": config.data_root, "download": config.download, "seed": config.seed,
               "image_size": config.image_size, "normalize": config.normalize, "in_channels": config.in_channels}
    evaluation = load_dataset(config.dataset, split=config.split, **options)
    if getattr(evaluation, "mixed_sizes", False):
        size = evaluation.info.image_size
        print(f"probe: the images of {config.data_root} differ in size (or are not square): they are resized and "
              f"centre-cropped to {size}x{size}; choose the size the model was trained on with --image-size N.",
              file=sys.stderr)
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
    """Windows of `--seq-len` tokens of the text (see `probe.loading.text`); `--limit N`: the first N."""
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


def _image_datasets(config: RunConfig, *, calibration: bool, model: nn.Module | None) -> Datasets:
    """`--dataset images`: the folder's images prepared as the model's predictor prepares them
    (`probe.loading.detection_images`); `--limit N`: the first N in path order; with
    `--bn-recalibrate`, calibration images split off (seeded) and left out of the evaluation."""
    given = [f"--{name.replace('_', '-')}" for name in ("normalize", "in_channels")
             if getattr(config, name) is not None]
    if given:
        raise ProbeError(f"{', '.join(given)} do(es) not apply to --dataset images: its images are prepared as the "
                         "detector's own predictor prepares them (RGB in [0, 1]); leave them out.")
    detector = detector_input(model) if model is not None else DetectorInput("other")
    images = load_detection_images(config.data_root, detector, image_size=config.image_size)
    for note in images.notes:
        print(f"probe: {note}", file=sys.stderr)
    if model is not None and not batchnorm_layers(model):
        _refuse_recalibration_without_batchnorm(config, model)
        calibration = False
    evaluation, held_out, source = images, None, "none"
    if calibration and config.bn_recalibrate:
        count = min(config.calibration_samples, len(images) // 2)
        if count < 1:
            raise ProbeError(f"--bn-recalibrate needs images to recalibrate on, set apart from the evaluated ones; "
                             f"{config.data_root!r} holds only {len(images)}.")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed)).tolist()
        held_out, evaluation = Subset(images, sorted(order[:count])), Subset(images, sorted(order[count:]))
        source = f"{count} images split off the folder (seeded) and left out of the evaluation"
    total = len(evaluation)
    if config.limit is not None and config.limit < total:
        return Datasets(Subset(evaluation, range(config.limit)), held_out,
                        f"the first {config.limit} of {total} images (in path order)", source)
    return Datasets(evaluation, held_out, f"all {total} images", source)


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


def data_fingerprint(dataset) -> str:
    """A short digest of everything `dataset` holds, so a resumed run never mixes numbers computed
    on other data: its length, the indices its `Subset`s keep of the data set below them, and the
    content of that data set's samples. Tensors in memory (the digits, text windows, a
    TensorDataset): all their bytes. An image folder: the path (relative to the root), class,
    size and bytes of every file kept (all of them without a Subset: a `--limit` sample of a large
    folder reads only its own files), and the transform (image size, channels, normalization). torchvision's
    CIFAR and MNIST: their arrays, targets and transform. Any other data set: every item it gives
    (the bytes of every tensor and number in it, the repr of anything else)."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    base, indices = _below_subsets(dataset)
    if indices is not None:
        digest.update(b"indices")
        digest.update(torch.as_tensor(indices, dtype=torch.int64).numpy().tobytes())
    if isinstance(base, TensorDataset) and type(base).__getitem__ in _TENSOR_ITEMS:
        for tensor in base.tensors:
            _digest_value(digest, tensor)
    elif isinstance(base, DatasetFolder) and type(base).__getitem__ is DatasetFolder.__getitem__:
        _digest_files(digest, base, indices)
    elif isinstance(base, (MNIST, CIFAR10)) and type(base).__getitem__ in _ARRAY_ITEMS:  # CIFAR100 is a CIFAR10
        digest.update(f"{type(base).__name__} {base.transform!r} {base.target_transform!r}".encode())
        _digest_value(digest, torch.as_tensor(base.data))
        _digest_value(digest, torch.as_tensor(base.targets))
    else:  # every item, whatever its form: an (input, target) pair, a dict, a tuple with extras
        for index in range(len(dataset)):
            for part in pytree.tree_leaves(dataset[index]):
                _digest_value(digest, part)
    return digest.hexdigest()[:16]


_TENSOR_ITEMS = (TensorDataset.__getitem__, _LabelledTensors.__getitem__)
_ARRAY_ITEMS = (MNIST.__getitem__, CIFAR10.__getitem__)


def _below_subsets(dataset) -> tuple[object, list[int] | None]:
    """(the data set under any `Subset`s, the indices of it they keep; None without a Subset)."""
    indices = None
    while isinstance(dataset, Subset):
        kept = [int(i) for i in dataset.indices]
        indices = kept if indices is None else [kept[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _digest_value(digest, part) -> None:
    """The shape, dtype and bytes of a tensor or number; the repr of anything else."""
    if not isinstance(part, (torch.Tensor, int, float, bool)):
        digest.update(repr(part).encode())
        return
    value = torch.as_tensor(part)
    digest.update(str((tuple(value.shape), value.dtype)).encode())
    digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _digest_files(digest, folder: DatasetFolder, indices: list[int] | None = None) -> None:
    """An image folder: the transform, then each kept file's (all without `indices`) path below
    the root, class, size and bytes."""
    digest.update(f"{folder.transform!r} {folder.target_transform!r} {getattr(folder.loader, '__qualname__', folder.loader)!r}"
                  .encode())
    root = Path(folder.root)
    for path, target in (folder.samples if indices is None else (folder.samples[i] for i in indices)):
        with open(path, "rb") as handle:
            content = handle.read()
        digest.update(f"\0{Path(path).relative_to(root)}\0{target}\0{len(content)}\0".encode())
        digest.update(content)


def training_settings(config: RunConfig, device: torch.device | str, *, limit: int | None = None) -> TrainConfig:
    """What `config` trains (`probe.ablate` and `probe.train` alike): the trainer's own defaults,
    the cached models' keys, wherever the config leaves a setting open. limit: train on the first
    `limit` samples (`probe.train --limit`; `probe.ablate`'s --limit samples the evaluated data)."""
    given = {"epochs": config.epochs, "batch_size": config.train_batch_size, "lr": config.lr,
             "momentum": config.momentum, "weight_decay": config.weight_decay}
    return TrainConfig(model=config.model, dataset=config.dataset, seed=config.seed, device=str(device),
                       limit=limit, data_root=config.data_root, download=config.download,
                       **{name: value for name, value in given.items() if value is not None})


def train_loader(config: RunConfig, *, model: nn.Module | None = None) -> Iterable:
    """Batches of the training split (a seeded, class-stratified sample of `limit` samples when
    asked), for what is fitted on training data (linear probes). An image folder has no training
    split of its own: `--calibration-root` names one, else this is refused; with `model`, it is
    read with the channels the model takes (`fit_channels`)."""
    config = fit_channels(config, model)
    if config.dataset == "images":
        raise ProbeError("--dataset images has no classes and no training split: nothing is fitted on it.")
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
