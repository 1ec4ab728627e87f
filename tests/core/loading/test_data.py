"""Tests for probe.loading.datasets: exact pixel values from files written in each data set's real format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from probe.loading import datasets as data
from probe.loading.datasets import (
    DATASETS,
    DatasetInfo,
    dataset_info,
    dataset_targets,
    default_data_root,
    load_dataset,
    make_loader,
    split_off,
    stratified_subset,
)
from probe.errors import ProbeError

torch.set_num_threads(1)


# --- helpers: files in the real on-disk formats ------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` opcodes, as the official CIFAR pickles (made by
    Python 2's cPickle) do: they load as `str` with encoding="latin1" (torchvision's way) and as
    `bytes` with encoding="bytes" (b"data", b"labels")."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj: dict, path: Path) -> None:
    def encode(value):
        if isinstance(value, str):
            return value.encode("latin1")
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    py2 = {k.encode("latin1"): encode(v) for k, v in obj.items()}
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(py2)


def _cifar_pixels(seed: int, n: int = 2) -> np.ndarray:
    """(n, 3072) uint8 rows: 1024 red, then 1024 green, then 1024 blue values, row-major."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _expected(rows: np.ndarray, channels: int, size: int, mean, std) -> np.ndarray:
    """ToTensor + Normalize, by hand in float64."""
    x = rows.reshape(-1, channels, size, size).astype(np.float64) / 255.0
    return (x - np.array(mean).reshape(1, -1, 1, 1)) / np.array(std).reshape(1, -1, 1, 1)


def _write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                              "data_batch_5", "test_batch"]):
        pixels, labels = _cifar_pixels(i), [(2 * i) % 10, (2 * i + 7) % 10]
        _py2_pickle(
            {"batch_label": f"batch {i}", "labels": labels, "data": pixels,
             "filenames": [f"img_{i}_0.png", f"img_{i}_1.png"]},
            folder / name,
        )
        written[name] = (pixels, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]
    _py2_pickle({"num_cases_per_batch": 2, "label_names": names, "num_vis": 3072},
                folder / "batches.meta")
    return written


def _write_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate(["train", "test"]):
        pixels, fine, coarse = _cifar_pixels(10 + i), [57 + i, 99 - i], [3, 19]
        _py2_pickle(
            {"filenames": ["a.png", "b.png"], "batch_label": name, "fine_labels": fine,
             "coarse_labels": coarse, "data": pixels},
            folder / name,
        )
        written[name] = (pixels, fine)
    _py2_pickle({"fine_label_names": [f"fine{i}" for i in range(100)],
                 "coarse_label_names": [f"coarse{i}" for i in range(20)]}, folder / "meta")
    return written


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    """An MNIST idx file: big-endian magic number and dimensions, then the uint8 values."""
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    written = {}
    for prefix, labels in [("train", [5, 0, 4]), ("t10k", [7, 2])]:
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.array(labels))
        written[prefix] = (images, np.array(labels))
    return written


def _stack(dataset) -> tuple[torch.Tensor, list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), [y for _, y in items]


# --- digits ------------------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=False, by hand:
    output i samples input position (i + 0.5) * n_in / n_out - 0.5, clamped at the edges."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        weights[i, lo] += 1 - frac
        weights[i, hi] += frac
    return weights


def test_digits_sizes_shapes_and_classes():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits")  # the default split is "test"
    assert (len(train), len(test)) == (1437, 360)
    image, label = test[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int)
    assert train.tensors[1].dtype == torch.int64
    assert set(train.tensors[1].tolist()) == set(range(10))
    assert set(test.tensors[1].tolist()) == set(range(10))
    # Stratified: each class is in the test split in proportion, 36 +- 1 of 360.
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_same_seed_same_split_other_seed_other_split():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert not torch.equal(a.tensors[1], c.tensors[1])


def test_digits_returned_tensors_do_not_share_the_cache():
    first = load_dataset("digits", split="train")
    kept = first.tensors[0][0].clone()
    first.tensors[0].zero_()
    assert torch.equal(load_dataset("digits", split="train").tensors[0][0], kept)


def test_digits_train_normalisation():
    images = load_dataset("digits", split="train").tensors[0]
    assert abs(images.mean().item()) < 1e-5
    assert images.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    # The test split uses the train statistics, so its own are close but not exactly 0 and 1.
    test = load_dataset("digits").tensors[0]
    assert abs(test.mean().item()) < 0.1 and test.std().item() == pytest.approx(1.0, abs=0.1)


def test_digits_exact_values_against_hand_computation():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    up = _bilinear_matrix(8, 16)
    raw = digits.data.reshape(-1, 8, 8) / 16.0
    upsampled = np.einsum("ia,nab,jb->nij", up, raw, up)  # (1797, 16, 16)
    train_idx, test_idx = train_test_split(
        np.arange(len(raw)), test_size=0.2, random_state=0, stratify=digits.target
    )
    mean, std = upsampled[train_idx].mean(), upsampled[train_idx].std()
    for split, idx in [("train", train_idx), ("test", test_idx)]:
        images, labels = load_dataset("digits", split=split).tensors
        expected = (upsampled[idx] - mean) / std
        np.testing.assert_allclose(images[:, 0].numpy(), expected, atol=1e-5)
        assert labels.tolist() == digits.target[idx].tolist()


def test_upsample_constant_and_hand_computed_ramp():
    constant = torch.full((1, 1, 8, 8), 0.375)
    assert torch.equal(data._upsample(constant), torch.full((1, 1, 16, 16), 0.375))
    # A horizontal ramp 0, 1, ..., 7: output column j samples x = j/2 - 0.25, clamped to [0, 7].
    ramp = torch.arange(8.0).repeat(8, 1).reshape(1, 1, 8, 8)
    row = data._upsample(ramp)[0, 0, 5]
    expected = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25,
                3.75, 4.25, 4.75, 5.25, 5.75, 6.25, 6.75, 7.0]
    assert row.tolist() == pytest.approx(expected, abs=1e-6)


# --- CIFAR and MNIST files ---------------------------------------------------------------------


def test_cifar10_reads_real_format_files_with_exact_values(tmp_path):
    written = _write_cifar10(tmp_path)
    test = load_dataset("cifar10", split="test", root=tmp_path)
    images, labels = _stack(test)
    pixels, expected_labels = written["test_batch"]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    np.testing.assert_allclose(
        images.numpy(), _expected(pixels, 3, 32, data.CIFAR10_MEAN, data.CIFAR10_STD), atol=1e-5
    )
    assert labels == expected_labels
    # Pixel (channel 2, row 0, col 1) is byte 2048 + 1 of the row, by hand.
    assert images[1, 2, 0, 1].item() == pytest.approx(
        (pixels[1, 2049] / 255 - 0.4465) / 0.2616, abs=1e-5
    )
    assert test.classes[3] == "cat"

    train = load_dataset("cifar10", split="train", root=str(tmp_path))
    images, labels = _stack(train)
    assert len(train) == 10
    assert labels == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_allclose(
        images[8:].numpy(),
        _expected(written["data_batch_5"][0], 3, 32, data.CIFAR10_MEAN, data.CIFAR10_STD),
        atol=1e-5,
    )


def test_cifar_fixture_loads_as_bytes_keys_too(tmp_path):
    # The fixture is in the official Python 2 format: bytes keys when read with encoding="bytes".
    _write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)
    assert entry[b"labels"] == [0, 7]


def test_cifar100_reads_fine_labels_and_exact_values(tmp_path):
    written = _write_cifar100(tmp_path)
    for split in ["train", "test"]:
        dataset = load_dataset("cifar100", split=split, root=tmp_path)
        images, labels = _stack(dataset)
        pixels, fine = written[split]
        np.testing.assert_allclose(
            images.numpy(),
            _expected(pixels, 3, 32, data.CIFAR100_MEAN, data.CIFAR100_STD),
            atol=1e-5,
        )
        assert labels == fine
    assert len(dataset.classes) == 100


def test_mnist_reads_idx_files_with_exact_values(tmp_path):
    written = _write_mnist(tmp_path)
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        dataset = load_dataset("mnist", split=split, root=tmp_path)
        images, labels = _stack(dataset)
        raw, expected_labels = written[prefix]
        assert images.shape == (len(raw), 1, 28, 28)
        np.testing.assert_allclose(
            images.numpy(),
            _expected(raw.reshape(len(raw), -1), 1, 28, data.MNIST_MEAN, data.MNIST_STD),
            atol=1e-5,
        )
        assert labels == expected_labels.tolist()


def test_imagefolder_classes_shape_and_values(tmp_path):
    colours = {"cat": (255, 0, 51), "dog": (0, 128, 255)}
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 6), colour).save(tmp_path / name / "a.png")
    dataset = load_dataset("imagefolder", root=tmp_path, image_size=4)
    assert dataset.classes == ["cat", "dog"]
    images, labels = _stack(dataset)
    assert images.shape == (2, 3, 4, 4) and labels == [0, 1]
    # A one-colour image stays one colour through Resize and CenterCrop.
    dog = np.array([[c] * 16 for c in colours["dog"]], dtype=np.uint8).reshape(1, -1)
    expected = _expected(dog, 3, 4, data.IMAGENET_MEAN, data.IMAGENET_STD)
    np.testing.assert_allclose(images[1:].numpy(), expected, atol=1e-5)
    assert dataset_info("imagefolder", root=tmp_path) == DatasetInfo("imagefolder", 2, 3, 224)
    assert dataset_info("imagefolder", root=tmp_path, image_size=4).image_size == 4


def test_cifar10_with_imagenet_statistics(tmp_path):
    # A model trained with ImageNet statistics needs them on CIFAR-10 too.
    pixels, _ = _write_cifar10(tmp_path)["test_batch"]
    test = load_dataset("cifar10", root=tmp_path, normalize="imagenet")
    assert test.info == DatasetInfo("cifar10", 10, 3, 32, "imagenet")
    images, _ = _stack(test)
    np.testing.assert_allclose(
        images.numpy(), _expected(pixels, 3, 32, data.IMAGENET_MEAN, data.IMAGENET_STD),
        atol=1e-5,
    )
    assert images[1, 2, 0, 1].item() == pytest.approx((pixels[1, 2049] / 255 - 0.406) / 0.225,
                                                      abs=1e-5)


def test_cifar10_in_grey(tmp_path):
    pixels, _ = _write_cifar10(tmp_path)["test_batch"]
    grey = load_dataset("cifar10", root=tmp_path, in_channels=1, normalize="0.5,0.25")
    assert grey.info == DatasetInfo("cifar10", 10, 1, 32, "0.5,0.25")
    images, _ = _stack(grey)
    assert images.shape == (2, 1, 32, 32)
    # PIL's ITU-R 601-2 luma in its integer form: (299 R + 587 G + 114 B) / 1000, rounded.
    rgb = pixels.reshape(2, 3, 32, 32).astype(np.int64)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    np.testing.assert_allclose(images[:, 0].numpy(), (luma / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ProbeError, match=r"normalize 'cifar10' \(the default for 'cifar10'\) "
                                         "gives statistics for 3 channels"):
        load_dataset("cifar10", root=tmp_path, in_channels=1)


def test_cifar100_and_mnist_accept_normalize_and_channels(tmp_path):
    pixels, _ = _write_cifar100(tmp_path)["test"]
    images, _ = _stack(load_dataset("cifar100", root=tmp_path, normalize="none"))
    np.testing.assert_allclose(images.numpy(), _expected(pixels, 3, 32, (0.0,), (1.0,)),
                               atol=1e-6)
    raw, _ = _write_mnist(tmp_path)["t10k"]
    rgb = load_dataset("mnist", root=tmp_path, in_channels=3)
    assert rgb.info == DatasetInfo("mnist", 10, 3, 28, "mnist")
    images, _ = _stack(rgb)
    assert images.shape == (2, 3, 28, 28)
    one = _expected(raw.reshape(2, -1), 1, 28, data.MNIST_MEAN, data.MNIST_STD)
    np.testing.assert_allclose(images.numpy(), np.repeat(one, 3, axis=1), atol=1e-5)


def test_digits_channels_and_normalize():
    grey = load_dataset("digits")
    rgb = load_dataset("digits", in_channels=3)
    assert rgb.info == DatasetInfo("digits", 10, 3, 16, "train-split")
    assert torch.equal(rgb.tensors[0], grey.tensors[0].repeat(1, 3, 1, 1))
    assert load_dataset("digits", normalize="train-split").info == grey.info
    with pytest.raises(ProbeError, match="normalize 'imagenet' does not apply to 'digits'"):
        load_dataset("digits", normalize="imagenet")


# --- info, roots, loaders ----------------------------------------------------------------------


def test_dataset_info_values():
    assert DATASETS == ("digits", "cifar10", "cifar100", "mnist", "imagefolder")
    assert dataset_info("digits") == DatasetInfo("digits", 10, 1, 16)
    assert dataset_info("cifar10") == DatasetInfo("cifar10", 10, 3, 32)
    assert dataset_info("cifar100") == DatasetInfo("cifar100", 100, 3, 32)
    assert dataset_info("mnist") == DatasetInfo("mnist", 10, 1, 28)


def test_dataset_info_reports_normalisation():
    assert [dataset_info(name).normalize for name in DATASETS[:4]] == [
        "train-split", "cifar10", "cifar100", "mnist"
    ]
    assert dataset_info("cifar10", normalize="imagenet") == DatasetInfo(
        "cifar10", 10, 3, 32, "imagenet"
    )
    assert dataset_info("cifar10", normalize="imagenet") != dataset_info("cifar10")
    assert dataset_info("mnist", in_channels=3, normalize="0.5,0.5") == DatasetInfo(
        "mnist", 10, 3, 28, "0.5,0.5"
    )


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_root() == tmp_path / "probe" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_root() == tmp_path / "home" / ".cache" / "probe" / "data"


def test_make_loader_limit_and_batches():
    dataset = load_dataset("digits")
    batches = list(make_loader(dataset, batch_size=4, limit=10))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b for b, _ in batches])
    assert torch.equal(x, dataset.tensors[0][:10])
    assert torch.cat([y for _, y in batches]).dtype == torch.int64
    assert len(make_loader(dataset, limit=10_000).dataset) == 360


def test_make_loader_shuffle_is_seeded():
    # Items are their own indices, so a batch is the order the loader chose.
    dataset = torch.utils.data.TensorDataset(torch.arange(50), torch.zeros(50))

    def order(seed: int) -> list[int]:
        loader = make_loader(dataset, batch_size=7, shuffle=True, seed=seed)
        return torch.cat([x for x, _ in loader]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(50)) and order(0) != list(range(50))
    # With a limit, the first samples are kept and then shuffled.
    limited = torch.cat([x for x, _ in make_loader(dataset, shuffle=True, limit=5)]).tolist()
    assert sorted(limited) == [0, 1, 2, 3, 4]


# --- errors ------------------------------------------------------------------------------------


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(ProbeError, match="cifar10") as info:
        load_dataset("cifar11")
    assert "'cifar11'" in str(info.value)
    with pytest.raises(ProbeError, match="cifar10"):
        dataset_info("cifar11")


def test_missing_cifar_files_say_download(tmp_path):
    for name in ["cifar10", "cifar100", "mnist"]:
        with pytest.raises(ProbeError, match="download") as info:
            load_dataset(name, root=tmp_path / "nothing")
        assert str(tmp_path / "nothing") in str(info.value)
        assert "--data-root" in str(info.value)


def test_bad_split_image_size_and_roots(tmp_path):
    with pytest.raises(ProbeError, match="'val'.*'train' or 'test'"):
        load_dataset("digits", split="val")
    with pytest.raises(ProbeError, match="64"):
        load_dataset("cifar10", root=tmp_path, image_size=64)
    with pytest.raises(ProbeError, match="0"):
        dataset_info("imagefolder", root=tmp_path, image_size=0)
    with pytest.raises(ProbeError, match="--data-root"):
        load_dataset("imagefolder")
    with pytest.raises(ProbeError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ProbeError, match="not a directory"):
        load_dataset("imagefolder", root=tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="no class subfolders"):
        dataset_info("imagefolder", root=tmp_path / "empty")


def test_bad_loader_arguments_name_the_value():
    dataset = load_dataset("digits")
    with pytest.raises(ProbeError, match="limit.*-3"):
        make_loader(dataset, limit=-3)
    with pytest.raises(ProbeError, match="limit.*got 0"):
        make_loader(dataset, limit=0)
    with pytest.raises(ProbeError, match="batch_size.*got 0"):
        make_loader(dataset, batch_size=0)
    assert issubclass(ProbeError, ValueError)


# --- targets and representative samples --------------------------------------------------------


def _own_indices(labels: list[int]) -> torch.utils.data.TensorDataset:
    """A data set whose inputs are their own indices, so a Subset shows what it picked."""
    return torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.tensor(labels))


def test_dataset_targets_without_loading_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"no image")  # reading it would raise
    folder = torchvision.datasets.ImageFolder(tmp_path)
    assert dataset_targets(folder).tolist() == [0, 1]
    with pytest.raises(Exception, match="cannot identify image file"):
        folder[0]
    digits = load_dataset("digits")
    targets = dataset_targets(digits)
    assert torch.equal(targets, digits.tensors[1]) and targets.dtype == torch.int64
    targets.zero_()  # a copy: the data set keeps its labels
    assert not torch.equal(targets, digits.tensors[1])
    subset = torch.utils.data.Subset(digits, [5, 0, 7])
    assert dataset_targets(subset).tolist() == digits.tensors[1][[5, 0, 7]].tolist()
    both = torch.utils.data.ConcatDataset([subset, _own_indices([4, 2])])
    assert dataset_targets(both).tolist() == digits.tensors[1][[5, 0, 7]].tolist() + [4, 2]
    as_list = [(torch.zeros(1), 3), (torch.zeros(1), 1)]  # no labels kept apart: indexed
    assert dataset_targets(as_list).tolist() == [3, 1]


@pytest.mark.parametrize(
    ("counts", "n", "expected"),
    [
        ((6, 3, 3), 4, [2, 1, 1]),  # exact shares
        ((5, 3, 2), 5, [3, 1, 1]),  # 2.5, 1.5, 1.0: the spare one goes to the larger class
        ((1, 1, 8), 5, [1, 0, 4]),  # 0.5, 0.5, 4.0: equal classes, the spare to the lower label
        ((2, 3, 5), 10, [2, 3, 5]),  # everything
    ],
)
def test_stratified_subset_keeps_class_shares(counts, n, expected):
    # Labels interleaved, so data order and class order differ.
    labels = [c for i in range(max(counts)) for c, k in enumerate(counts) if i < k]
    subset = stratified_subset(_own_indices(labels), n, seed=0)
    assert len(subset) == n and subset.indices == sorted(subset.indices)
    picked = [labels[i] for i in subset.indices]
    assert [picked.count(c) for c in range(len(counts))] == expected
    assert dataset_targets(subset).tolist() == picked


def test_stratified_subset_is_seeded():
    labels = [i % 10 for i in range(200)]
    dataset = _own_indices(labels)
    first = stratified_subset(dataset, 30, seed=0).indices
    assert stratified_subset(dataset, 30, seed=0).indices == first
    assert stratified_subset(dataset, 30, seed=1).indices != first
    assert [[labels[i] for i in first].count(c) for c in range(10)] == [3] * 10


def test_split_off_parts_are_disjoint_and_cover_the_data():
    labels = [0, 1, 0, 2, 0, 1, 0, 2, 0, 1, 2, 0]  # counts 6, 3, 3
    dataset = _own_indices(labels)
    calibration, rest = split_off(dataset, 4, seed=3)
    assert calibration.indices == stratified_subset(dataset, 4, seed=3).indices
    assert set(calibration.indices).isdisjoint(rest.indices)
    assert sorted(calibration.indices + rest.indices) == list(range(12))
    assert rest.indices == sorted(rest.indices)
    assert sorted(labels[i] for i in calibration.indices) == [0, 0, 1, 2]
    assert sorted(labels[i] for i in rest.indices) == [0, 0, 0, 0, 1, 1, 2, 2]


def test_bad_sample_counts():
    dataset = _own_indices([0, 1, 0])
    for bad in (0, 4, 2.5, True):
        with pytest.raises(ProbeError, match=rf"stratified_subset: n must be an integer from 1 "
                                             rf"to 3 \(the data set has 3 samples\), got {bad}"):
            stratified_subset(dataset, bad)
    with pytest.raises(ProbeError, match=r"split_off: n must be an integer from 1 to 2 .*got 3"):
        split_off(dataset, 3)
