"""Data sets and loaders that probe measures and ablates on.

Every data set yields ``(image, label)`` items: a float32 tensor ``(channels, h, w)``, normalised
per channel, and an ``int`` label. The default, ``"digits"``, ships inside scikit-learn, so the
whole toolkit (tests, notebooks, the CLI) runs without a download. CIFAR-10/100 and MNIST are read
through torchvision from their usual on-disk formats; ``"imagefolder"`` reads any folder with one
subfolder per class. Each loaded data set's ``.info`` (a :class:`DatasetInfo`) says how its images
were prepared, and :func:`stratified_subset` / :func:`split_off` draw class-balanced samples.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from probe.errors import ProbeError, unknown_name
from probe.loading.images import check_range, read_image, readable

__all__ = [
    "DATASETS",
    "NORMALIZATIONS",
    "DatasetInfo",
    "dataset_info",
    "dataset_targets",
    "default_data_root",
    "load_dataset",
    "make_loader",
    "split_off",
    "stratified_subset",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "mnist", "imagefolder")
SPLITS: tuple[str, ...] = ("train", "test")
# Subfolder names that are splits, not classes: an imagefolder root one level too high holds them.
SPLIT_FOLDER_NAMES: tuple[str, ...] = ("train", "test", "val", "valid", "validation")

# Per-channel statistics of each training set (pixels in [0, 1]); the usual published values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# `normalize=` names: (mean, std) of pixels in [0, 1], per channel; a single value serves every
# channel. "none" leaves pixels in [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "none": ((0.0,), (1.0,)),
}
# The digits are normalised with one mean and std of their own train split (seed-dependent).
DIGITS_NORMALIZATION = "train-split"

# sklearn's digits are 8x8; 16x16 leaves room for a CIFAR-style net's two downsamplings.
DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
# For a folder whose images differ in size (or are not square): the usual ImageNet eval size.
IMAGEFOLDER_DEFAULT_SIZE = 224


# Fixed-size data sets: (classes, channels, image size).
_FIXED: dict[str, tuple[int, int, int]] = {
    "digits": (10, 1, DIGITS_SIZE),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "mnist": (10, 1, 28),
}
# Channels as read from disk (ImageFolder's loader converts every image to RGB).
_NATIVE_CHANNELS = {**{name: spec[1] for name, spec in _FIXED.items()}, "imagefolder": 3}
_DEFAULT_NORMALIZE = {
    "digits": DIGITS_NORMALIZATION,
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "mnist": "mnist",
    "imagefolder": "imagenet",
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set to be built for it, and how its images are
    prepared; ``dataclasses.asdict(info)`` is what a run record stores.

    `normalize` is the normalisation applied, as a canonical `normalize=` value: a name in
    `NORMALIZATIONS`, numbers ``"MEAN,STD"`` or ``"M1,M2,M3,S1,S2,S3"``, or ``"train-split"``
    (digits). Left out, it stands for the data set's default, so
    ``DatasetInfo("cifar10", 10, 3, 32) == dataset_info("cifar10")``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.normalize is None:
            object.__setattr__(self, "normalize", _DEFAULT_NORMALIZE.get(self.name))


def default_data_root() -> Path:
    """Where downloaded data sets live.

    ``$XDG_CACHE_HOME/probe/data``, or ``~/.cache/probe/data`` when that variable is unset.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "probe" / "data"


def dataset_info(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    normalize: str | None = None,
    in_channels: int | None = None,
) -> DatasetInfo:
    """Classes, channels, image size and normalisation of data set `name`, exactly as
    :func:`load_dataset` with the same arguments prepares it (its ``.info``); reads no pixels.

    For ``"imagefolder"`` the classes are the subfolders of `root`, and the image size is
    `image_size`, else the images' own size when all are square and of one size (read from each
    file's header), else 224. The other data sets have fixed sizes.
    """
    return _resolve(name, root, image_size, normalize, in_channels)[0]


def load_dataset(
    name: str = "digits",
    *,
    split: str = "test",
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    normalize: str | None = None,
    in_channels: int | None = None,
) -> Dataset:
    """The `split` ("train" or "test") of data set `name`, as ``(float32 (C, H, W), int)`` items.

    - ``digits``: sklearn's digits, upsampled to 16x16, a seeded stratified 80/20 split
      (`seed`), normalised with the train split's mean and std. Ignores `root` and `download`.
    - ``cifar10``, ``cifar100``, ``mnist``: torchvision's readers under `root` (default
      :func:`default_data_root`); files are fetched only when `download` is true.
    - ``imagefolder``: `root` holds one subfolder per class (read as given, whatever `split`).
      Images keep their own size when all are square and of one size; otherwise, or when
      `image_size` is given, they are resized and centre-cropped to `image_size` (default 224).
      A root with a single subfolder, or with subfolders named like splits ("train", "test",
      "val", ...), is refused: it is the folder above the classes.

    `normalize`: a name in `NORMALIZATIONS` (``imagenet``, ``cifar10``, ``cifar100``, ``mnist``,
    ``none``), ``"MEAN,STD"`` for every channel, or ``"M1,M2,M3,S1,S2,S3"`` per channel, for
    pixels in [0, 1]. Default: the data set's own statistics (``imagenet`` for imagefolder);
    the digits always use their train split's. `in_channels`: 1 converts images to grey (PIL's
    ITU-R 601-2 luma), 3 repeats a grey image's value in three channels; default: the data
    set's own (imagefolder: 3).

    The returned data set's ``.info`` is its :class:`DatasetInfo`.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ProbeError(f"unknown split {split!r}: use 'train' or 'test'.")
    info, resize = _resolve(name, root, image_size, normalize, in_channels)
    if name == "digits":
        images, labels = _digits_split(seed, split == "train")
        # repeat and clone copy: callers may write into the tensors, the cached ones must stay.
        dataset: Dataset = _LabelledTensors(images.repeat(1, info.in_channels, 1, 1),
                                            labels.clone())
    elif name == "imagefolder":
        dataset = ImageFolder(_imagefolder_root(root), transform=_transform(info, resize=resize), loader=read_image)
        # The images differ in size (or are not square) and no size was asked for: 224 was chosen.
        dataset.mixed_sizes = resize and image_size is None
    else:
        data_root = Path(root).expanduser() if root is not None else default_data_root()
        dataset = _load_torchvision(name, data_root, train=split == "train", download=download,
                                    transform=_transform(info, resize=False))
    dataset.info = info
    return dataset


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
    pin_memory: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over `dataset`, or over its first `limit` samples.

    Shuffling draws from a generator seeded with `seed`, so two loaders made alike give the
    same batches in the same order.
    """
    if batch_size < 1:
        raise ProbeError(f"batch_size must be at least 1, got {batch_size}.")
    if limit is not None:
        if limit < 1:
            raise ProbeError(f"limit must be at least 1 (or None for all samples), got {limit}.")
        # The first `limit` samples, not a random subset: the same images on every run.
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if num_workers < 0:
        raise ProbeError(f"num_workers must be 0 or more, got {num_workers}.")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        pin_memory=pin_memory,
        num_workers=num_workers,
        collate_fn=_collate_of(dataset),
    )


def _collate_of(dataset: Dataset) -> Callable | None:
    """The data set's own way to batch its items (`collate`, through any Subsets: a detection
    image set keeps each image's boxes apart), or None for the default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", None)


# --- samples that represent the data ----------------------------------------------------------


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Every sample's label, int64 of shape ``(len(dataset),)``, in data order.

    Read without loading images where the data set keeps its labels apart: a ``targets``
    attribute (torchvision's ImageFolder, CIFAR, MNIST), a TensorDataset's second tensor, and
    Subsets and ConcatDatasets of these. Any other data set is indexed sample by sample.
    """
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return dataset_targets(dataset.dataset)[indices]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(part) for part in dataset.datasets])
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        targets = dataset.tensors[1]
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    # A copy, so that writing into the result never changes the data set's labels.
    return torch.as_tensor(targets).to(torch.int64, copy=True)


def stratified_subset(dataset: Dataset, n: int, *, seed: int = 0) -> Subset:
    """A seeded sample of `n` items of `dataset` in which every class keeps its share.

    Class c gets ``n * count_c / len(dataset)`` items, rounded by largest remainder (ties go to
    the more frequent class, then the lower label) so that the counts add up to `n`. Within a
    class the items are drawn uniformly by a generator seeded with `seed`. The indices are
    sorted in data order; the same data, `n` and `seed` give the same subset.
    """
    _check_count("stratified_subset", n, len(dataset), len(dataset))
    return Subset(dataset, _stratified_indices(dataset_targets(dataset), n, seed).tolist())


def split_off(dataset: Dataset, n: int, *, seed: int = 0) -> tuple[Subset, Subset]:
    """`dataset` in two disjoint parts: a stratified sample of `n` items (as
    :func:`stratified_subset`), e.g. to recalibrate BatchNorm on, and every other item; both in
    data order."""
    total = len(dataset)
    _check_count("split_off", n, total - 1, total)
    picked = _stratified_indices(dataset_targets(dataset), n, seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[picked] = False
    rest = torch.nonzero(keep).flatten()
    return Subset(dataset, picked.tolist()), Subset(dataset, rest.tolist())


def _check_count(caller: str, n: int, most: int, total: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise ProbeError(
            f"{caller}: n must be an integer from 1 to {most} (the data set has {total} "
            f"samples), got {n!r}."
        )


def _stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-proportional, seeded sample of `n` of `labels`."""
    classes, counts = torch.unique(labels, return_counts=True)  # classes in increasing order
    # Integer arithmetic, so that equal remainders really are equal.
    share = torch.div(counts * n, len(labels), rounding_mode="floor")
    remainder = counts * n - share * len(labels)
    by_remainder = sorted(range(len(classes)),
                          key=lambda i: (-int(remainder[i]), -int(counts[i]), i))
    share[by_remainder[: n - int(share.sum())]] += 1
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, count, k in zip(classes.tolist(), counts.tolist(), share.tolist()):
        members = torch.nonzero(labels == label).flatten()  # (count,), in data order
        picked.append(members[torch.randperm(count, generator=generator)[:k]])
    return torch.cat(picked).sort().values


# --- validation -------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)


def _resolve(
    name: str,
    root: str | os.PathLike | None,
    image_size: int | None,
    normalize: str | None,
    in_channels: int | None,
) -> tuple[DatasetInfo, bool]:
    """The DatasetInfo these arguments give, and whether images are resized to its size."""
    _check_name(name)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ProbeError(f"image_size must be an integer of at least 1, got {image_size!r}.")
    if in_channels is not None and (isinstance(in_channels, bool) or in_channels not in (1, 3)):
        raise ProbeError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}.")
    channels = _NATIVE_CHANNELS[name] if in_channels is None else in_channels
    if name == "imagefolder":
        classes, files = _imagefolder_files(_imagefolder_root(root))
        native = _common_square_size(files) if image_size is None else None
        size = image_size or native or IMAGEFOLDER_DEFAULT_SIZE
        num_classes, resize = len(classes), native is None
    else:
        num_classes, _, size = _FIXED[name]
        if image_size is not None and image_size != size:
            raise ProbeError(
                f"image_size {image_size} does not apply to {name!r}, whose images are "
                f"{size}x{size}; image_size only resizes 'imagefolder' data."
            )
        resize = False
    normalization = _check_normalize(name, normalize, channels)
    return DatasetInfo(name, num_classes, channels, size, normalization), resize


def _check_normalize(name: str, normalize: str | None, channels: int) -> str:
    """The canonical `normalize=` value for data set `name` with `channels` channels."""
    if name == "digits":
        if normalize not in (None, DIGITS_NORMALIZATION):
            raise ProbeError(
                f"normalize {normalize!r} does not apply to 'digits', which are normalised with "
                "their train split's mean and std; normalize sets cifar10, cifar100, mnist and "
                "imagefolder data."
            )
        return DIGITS_NORMALIZATION
    if normalize is None:
        spec = _DEFAULT_NORMALIZE[name]
        return _parse_normalize(spec, channels, f"{spec!r} (the default for {name!r})")[0]
    return _parse_normalize(normalize, channels, repr(normalize))[0]


def _parse_normalize(
    spec: str, channels: int, shown: str
) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """(canonical spec, mean, std) of a `normalize=` value for images of `channels` channels."""
    names = ", ".join(NORMALIZATIONS)
    key = spec.strip().lower() if isinstance(spec, str) else ""
    if key in NORMALIZATIONS:
        canonical, (mean, std) = key, NORMALIZATIONS[key]
    else:
        try:
            numbers = [float(part) for part in key.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) < 2 or len(numbers) % 2 or not all(map(math.isfinite, numbers)):
            raise ProbeError(
                f"unknown normalize {shown}: use a name ({names}), 'MEAN,STD' for every channel, "
                "or 'M1,M2,M3,S1,S2,S3' per channel (pixels in [0, 1])."
            )
        half = len(numbers) // 2
        mean, std = tuple(numbers[:half]), tuple(numbers[half:])
        if min(std) <= 0:
            raise ProbeError(f"normalize {shown} has a std of {min(std)!r}; every std must be > 0.")
        canonical = ",".join(repr(x) for x in numbers)
    if len(mean) not in (1, channels):
        raise ProbeError(
            f"normalize {shown} gives statistics for {len(mean)} channels, but the images have "
            f"{channels}; give one 'MEAN,STD' for every channel, or one mean and std per channel."
        )
    return canonical, mean, std


def _imagefolder_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ProbeError(
            "dataset 'imagefolder' needs a root (CLI: --data-root) naming a folder with one "
            "subfolder per class."
        )
    folder = Path(root).expanduser()
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise ProbeError(
            f"imagefolder root {str(folder)!r} {what}; point --data-root at a folder with one "
            "subfolder per class."
        )
    return folder


def _find_classes(folder: Path) -> list[str]:
    """The class subfolders of `folder`; refuses a folder that is the one above the classes."""
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError as err:
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has no class subfolders; put each class's "
            "images in their own subfolder."
        ) from err
    splits = [c for c in classes if c.lower() in SPLIT_FOLDER_NAMES]
    if splits:
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has subfolders named like splits "
            f"({', '.join(map(repr, splits))}), not classes; point --data-root at the split's "
            f"own folder, e.g. {str(folder / splits[0])!r}."
        )
    if len(classes) > 1:
        _refuse_classes_without_images(folder, classes)
    if len(classes) == 1:
        inner = sorted(p.name for p in (folder / classes[0]).iterdir() if p.is_dir())
        hint = (
            f"its subfolders ({', '.join(inner[:4])}{', ...' if len(inner) > 4 else ''}) look "
            f"like the classes: point --data-root at {str(folder / classes[0])!r}"
            if inner else "a classification data set needs one subfolder per class, two or more"
        )
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has a single class subfolder {classes[0]!r}; "
            f"{hint}."
        )
    return classes


def _refuse_classes_without_images(folder: Path, classes: list[str]) -> None:
    """Refuse a root two or more levels above the classes: its "classes" hold no image of their
    own, only sub-folders (say `datasets/` holding `cifar10/test/<classes>` and `svhn/test/...`),
    which ImageFolder would read as a few classes holding every image below them."""
    inner: dict[str, list[str]] = {}
    for name in classes:
        entries = list((folder / name).iterdir())
        if any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries):
            return
        inner[name] = sorted(entry.name for entry in entries if entry.is_dir())
        if not inner[name]:
            return  # an empty class: make_dataset names it
    # The folder under the first "class" whose sub-folders hold images: where the classes likely are.
    below = folder / classes[0]
    for _ in range(8):
        subfolders = sorted(entry for entry in below.iterdir() if entry.is_dir())
        if not subfolders or any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
                                 for sub in subfolders for entry in sub.iterdir()):
            break
        below = subfolders[0]
    shown = ", ".join(f"{name}/{inner[name][0]}" for name in classes[:3]) + (", ..." if len(classes) > 3 else "")
    raise ProbeError(
        f"imagefolder root {str(folder)!r} is more than one level above the classes: its subfolders hold no "
        f"images, only more subfolders ({shown}); point --data-root at the folder whose subfolders hold the "
        f"images, e.g. {str(below)!r}."
    )


def _imagefolder_files(folder: Path) -> tuple[list[str], list[str]]:
    """(classes, image paths) of an imagefolder root, as ImageFolder finds them."""
    classes = _find_classes(folder)
    try:
        samples = make_dataset(folder, {c: i for i, c in enumerate(classes)},
                               extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        found = {classes[target] for _, target in
                 make_dataset(folder, {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                              allow_empty=True)}
        if found:  # some classes hold images: name those that do not
            empty = [c for c in classes if c not in found]
            raise ProbeError(
                f"imagefolder root {str(folder)!r}: class subfolder(s) {', '.join(map(repr, empty))} hold no "
                f"images ({', '.join(IMG_EXTENSIONS)}); add their images, or move the folder(s) out of the root."
            ) from err
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has class subfolders but no images in them "
            f"({err})."
        ) from err
    return classes, [path for path, _ in samples]


def _common_square_size(files: Sequence[str]) -> int | None:
    """The images' side when all are square and of one size, else None.

    Reads only each file's header: PIL decodes pixel data on first access, which never comes.
    An image read here whose pixels have no known range is refused already (`probe.loading.images`).
    """
    first = None
    for path in files:
        with readable(path):
            with Image.open(path) as image:
                size = image.size
                check_range(image, path)
        if size[0] != size[1] or (first is not None and size != first):
            return None
        first = size
    return None if first is None else first[0]


# --- digits -----------------------------------------------------------------------------------


def _upsample(images: torch.Tensor, size: int = DIGITS_SIZE) -> torch.Tensor:
    """Bilinear upsampling of (n, 1, h, w) images to (n, 1, size, size)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=8)
def _digits_arrays(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) for `seed`; cached per process."""
    digits = load_digits()
    # Pixel values are integers 0..16; (1797, 64) -> (1797, 1, 8, 8) in [0, 1].
    raw = torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    images = _upsample(raw)  # (1797, 1, 16, 16)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    # One scalar mean/std from the train split only, so the test split carries no information
    # into its own normalisation.
    train = images[train_idx]
    mean, std = train.mean(), train.std(unbiased=False)
    train = (train - mean) / std
    test = (images[test_idx] - mean) / std
    return train, labels[train_idx], test, labels[test_idx]


class _LabelledTensors(TensorDataset):
    """A TensorDataset whose items are ``(image, int label)``, like torchvision's data sets."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, int(label)


def _digits_split(seed: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    train_x, train_y, test_x, test_y = _digits_arrays(int(seed))
    return (train_x, train_y) if train else (test_x, test_y)


# --- torchvision data sets --------------------------------------------------------------------


def _transform(info: DatasetInfo, *, resize: bool) -> transforms.Compose:
    """PIL image -> float32 ``(info.in_channels, info.image_size, info.image_size)`` tensor."""
    steps: list[Callable] = []
    if info.in_channels != _NATIVE_CHANNELS[info.name]:
        # PIL: grey is L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded; grey to three
        # channels repeats L.
        steps.append(transforms.Grayscale(num_output_channels=info.in_channels))
    if resize:
        steps += [transforms.Resize(info.image_size), transforms.CenterCrop(info.image_size)]
    steps.append(transforms.ToTensor())
    if info.normalize != "none":
        _, mean, std = _parse_normalize(info.normalize, info.in_channels, repr(info.normalize))
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


class _FilesExist:
    """Mixin for torchvision's CIFAR readers: without download, the files need only exist.

    torchvision checks every file's md5 before reading, so any copy that is not byte-for-byte
    the official archive (a re-pickled copy, a test fixture) is refused as "corrupted". The md5
    check still runs when downloading, where it decides whether to fetch again.
    """

    def __init__(
        self, root: Path, *, train: bool, transform: Callable | None, download: bool
    ) -> None:
        self._verify_md5 = download
        super().__init__(root, train=train, transform=transform, download=download)

    def _needed_files(self) -> list[str]:
        batches = self.train_list if self.train else self.test_list
        return [name for name, _ in batches] + [self.meta["filename"]]

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name in self._needed_files())

    def _load_meta(self) -> None:
        if self._verify_md5:
            return super()._load_meta()
        # As torchvision reads it, minus the md5 check; latin1 decodes the Python 2 pickles.
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


# Module-level so that DataLoader workers started by "spawn" can unpickle the data set.
class _CIFAR10(_FilesExist, CIFAR10):
    pass


class _CIFAR100(_FilesExist, CIFAR100):
    pass


def _load_torchvision(
    name: str, root: Path, *, train: bool, download: bool, transform: Callable
) -> Dataset:
    if name == "cifar10":
        make, where = _CIFAR10, root / _CIFAR10.base_folder
        expected = "data_batch_1..5, test_batch, batches.meta"
    elif name == "cifar100":
        make, where = _CIFAR100, root / _CIFAR100.base_folder
        expected = "train, test, meta"
    else:
        # Plain MNIST: it reads the raw idx files without checksums, and its folder name
        # (root/MNIST/raw) comes from the class name, which a subclass would change.
        make = MNIST
        where = root / "MNIST" / "raw"
        expected = (
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
        )
    try:
        return make(root, train=train, transform=transform, download=download)
    except RuntimeError as err:
        if download:
            raise ProbeError(
                f"could not download or verify {name} into {str(root)!r}: {err}"
            ) from err
        raise ProbeError(
            f"{name} not found under data root {str(root)!r} (expected {expected} in "
            f"{str(where)!r}). Pass download=True (CLI: --download) to fetch it, or point "
            "--data-root at the folder that holds it."
        ) from err
    except OSError as err:
        # Network failures (URLError) when downloading.
        if not download:
            raise
        raise ProbeError(f"could not download {name} into {str(root)!r}: {err}") from err
