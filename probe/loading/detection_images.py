"""`--dataset images`: a folder of images without classes, found at any depth, prepared as a
detector's own predictor prepares them, with ground truth where the folder has it.

Preparation (`Preparation`), from the detector's `probe.loading.detectors.DetectorInput`:

- Ultralytics: RGB, letterboxed as `ultralytics.data.augment.LetterBox` does (resized with
  OpenCV's bilinear filter keeping the aspect, the longer side to the image size, centred, grey
  114 padding), pixels / 255. When every image has one shape the padding reaches only the next
  multiple of the model's stride (Ultralytics' predictor, `rect`); else every image is padded to
  the full square (what the predictor does for a batch of mixed shapes). Pixels are read with
  PIL, turned by their EXIF orientation as OpenCV's imread turns them; only 16-bit images may
  differ from Ultralytics' by a grey level (scaled by 1/257 here; OpenCV keeps the high byte).
- torchvision (and a model of your own): RGB in [0, 1] at the images' own size (the model's
  transform resizes and normalizes); images of mixed sizes, or any with `--image-size`, are
  letterboxed to a square (of the largest side by default), so that a batch is one tensor.

Ground truth, when the folder has it, is each image's boxes in the model's input pixels (after
the letterbox), xyxy, with int64 class labels: `{"boxes": (n, 4), "labels": (n,)}`.

- YOLO-format label files: where Ultralytics looks for them (the image's path with its last
  `images` folder replaced by `labels` and the suffix by `.txt`, so `DIR/labels/a/b.txt` for
  `DIR/images/a/b.jpg`; or beside the image), one `class cx cy w h` row per object, normalized
  to the image (a segment's `class x1 y1 x2 y2 ...` polygon counts as its bounding box). An image
  without a label file holds no objects.
- A COCO JSON (`instances*.json`, or any JSON with `images`, `annotations` and `categories`) in
  DIR or DIR/annotations: the images it lists are evaluated (found by `file_name` under DIR,
  DIR/images, or by name), boxes `[x, y, w, h]` in the image's pixels; crowd annotations are left
  out.

Class numbers: a YOLO label's class is the model's class (torchvision's detectors keep 0 for the
background: class c is their label c + 1). A COCO category is the model's class of the same name
where the model names its classes (Ultralytics), else its category id for torchvision's detectors
(trained on COCO's ids), else its place among the categories sorted by id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from probe.errors import ProbeError
from probe.loading.detectors import DetectorInput
from probe.loading.images import _eight_bit, readable

__all__ = ["IMAGE_SUFFIXES", "DetectionImages", "ImagesInfo", "Preparation", "collate_detections", "letterbox",
           "load_detection_images"]

# Ultralytics' letterbox padding value (LetterBox.padding_value).
PAD_VALUE = 114
# Prepared images are kept in memory (as 8-bit pixels) up to this many bytes: a sweep reads the
# data once per deletion, and decoding and resizing would otherwise repeat every time.
_CACHE_BYTES = 512 * 2**20


def _readable_suffixes() -> frozenset[str]:
    """Every file suffix PIL opens itself (stubs that need an outside decoder, and video, left out)."""
    Image.init()
    return frozenset(suffix for suffix, kind in Image.registered_extensions().items()
                     if kind in Image.OPEN and not (isinstance(Image.OPEN[kind][0], type)
                                                    and issubclass(Image.OPEN[kind][0], ImageFile.StubImageFile))
                     and suffix not in (".mpeg", ".mpg"))


IMAGE_SUFFIXES = _readable_suffixes()


@dataclass(frozen=True)
class Preparation:
    """How an image becomes the model's input (see the module docstring).

    letterbox: resized keeping its aspect and padded with grey 114; False: as it is.
    size: the letterbox's side. stride: padding reaches a multiple of it. rect: pad only to the
    next multiple of the stride (Ultralytics' minimum rectangle), not to the full square.
    """

    letterbox: bool
    size: int | None = None
    stride: int = 1
    rect: bool = False

    def describe(self) -> str:
        if not self.letterbox:
            return "RGB in [0, 1] at the images' own size (the model's transform resizes them)"
        fill = (f"padded to a multiple of {self.stride}" if self.rect else f"padded to {self.size}x{self.size}")
        return f"RGB in [0, 1], letterboxed to {self.size} (longer side), {fill} with grey {PAD_VALUE}"


@dataclass(frozen=True)
class ImagesInfo:
    """What the run record stores of an images folder; every input has one shape."""

    name: str
    images: int
    input_height: int
    input_width: int
    preparation: str
    ground_truth: str | None  # where the boxes came from; None: none (scored against the intact model)
    image_size: int | None = None  # the letterbox's side; None: the images' own size
    in_channels: int = 3
    normalize: str = "none"
    num_classes: int | None = None  # no class labels of the classification kind: no chance level


@dataclass(frozen=True)
class _Found:
    """An image file with its shape as it is read (after its EXIF orientation)."""

    path: Path
    height: int
    width: int


def letterbox_params(shape: tuple[int, int], size: int, *, stride: int, rect: bool) -> dict:
    """Ultralytics' `LetterBox.get_params` for an image of `shape` (h, w) and a square target of
    `size` (scaleup, centred): the ratio, the resized (w, h) and the padding on each side."""
    h, w = shape
    ratio = min(size / h, size / w)
    new_w, new_h = max(round(w * ratio), 1), max(round(h * ratio), 1)
    dw, dh = size - new_w, size - new_h
    if rect:  # the minimum rectangle
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    return {"ratio": ratio, "resized": (new_w, new_h), "top": round(dh - 0.1), "bottom": round(dh + 0.1),
            "left": round(dw - 0.1), "right": round(dw + 0.1)}


def letterbox(image: np.ndarray, size: int, *, stride: int = 1, rect: bool = False) -> tuple[np.ndarray, dict]:
    """An (h, w, 3) uint8 image letterboxed as Ultralytics' `LetterBox` does it (OpenCV's
    INTER_LINEAR resize, constant grey 114 border), with its `letterbox_params`. Without OpenCV
    (a torchvision detector without Ultralytics installed) torch's bilinear resize stands in,
    which may differ from OpenCV's by one grey level."""
    params = letterbox_params(image.shape[:2], size, stride=stride, rect=rect)
    new_w, new_h = params["resized"]
    try:
        import cv2
    except ImportError:
        cv2 = None
    if (image.shape[1], image.shape[0]) != (new_w, new_h):
        if cv2 is not None:
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        else:
            pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
            image = pixels[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    top, bottom, left, right = params["top"], params["bottom"], params["left"], params["right"]
    padded = np.full((new_h + top + bottom, new_w + left + right, 3), PAD_VALUE, dtype=np.uint8)
    padded[top:top + new_h, left:left + new_w] = image
    return padded, params


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (h, w, 3) uint8 RGB, turned by its EXIF orientation (as OpenCV's imread,
    which Ultralytics reads with, turns it); 16-bit grey scaled to 8 bits, pixels of no known
    range and unreadable files a ProbeError naming the file (`probe.loading.images`)."""
    with readable(str(path)), open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
        image = ImageOps.exif_transpose(image)
        return np.array(_eight_bit(image, str(path)).convert("RGB"))  # a writable copy


def collate_detections(items: Sequence) -> object:
    """A batch of images: one (n, 3, h, w) tensor; with ground truth, (images, [target dict per
    image]): the targets stay a list, each image's boxes of their own count."""
    if items and isinstance(items[0], tuple):
        return torch.stack([image for image, _ in items]), [target for _, target in items]
    return default_collate(list(items))


class DetectionImages(Dataset):
    """The prepared images of a folder: items are float32 (3, h, w) tensors in [0, 1], or with
    ground truth `(image, {"boxes": float32 (n, 4) xyxy input pixels, "labels": int64 (n,)})`.
    `collate` batches them (`collate_detections`); `info` is an `ImagesInfo`; `notes` are what a
    user should hear about the folder (images left out, sizes chosen)."""

    def __init__(self, root: Path, found: list[_Found], preparation: Preparation,
                 targets: list[dict[str, torch.Tensor]] | None, info: ImagesInfo, notes: tuple[str, ...] = ()) -> None:
        self.root, self.found, self.preparation, self.targets = root, found, preparation, targets
        self.info, self.notes = info, notes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    collate = staticmethod(collate_detections)

    @property
    def files(self) -> list[Path]:
        return [item.path for item in self.found]

    def __len__(self) -> int:
        return len(self.found)

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` prepared, as uint8 (3, h, w)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        image = read_rgb(self.found[index].path)
        if self.preparation.letterbox:
            image, _ = letterbox(image, self.preparation.size, stride=self.preparation.stride,
                                 rect=self.preparation.rect)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
        if self._cached_bytes + pixels.numel() <= _CACHE_BYTES:
            self._cache[index] = pixels
            self._cached_bytes += pixels.numel()
        return pixels

    def __getitem__(self, index: int):
        image = self.pixels(index).float().div(255)  # as Ultralytics' predictor: uint8 -> float32 / 255
        if self.targets is None:
            return image
        target = self.targets[index]
        return image, {key: value.clone() for key, value in target.items()}


def load_detection_images(root: str | os.PathLike | None, detector: DetectorInput, *,
                          image_size: int | None = None) -> DetectionImages:
    """The images under `root` (at any depth, any format PIL reads), prepared for `detector`, with
    their ground truth where `root` has it (see the module docstring). `image_size`: the
    letterbox's side (default: Ultralytics' training size from the checkpoint; for other
    detectors the images' own size)."""
    folder = _folder(root)
    found = [_header(path) for path in _image_files(folder)]
    if not found:
        raise ProbeError(f"--data-root {str(folder)!r} holds no images (looked at any depth for "
                         f"{', '.join(sorted(('.jpg', '.png', '.bmp', '.tif', '.webp')))} and every other format PIL "
                         "reads).")
    notes: list[str] = []
    coco = _coco_file(folder)
    label_files = _yolo_label_files([item.path for item in found])
    if coco is not None and label_files:
        raise ProbeError(f"--data-root {str(folder)!r} holds both a COCO JSON ({coco.name}) and YOLO label files "
                         f"(e.g. {str(next(iter(label_files.values())))!r}); keep one kind of ground truth there.")
    if coco is not None:
        found, coco_boxes, words = _coco_boxes(coco, folder, found, detector, notes)
    preparation = _preparation(found, detector, image_size, notes)
    params = [_params(item, preparation) for item in found]
    targets, ground_truth = None, None
    if coco is not None:
        targets = [_through(boxes, labels, p) for (boxes, labels), p in zip(coco_boxes, params)]
        ground_truth = words
    elif label_files:
        targets = [_yolo_target(item, label_files.get(item.path), detector, p) for item, p in zip(found, params)]
        ground_truth = (f"YOLO label files for {len(label_files)} of {len(found)} images (where Ultralytics looks: "
                        "labels/ beside images/); the others hold no objects")
    elif any(path.is_dir() for path in (folder / "labels", folder.parent / "labels")):
        raise ProbeError(f"--data-root {str(folder)!r}: a labels folder is there, but no image has a label file where "
                         "Ultralytics looks for it (the image's path with its last 'images' folder replaced by 'labels' "
                         "and its suffix by .txt); put the images under DIR/images and their labels under DIR/labels.")
    height, width = _input_shape(params[0])
    info = ImagesInfo("images", len(found), height, width, preparation.describe(), ground_truth,
                      image_size=preparation.size if preparation.letterbox else None)
    return DetectionImages(folder, found, preparation, targets, info, tuple(notes))


def _folder(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise ProbeError("--dataset images needs --data-root DIR: a folder of images (at any depth).")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ProbeError(f"--data-root {str(folder)!r} {'is not a folder' if folder.exists() else 'does not exist'}; "
                         "--dataset images reads the images in a folder (at any depth).")
    return folder.resolve()


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, at any depth, in path order (hidden files and folders left out)."""
    files = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [Path(directory) / name for name in names
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


# EXIF orientations that swap the width and the height (a quarter turn).
_TRANSPOSED = (5, 6, 7, 8)


def _header(path: Path) -> _Found:
    """The file's shape as it will be read, from its header alone (PIL decodes pixels only when asked)."""
    with readable(str(path)), Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in _TRANSPOSED:
            width, height = height, width
    return _Found(path, height, width)


def _preparation(found: list[_Found], detector: DetectorInput, image_size: int | None, notes: list[str]) -> Preparation:
    one_shape = len({(item.height, item.width) for item in found}) == 1
    if detector.family == "ultralytics":
        size = image_size or detector.image_size
        stride = max(detector.stride, 1)
        rounded = max(-(-size // stride) * stride, stride)  # Ultralytics' check_imgsz: up to a multiple of the stride
        if rounded != size:
            notes.append(f"--image-size {size} is not a multiple of the model's stride {stride}: the images are "
                         f"letterboxed to {rounded}, as Ultralytics does.")
        return Preparation(True, rounded, stride, rect=one_shape)
    if image_size is None and one_shape:
        return Preparation(False)
    size = image_size or max(max(item.height, item.width) for item in found)
    if image_size is None:
        notes.append(f"the images differ in size: each is letterboxed to {size}x{size} (grey padding) so that a batch "
                     "is one tensor; choose the size with --image-size N.")
    return Preparation(True, size, 1, rect=False)


def _params(item: _Found, preparation: Preparation) -> dict:
    """Where the image's pixels land in the input: {ratio, left, top} (identity without letterbox)."""
    if not preparation.letterbox:
        return {"ratio": 1.0, "left": 0, "top": 0, "resized": (item.width, item.height),
                "bottom": 0, "right": 0}
    return letterbox_params((item.height, item.width), preparation.size, stride=preparation.stride,
                            rect=preparation.rect)


def _input_shape(params: dict) -> tuple[int, int]:
    """(height, width) of the input an image of these `_params` becomes."""
    new_w, new_h = params["resized"]
    return new_h + params["top"] + params["bottom"], new_w + params["left"] + params["right"]


def _through(boxes: torch.Tensor, labels: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """xyxy boxes in the image's pixels moved into the input's, as Ultralytics' LetterBox moves
    its labels (scaled by the ratio, shifted by the left and top padding)."""
    shift = torch.tensor([params["left"], params["top"], params["left"], params["top"]], dtype=torch.float64)
    moved = boxes.to(torch.float64) * params["ratio"] + shift
    return {"boxes": moved.to(torch.float32).reshape(-1, 4), "labels": labels.to(torch.int64).reshape(-1)}


# --- YOLO label files ---------------------------------------------------------------------------


def _yolo_label_path(image: Path) -> Path:
    """Where Ultralytics looks for an image's labels (`ultralytics.data.utils.img2label_paths`)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(str(image).rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


def _yolo_label_files(images: list[Path]) -> dict[Path, Path]:
    """{image: its label file} for the images that have one."""
    found = {}
    for image in images:
        label = _yolo_label_path(image)
        if label.is_file():
            found[image] = label
    return found


def _yolo_target(item: _Found, label: Path | None, detector: DetectorInput, params: dict) -> dict[str, torch.Tensor]:
    """The image's boxes from its YOLO label file (none without one), in the input's pixels."""
    rows = _yolo_rows(label) if label is not None else []
    classes = [row[0] for row in rows]
    _check_classes(classes, detector, f"label file {str(label)!r}", offset=1 if detector.labels_are_category_ids else 0)
    boxes = torch.tensor([row[1] for row in rows], dtype=torch.float64).reshape(-1, 4)  # normalized xyxy
    boxes = boxes * torch.tensor([item.width, item.height, item.width, item.height], dtype=torch.float64)
    labels = torch.tensor(classes, dtype=torch.int64) + (1 if detector.labels_are_category_ids else 0)
    return _through(boxes, labels, params)


def _yolo_rows(label: Path) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(class, normalized xyxy) per row of a YOLO label file, duplicates left out (as Ultralytics)."""
    rows, seen = [], set()
    for number, line in enumerate(label.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"label file {str(label)!r} line {number} ({line.strip()[:60]!r})"
        try:
            values = [float(part) for part in parts]
        except ValueError as error:
            raise ProbeError(f"{where} is not numbers; each row is 'class cx cy w h', normalized to the image.") from error
        if values[0] != int(values[0]) or values[0] < 0:
            raise ProbeError(f"{where}: the class {parts[0]!r} is not a whole number >= 0.")
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            coordinates = values[1:]
        elif len(values) >= 7 and len(values) % 2 == 1:  # a segment: class x1 y1 x2 y2 ... (its bounding box)
            coordinates = values[1:]
            xs, ys = coordinates[0::2], coordinates[1::2]
            box = (min(xs), min(ys), max(xs), max(ys))
        else:
            raise ProbeError(f"{where} has {len(values)} numbers; probe reads 'class cx cy w h' (5) or a segment "
                             "'class x1 y1 x2 y2 x3 y3 ...' (an odd count of 7 or more).")
        if min(coordinates) < 0 or max(coordinates) > 1:
            raise ProbeError(f"{where} has coordinates outside [0, 1]; YOLO labels are normalized to the image's "
                             "width and height.")
        key = tuple(values)
        if key not in seen:
            seen.add(key)
            rows.append((int(values[0]), box))
    return rows


def _check_classes(classes: Sequence[int], detector: DetectorInput, where: str, offset: int = 0) -> None:
    """A class the model cannot output is a mistake (labels of another data set): say so."""
    if detector.num_classes is None or not classes:
        return
    largest = max(classes) + offset
    if largest >= detector.num_classes:
        raise ProbeError(f"{where} has class {max(classes)}, but the model detects {detector.num_classes} classes "
                         f"(labels 0..{detector.num_classes - 1 - offset}); were the labels made for another model?")


# --- COCO JSON ----------------------------------------------------------------------------------


def _coco_file(folder: Path) -> Path | None:
    """The COCO JSON in `folder` or `folder/annotations`: one named instances*.json, else one whose
    top level has images, annotations and categories; None without any."""
    files = [path for place in (folder, folder / "annotations") if place.is_dir()
             for path in sorted(place.glob("*.json"))]
    instances = [path for path in files if path.name.startswith("instances")]
    candidates = instances or [path for path in files if _is_coco(path)]
    if len(candidates) > 1:
        raise ProbeError(f"--data-root {str(folder)!r} holds {len(candidates)} COCO JSON files "
                         f"({', '.join(path.name for path in candidates[:4])}); keep the one that describes these "
                         "images there.")
    return candidates[0] if candidates else None


def _is_coco(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data)


def _coco_boxes(path: Path, folder: Path, found: list[_Found], detector: DetectorInput, notes: list[str]):
    """(the images the JSON lists, in its order, [(xyxy boxes in image pixels, labels)] per image, the
    ground truth in words)."""
    try:
        data = json.loads(path.read_text())
        images, annotations, categories = data["images"], data["annotations"], data["categories"]
        ids = sorted(int(category["id"]) for category in categories)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ProbeError(f"COCO JSON {str(path)!r} cannot be read as COCO instances ({type(error).__name__}: {error}); "
                         "it needs images, annotations (with bbox and category_id) and categories.") from error
    label_of, mapping = _category_labels(categories, ids, detector)
    by_path = {item.path: item for item in found}
    by_name: dict[str, list[_Found]] = {}
    for item in found:
        by_name.setdefault(item.path.name, []).append(item)
    chosen, boxes_of = [], {}
    for entry in images:
        name = str(entry.get("file_name", ""))
        item = next((by_path[p] for p in (folder / name, folder / "images" / name) if p in by_path), None)
        if item is None and len(by_name.get(Path(name).name, ())) == 1:
            item = by_name[Path(name).name][0]
        if item is None:
            raise ProbeError(f"COCO JSON {str(path)!r} lists image {name!r}, which is not under --data-root "
                             f"{str(folder)!r} (looked for it there, under images/, and by its name).")
        chosen.append(item)
        boxes_of[entry["id"]] = ([], [])
    crowd = 0
    for annotation in annotations:
        if annotation.get("iscrowd"):
            crowd += 1
            continue
        target = boxes_of.get(annotation.get("image_id"))
        if target is None:
            raise ProbeError(f"COCO JSON {str(path)!r}: an annotation names image_id {annotation.get('image_id')!r}, "
                             "which its images do not list.")
        try:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            label = label_of[int(annotation["category_id"])]
        except (KeyError, TypeError, ValueError) as error:
            raise ProbeError(f"COCO JSON {str(path)!r}: annotation {annotation.get('id')!r} has no usable bbox "
                             f"[x, y, w, h] or a category_id its categories do not list ({error}).") from error
        target[0].append((x, y, x + w, y + h))
        target[1].append(label)
    _check_classes([label for _, labels in boxes_of.values() for label in labels], detector, f"COCO JSON {str(path)!r}")
    left_out = len(found) - len(chosen)
    if left_out:
        notes.append(f"{left_out} image(s) under the folder are not in {path.name} and are left out.")
    words = (f"COCO JSON {path.name} ({len(chosen)} images, categories {mapping}"
             f"{f'; {crowd} crowd annotation(s) left out' if crowd else ''})")
    pairs = [(torch.tensor(boxes_of[entry['id']][0], dtype=torch.float64).reshape(-1, 4),
              torch.tensor(boxes_of[entry['id']][1], dtype=torch.int64)) for entry in images]
    return chosen, pairs, words


def _category_labels(categories: list[dict], ids: list[int], detector: DetectorInput) -> tuple[dict[int, int], str]:
    """{category id: the model's class} and how they were matched, in words."""
    names = detector.class_names
    if names and all(str(category.get("name")) in names for category in categories):
        return {int(c["id"]): names.index(str(c["name"])) for c in categories}, "matched to the model's classes by name"
    if detector.labels_are_category_ids:
        return {i: i for i in ids}, "as the model's class ids (torchvision: COCO category ids)"
    return {category: index for index, category in enumerate(ids)}, "numbered in order of their ids from 0"
