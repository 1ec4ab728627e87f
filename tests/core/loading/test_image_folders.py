"""Image folders as users have them: PNGs written here, pixel values computed by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probe.loading.datasets import DatasetInfo, dataset_info, load_dataset
from probe.errors import ProbeError

torch.set_num_threads(1)

# One pixel the tests set by hand: row 3, column 5 of the first image of the first class.
ROW, COL = 3, 5
PIXEL = (200, 100, 50)


def _f32(value: int, mean: float, std: float) -> np.float32:
    """ToTensor then Normalize, in float32 as torch computes them: (value / 255 - mean) / std."""
    return (np.float32(value) / np.float32(255) - np.float32(mean)) / np.float32(std)


def _cifar_like(root: Path, classes=("airplane", "cat", "dog"), size: int = 32) -> Path:
    """Two seeded random RGB PNGs per class, in one subfolder per class, like CIFAR-10's
    test images exported to disk."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            if name == classes[0] and i == 0:
                pixels[ROW, COL] = PIXEL
            Image.fromarray(pixels, "RGB").save(root / name / f"{i}.png")
    return root


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ProbeError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_32x32_folder_keeps_its_size_and_imagenet_default(tmp_path):
    root = _cifar_like(tmp_path / "test")
    dataset = load_dataset("imagefolder", root=root)
    expected = DatasetInfo("imagefolder", 3, 3, 32, "imagenet")
    assert dataset.info == expected == dataset_info("imagefolder", root=root)
    assert dataclasses.asdict(dataset.info) == {
        "name": "imagefolder", "num_classes": 3, "in_channels": 3, "image_size": 32,
        "normalize": "imagenet",
    }
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 0
    # (200 / 255 - 0.485) / 0.229 = 1.30705..., and so on for green and blue.
    assert image[:, ROW, COL].tolist() == [
        _f32(200, 0.485, 0.229), _f32(100, 0.456, 0.224), _f32(50, 0.406, 0.225)
    ]
    assert image[0, ROW, COL].item() == pytest.approx(1.3070468, abs=1e-6)
    # Every pixel, not just that one: no resize touched the image.
    pixels = np.asarray(Image.open(root / "airplane" / "0.png"))  # (32, 32, 3)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    by_hand = (pixels.astype(np.float32) / np.float32(255) - mean) / std
    assert np.array_equal(image.permute(1, 2, 0).numpy(), by_hand)


@pytest.mark.parametrize(
    ("normalize", "canonical", "expected"),
    [
        ("cifar10", "cifar10",
         [_f32(200, 0.4914, 0.2470), _f32(100, 0.4822, 0.2435), _f32(50, 0.4465, 0.2616)]),
        ("none", "none", [np.float32(200) / np.float32(255), np.float32(100) / np.float32(255),
                          np.float32(50) / np.float32(255)]),
        ("0.5,0.25", "0.5,0.25", [_f32(200, 0.5, 0.25), _f32(100, 0.5, 0.25),
                                  _f32(50, 0.5, 0.25)]),
        (" 0.1, 0.2, 0.3, 0.5, 0.25, 0.125", "0.1,0.2,0.3,0.5,0.25,0.125",
         [_f32(200, 0.1, 0.5), _f32(100, 0.2, 0.25), _f32(50, 0.3, 0.125)]),
        ("ImageNet", "imagenet",
         [_f32(200, 0.485, 0.229), _f32(100, 0.456, 0.224), _f32(50, 0.406, 0.225)]),
    ],
)
def test_normalize_choices(tmp_path, normalize, canonical, expected):
    root = _cifar_like(tmp_path)
    dataset = load_dataset("imagefolder", root=root, normalize=normalize)
    assert dataset.info.normalize == canonical
    assert dataset[0][0][:, ROW, COL].tolist() == expected
    # The canonical value reproduces the same data set.
    again = load_dataset("imagefolder", root=root, normalize=canonical)
    assert torch.equal(again[0][0], dataset[0][0])


def test_hand_values_of_the_custom_normalisations():
    # 200 / 255 = 0.7843137...: (0.7843137 - 0.5) / 0.25 = 1.1372549; per channel
    # (0.7843137 - 0.1) / 0.5 = 1.3686275, (0.3921569 - 0.2) / 0.25 = 0.7686275,
    # (0.1960784 - 0.3) / 0.125 = -0.8313725.
    assert float(_f32(200, 0.5, 0.25)) == pytest.approx(1.1372549, abs=1e-6)
    assert [float(_f32(200, 0.1, 0.5)), float(_f32(100, 0.2, 0.25)),
            float(_f32(50, 0.3, 0.125))] == pytest.approx([1.3686275, 0.7686275, -0.8313725],
                                                          abs=1e-6)


def test_grey_for_a_one_channel_model(tmp_path):
    for name, colour in {"a": (255, 0, 51), "b": (10, 20, 30)}.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / name / "x.png")
    dataset = load_dataset("imagefolder", root=tmp_path, in_channels=1, normalize="0.5,0.25")
    assert dataset.info == DatasetInfo("imagefolder", 2, 1, 32, "0.5,0.25")
    image, _ = dataset[0]
    # PIL's luma, rounded: 255 * 0.299 + 0 * 0.587 + 51 * 0.114 = 82.059 -> 82.
    assert image.shape == (1, 32, 32)
    assert image.unique().tolist() == [_f32(82, 0.5, 0.25)]
    # 10 * 0.299 + 20 * 0.587 + 30 * 0.114 = 18.15 -> 18.
    assert dataset[1][0].unique().tolist() == [_f32(18, 0.5, 0.25)]


def test_grey_files_for_a_three_channel_model_and_back(tmp_path):
    for name, value in {"a": 77, "b": 200}.items():
        (tmp_path / name).mkdir()
        Image.new("L", (28, 28), value).save(tmp_path / name / "x.png")
    rgb = load_dataset("imagefolder", root=tmp_path, normalize="none")
    assert rgb.info.in_channels == 3 and rgb[0][0].shape == (3, 28, 28)
    assert rgb[0][0].unique().tolist() == [np.float32(77) / np.float32(255)]
    grey = load_dataset("imagefolder", root=tmp_path, in_channels=1, normalize="mnist")
    assert grey[1][0].shape == (1, 28, 28)
    assert grey[1][0].unique().tolist() == [_f32(200, 0.1307, 0.3081)]


def test_three_channel_statistics_for_grey_images_are_refused(tmp_path):
    root = _cifar_like(tmp_path)
    assert _message(load_dataset, "imagefolder", root=root, in_channels=1) == (
        "normalize 'imagenet' (the default for 'imagefolder') gives statistics for 3 channels, "
        "but the images have 1; give one 'MEAN,STD' for every channel, or one mean and std "
        "per channel."
    )
    assert "normalize '0.1,0.2,0.3,0.5,0.25,0.125' gives statistics for 3 channels" in _message(
        dataset_info, "imagefolder", root=root, in_channels=1,
        normalize="0.1,0.2,0.3,0.5,0.25,0.125",
    )


def test_mixed_sizes_are_resized_to_224(tmp_path):
    for name, size in {"a": 32, "b": 40}.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", (size, size), (0, 128, 255)).save(tmp_path / name / "x.png")
    dataset = load_dataset("imagefolder", root=tmp_path, normalize="none")
    assert dataset.info.image_size == 224
    image, _ = dataset[0]
    assert image.shape == (3, 224, 224)
    # A one-colour image stays one colour through Resize and CenterCrop.
    assert [image[c].unique().tolist() for c in range(3)] == [
        [0.0], [np.float32(128) / np.float32(255)], [1.0]
    ]


def test_explicit_image_size(tmp_path):
    root = _cifar_like(tmp_path, size=32)
    dataset = load_dataset("imagefolder", root=root, image_size=16)
    assert dataset.info.image_size == 16 and dataset[0][0].shape == (3, 16, 16)
    same = load_dataset("imagefolder", root=root, image_size=32)
    assert torch.equal(same[0][0], load_dataset("imagefolder", root=root)[0][0])


def test_unreadable_image_is_named(tmp_path):
    root = _cifar_like(tmp_path)
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    message = _message(dataset_info, "imagefolder", root=root)
    assert message.startswith(f"imagefolder file '{root / 'cat' / 'broken.png'}' is no image "
                              "PIL can read")


# --- folders whose classes look wrong ----------------------------------------------------------


def test_root_one_level_too_high_above_a_split(tmp_path):
    _cifar_like(tmp_path / "cifar" / "test")
    root = tmp_path / "cifar"
    expected = (
        f"imagefolder root '{root}' has subfolders named like splits ('test'), not classes; "
        f"point --data-root at the split's own folder, e.g. '{root / 'test'}'."
    )
    assert _message(load_dataset, "imagefolder", root=root) == expected
    assert _message(dataset_info, "imagefolder", root=root) == expected


def test_root_two_levels_too_high_above_the_classes(tmp_path):
    # datasets/{cifar,svhn}/{test,train}/<classes>: the "classes" cifar and svhn hold no images.
    for name in ("cifar", "svhn"):
        for split in ("test", "train"):
            _cifar_like(tmp_path / name / split)
    expected = (
        f"imagefolder root '{tmp_path}' is more than one level above the classes: its subfolders hold no "
        "images, only more subfolders (cifar/test, svhn/test); point --data-root at the folder whose "
        f"subfolders hold the images, e.g. '{tmp_path / 'cifar' / 'test'}'."
    )
    assert _message(load_dataset, "imagefolder", root=tmp_path) == expected
    assert _message(dataset_info, "imagefolder", root=tmp_path) == expected
    # Images in one class's own folder next to sub-folders: a class folder, read as before.
    Image.new("RGB", (32, 32)).save(tmp_path / "cifar" / "x.png")
    assert load_dataset("imagefolder", root=tmp_path).info.num_classes == 2


@pytest.mark.parametrize("splits", [("test", "train"), ("Val", "train"), ("valid",),
                                    ("validation", "train")])
def test_split_named_folders(tmp_path, splits):
    for split in splits:
        _cifar_like(tmp_path / split)
    message = _message(load_dataset, "imagefolder", root=tmp_path)
    shown = ", ".join(repr(s) for s in sorted(splits))  # in ImageFolder's (sorted) order
    assert f"has subfolders named like splits ({shown}), not classes" in message


def test_single_class_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "cat" / "x.png")
    assert _message(load_dataset, "imagefolder", root=tmp_path) == (
        f"imagefolder root '{tmp_path}' has a single class subfolder 'cat'; a classification "
        "data set needs one subfolder per class, two or more."
    )


def test_single_folder_holding_the_classes(tmp_path):
    _cifar_like(tmp_path / "cifar10_png")
    assert _message(dataset_info, "imagefolder", root=tmp_path) == (
        f"imagefolder root '{tmp_path}' has a single class subfolder 'cifar10_png'; its "
        f"subfolders (airplane, cat, dog) look like the classes: point --data-root at "
        f"'{tmp_path / 'cifar10_png'}'."
    )


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["imagenett", "0.5", "1,2,3", "0.5,x", "nan,1", "", 0.5])
def test_unknown_normalize(tmp_path, bad):
    root = _cifar_like(tmp_path)
    assert _message(load_dataset, "imagefolder", root=root, normalize=bad) == (
        f"unknown normalize {bad!r}: use a name (imagenet, cifar10, cifar100, mnist, none), "
        "'MEAN,STD' for every channel, or 'M1,M2,M3,S1,S2,S3' per channel (pixels in [0, 1])."
    )


def test_non_positive_std(tmp_path):
    root = _cifar_like(tmp_path)
    assert _message(load_dataset, "imagefolder", root=root, normalize="0.5,0") == (
        "normalize '0.5,0' has a std of 0.0; every std must be > 0."
    )


@pytest.mark.parametrize("bad", [2, 4, 0, True, "3"])
def test_bad_in_channels(tmp_path, bad):
    root = _cifar_like(tmp_path)
    assert _message(load_dataset, "imagefolder", root=root, in_channels=bad) == (
        f"in_channels must be 1 (grey) or 3 (RGB), got {bad!r}."
    )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_image_size(tmp_path, bad):
    root = _cifar_like(tmp_path)
    assert _message(load_dataset, "imagefolder", root=root, image_size=bad) == (
        f"image_size must be an integer of at least 1, got {bad!r}."
    )
