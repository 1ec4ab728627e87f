"""A trained detector to probe, made from scratch on the CPU: a tiny YOLOv8n on generated shapes.

Step 1 writes a seeded YOLO-format data set: circles, squares and triangles in saturated random
colours, sizes and positions on noisy gradient backgrounds (PNG, 128x128), with
`labels/{train,val}/*.txt` holding `class cx cy w h` normalized, and its `data.yaml`.
Step 2 trains Ultralytics' YOLOv8n from its YAML (random initialization, no pretrained weights)
on the CPU, offline, and returns its `best.pt`. Then probe it as a user probes their detector:

    python -m probe.examples.shapes --out /tmp/shapes        # 5-8 min on two cores; prints the next command
    python -m probe.ablate --model yolo:/tmp/shapes/run/weights/best.pt --dataset images \\
        --data-root /tmp/shapes/images/val --out /tmp/shapes/report

Nothing is downloaded: `YOLO_OFFLINE=1` turns off Ultralytics' online checks and telemetry,
`plots=False` skips the plots (which fetch a font), `amp=False` the AMP check (which, on a GPU,
fetches a pretrained checkpoint). Ultralytics still tries one HEAD request for `Arial.ttf`
(3-second timeout) while it checks the data set, and carries on without it.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
# Backgrounds keep every channel in BACKGROUND_RANGE and shapes every channel outside SHAPE_GAP,
# so a shape's pixels can be told from the background by colour alone (the test relies on it).
BACKGROUND_RANGE = (70, 185)
SHAPE_GAP = (40, 215)


@dataclass(frozen=True)
class Shape:
    label: int
    box: tuple[int, int, int, int]  # pixels: left, top, right, bottom (exclusive), the drawn shape's extent


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two mid-tone colours in a random direction, plus Gaussian noise."""
    low, high = BACKGROUND_RANGE
    start, end = rng.uniform(low + 15, high - 15, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys)
    t = (t - t.min()) / (t.max() - t.min())
    image = start + t[..., None] * (end - start) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(np.rint(image), low, high).astype(np.uint8)


def _shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour: each channel dark or bright, near a random corner of the RGB cube."""
    corner = rng.integers(0, 2, size=3)
    dark, bright = rng.integers(0, SHAPE_GAP[0], size=3), rng.integers(SHAPE_GAP[1] + 1, 256, size=3)
    return tuple(int(c) for c in np.where(corner == 1, bright, dark))


def _mask(rng: np.random.Generator, label: int, size: int, side: int, left: int, top: int) -> Image.Image:
    """The shape's pixels as a mask over the whole image (triangles turned by a random angle)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    right, bottom = left + side - 1, top + side - 1
    if label == 0:
        draw.ellipse((left, top, right, bottom), fill=255)
    elif label == 1:
        draw.rectangle((left, top, right, bottom), fill=255)
    else:
        centre, radius = np.array([left + right, top + bottom]) / 2, (side - 1) / 2
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        draw.polygon([tuple(centre + radius * np.array([np.cos(a), np.sin(a)])) for a in angles], fill=255)
    return mask


def draw_image(rng: np.random.Generator, size: int = 128, max_shapes: int = 4) -> tuple[Image.Image, list[Shape]]:
    """One image with 1..max_shapes shapes whose boxes neither overlap nor touch."""
    image = Image.fromarray(_background(rng, size))
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(20):  # a free spot for this shape, or skip it
            label, side = int(rng.integers(len(CLASSES))), int(rng.integers(size // 9, size // 3))
            left, top = (int(v) for v in rng.integers(0, size - side, size=2))
            mask = _mask(rng, label, size, side, left, top)
            box = mask.getbbox()  # the drawn extent, so the label is exact whatever the shape
            if box and all(box[2] + 2 <= s.box[0] or s.box[2] + 2 <= box[0] or box[3] + 2 <= s.box[1]
                           or s.box[3] + 2 <= box[1] for s in shapes):
                image.paste(_shape_colour(rng), mask=mask)
                shapes.append(Shape(label, box))
                break
    return image, shapes


def yolo_line(shape: Shape, size: int) -> str:
    left, top, right, bottom = shape.box
    cx, cy, w, h = (left + right) / 2 / size, (top + bottom) / 2 / size, (right - left) / size, (bottom - top) / size
    return f"{shape.label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def make_dataset(out: str | Path, train: int = 400, val: int = 40, size: int = 128, seed: int = 0) -> Path:
    """Write images/{train,val}/*.png, labels/{train,val}/*.txt and data.yaml under `out`; return data.yaml."""
    out = Path(out).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, shapes = draw_image(rng, size)
            image.save(out / "images" / split / f"{i:05d}.png")
            (out / "labels" / split / f"{i:05d}.txt").write_text("".join(yolo_line(s, size) + "\n" for s in shapes))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES))
    data = out / "data.yaml"
    data.write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data


def train(data: str | Path, out: str | Path, epochs: int = 30, image_size: int = 128, batch: int = 16,
          seed: int = 0, **overrides) -> Path:
    """Train YOLOv8n from random weights on the CPU, offline; return the path of its best.pt.

    `overrides` go to Ultralytics' `model.train` as they are (e.g. `fraction=0.1`, `val=False`).
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")  # read when ultralytics is first imported
    try:
        from ultralytics import YOLO
    except ImportError:
        raise SystemExit('this example needs Ultralytics: pip install -e ".[yolo]" (or pip install ultralytics)') from None

    model = YOLO("yolov8n.yaml")  # the architecture only; the classes come from data.yaml
    settings = dict(data=str(data), epochs=epochs, imgsz=image_size, batch=batch, seed=seed, device="cpu",
                    workers=0, pretrained=False, amp=False, plots=False, project=str(Path(out).resolve()),
                    name="run", exist_ok=True, verbose=False)
    model.train(**{**settings, **overrides})
    return Path(model.trainer.best)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m probe.examples.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the data set (images/, labels/, data.yaml) and run/")
    parser.add_argument("--train", type=int, default=400, help="training images (default 400)")
    parser.add_argument("--val", type=int, default=40, help="validation images (default 40)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = make_dataset(args.out, args.train, args.val, args.image_size, args.seed)
    best = train(data, args.out, args.epochs, args.image_size, seed=args.seed)
    out = Path(args.out).resolve()
    print(f"\ntrained in {time.perf_counter() - start:.0f} s: {best}\nnext:\n"
          f"  python -m probe.ablate --model yolo:{best} --dataset images --data-root {out / 'images' / 'val'}"
          f" --out {out / 'report'}")


if __name__ == "__main__":
    main()
