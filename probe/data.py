"""Data sets and loaders that probe measures and ablates on.

Every data set yields ``(image, label)`` items: a float32 tensor ``(channels, h, w)``, normalised
per channel, and an ``int`` label. The default, ``"digits"``, ships inside scikit-learn, so the
whole toolkit (tests, notebooks, the CLI) runs without a download. CIFAR-10/100 and MNIST are read
through torchvision from their usual on-disk formats; ``"imagefolder"`` reads any folder with one
subfolder per class.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, ImageFolder
from torchvision.datasets.folder import find_classes

from probe.errors import ProbeError, unknown_name

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "dataset_info",
    "default_data_root",
    "load_dataset",
    "make_loader",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "mnist", "imagefolder")
SPLITS: tuple[str, ...] = ("train", "test")

# Per-channel statistics of each training set (pixels in [0, 1]); the usual published values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# sklearn's digits are 8x8; 16x16 leaves room for a CIFAR-style net's two downsamplings.
DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
IMAGEFOLDER_DEFAULT_SIZE = 224


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set to be built for it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int


# Fixed-size data sets: (classes, channels, image size).
_FIXED: dict[str, tuple[int, int, int]] = {
    "digits": (10, 1, DIGITS_SIZE),
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "mnist": (10, 1, 28),
}


def default_data_root() -> Path:
    """Where downloaded data sets live.

    ``$XDG_CACHE_HOME/probe/data``, or ``~/.cache/probe/data`` when that variable is unset.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "probe" / "data"


def dataset_info(
    name: str, *, root: str | os.PathLike | None = None, image_size: int | None = None
) -> DatasetInfo:
    """Classes, channels and image size of data set `name`.

    For ``"imagefolder"`` the classes are counted from the subfolders of `root` and the image
    size is `image_size` (default 224); the other data sets have fixed sizes.
    """
    _check_name(name)
    size = _check_image_size(name, image_size)
    if name == "imagefolder":
        folder = _imagefolder_root(root)
        return DatasetInfo(name, len(_find_classes(folder)), 3, size)
    num_classes, in_channels, _ = _FIXED[name]
    return DatasetInfo(name, num_classes, in_channels, size)


def load_dataset(
    name: str = "digits",
    *,
    split: str = "test",
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
) -> Dataset:
    """The `split` ("train" or "test") of data set `name`, as ``(float32 (C, H, W), int)`` items.

    - ``digits``: sklearn's digits, upsampled to 16x16, a seeded stratified 80/20 split
      (`seed`), normalised with the train split's mean and std. Ignores `root` and `download`.
    - ``cifar10``, ``cifar100``, ``mnist``: torchvision's readers under `root` (default
      :func:`default_data_root`); files are fetched only when `download` is true.
    - ``imagefolder``: `root` holds one subfolder per class (read as given, whatever `split`);
      images are resized and centre-cropped to `image_size` (default 224).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ProbeError(f"unknown split {split!r}: use 'train' or 'test'.")
    size = _check_image_size(name, image_size)
    if name == "digits":
        images, labels = _digits_split(seed, split == "train")
        # Clones: callers may write into the tensors; the cached ones must stay as they are.
        return _LabelledTensors(images.clone(), labels.clone())
    if name == "imagefolder":
        return _load_imagefolder(_imagefolder_root(root), size)
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    return _load_torchvision(name, data_root, train=split == "train", download=download)


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
    )


# --- validation -------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)


def _check_image_size(name: str, image_size: int | None) -> int:
    """The image size to use; only imagefolder can be resized, the others keep their own."""
    if name == "imagefolder":
        size = IMAGEFOLDER_DEFAULT_SIZE if image_size is None else image_size
        if size < 1:
            raise ProbeError(f"image_size must be at least 1, got {size}.")
        return size
    native = _FIXED[name][2]
    if image_size is not None and image_size != native:
        raise ProbeError(
            f"image_size {image_size} does not apply to {name!r}, whose images are "
            f"{native}x{native}; image_size only resizes 'imagefolder' data."
        )
    return native


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
    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError as err:
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has no class subfolders; put each class's "
            "images in their own subfolder."
        ) from err
    return classes


# --- digits -----------------------------------------------------------------------------------


def _upsample(images: torch.Tensor, size: int = DIGITS_SIZE) -> torch.Tensor:
    """Bilinear upsampling of (n, 1, h, w) images to (n, 1, size, size)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=8)
def _digits_arrays(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) for `seed`; cached per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

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


def _normalized(
    mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> transforms.Compose:
    steps = [] if resize is None else [transforms.Resize(resize), transforms.CenterCrop(resize)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def _load_imagefolder(folder: Path, size: int) -> Dataset:
    _find_classes(folder)  # a clear error for a folder without class subfolders
    try:
        return ImageFolder(folder, transform=_normalized(IMAGENET_MEAN, IMAGENET_STD, size))
    except FileNotFoundError as err:
        raise ProbeError(
            f"imagefolder root {str(folder)!r} has class subfolders but no images in them "
            f"({err})."
        ) from err


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


def _load_torchvision(name: str, root: Path, *, train: bool, download: bool) -> Dataset:
    if name == "cifar10":
        make, transform = _CIFAR10, _normalized(CIFAR10_MEAN, CIFAR10_STD)
        where = root / _CIFAR10.base_folder
        expected = "data_batch_1..5, test_batch, batches.meta"
    elif name == "cifar100":
        make, transform = _CIFAR100, _normalized(CIFAR100_MEAN, CIFAR100_STD)
        where = root / _CIFAR100.base_folder
        expected = "train, test, meta"
    else:
        # Plain MNIST: it reads the raw idx files without checksums, and its folder name
        # (root/MNIST/raw) comes from the class name, which a subclass would change.
        make, transform = MNIST, _normalized(MNIST_MEAN, MNIST_STD)
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
