"""The generated-shapes detector example: its labels match the drawn pixels, and its trainer runs offline.

The labels are checked against the PNGs alone: a shape's pixels have every channel outside
[40, 215] and a background's every channel inside [70, 185], so each connected set of shape-coloured
pixels is one shape; its bounding box must be a label's box, and how much of the box it fills
tells the class (a square fills all of it, a circle pi/4, a triangle at most about half).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from probe.examples import shapes

SIZE = 128


def drawn_shapes(png: Path) -> list[tuple[tuple[float, float, float, float], float]]:
    """(left, top, right, bottom) in pixels and fill ratio of each connected shape-coloured region."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    shape_coloured = ((pixels < 40) | (pixels > 215)).all(axis=-1)
    regions, _count = ndimage.label(shape_coloured, structure=np.ones((3, 3)))
    found = []
    for rows, cols in ndimage.find_objects(regions):
        area = (rows.stop - rows.start) * (cols.stop - cols.start)
        found.append(((cols.start, rows.start, cols.stop, rows.stop), shape_coloured[rows, cols].sum() / area))
    return found


def label_boxes(txt: Path) -> list[tuple[int, tuple[float, float, float, float]]]:
    boxes = []
    for line in txt.read_text().splitlines():
        label, cx, cy, w, h = line.split()
        cx, cy, w, h = (float(v) * SIZE for v in (cx, cy, w, h))
        boxes.append((int(label), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
    return boxes


def class_of_fill(fill: float) -> int:
    if fill == 1.0:
        return 1  # square
    if 0.70 < fill < 0.85:
        return 0  # circle (pi/4 = 0.785 on a pixel grid)
    if fill < 0.6:
        return 2  # triangle
    raise AssertionError(f"fill {fill} fits no class")


def test_every_label_is_the_box_of_a_drawn_shape_of_its_class(tmp_path):
    data = shapes.make_dataset(tmp_path, train=40, val=10, size=SIZE, seed=3)
    pngs = sorted((tmp_path / "images").rglob("*.png"))
    assert len(pngs) == 50
    counts = np.zeros(len(shapes.CLASSES), int)
    for png in pngs:
        txt = tmp_path / "labels" / png.parent.name / (png.stem + ".txt")
        labels = label_boxes(txt)
        drawn = drawn_shapes(png)
        assert len(labels) == len(drawn) >= 1, png
        for box, fill in drawn:  # each drawn shape has exactly one label: same box (to 1e-3 px), same class
            matches = [label for label, labelled in labels if np.allclose(box, labelled, atol=1e-3)]
            assert matches == [class_of_fill(fill)], (png, box, fill, labels)
            counts[matches[0]] += 1
    assert (counts > 10).all(), counts  # all three classes are there
    config = yaml.safe_load(data.read_text())
    assert config["names"] == dict(enumerate(shapes.CLASSES))
    assert Path(config["path"], config["val"]) == tmp_path.resolve() / "images" / "val"


def test_the_data_set_is_seeded(tmp_path):
    for name in ("a", "b"):
        shapes.make_dataset(tmp_path / name, train=3, val=2, seed=7)
    for file in sorted((tmp_path / "a").rglob("*.*")):
        if file.suffix in {".png", ".txt"}:
            assert file.read_bytes() == (tmp_path / "b" / file.relative_to(tmp_path / "a")).read_bytes(), file


@pytest.mark.slow
def test_the_command_trains_offline_and_ultralytics_loads_its_checkpoint(tmp_path):
    pytest.importorskip("ultralytics")
    # No network at all (name lookups fail, as on a machine without one); record what was asked for.
    script = textwrap.dedent(f"""
        import socket, sys
        def no_network(host, *args, **kwargs):
            print("LOOKUP", host, file=sys.stderr)
            raise socket.gaierror(socket.EAI_NONAME, "no network")
        socket.getaddrinfo = no_network
        from probe.examples.shapes import main
        main(["--out", {str(tmp_path)!r}, "--train", "16", "--val", "4", "--epochs", "1", "--image-size", "64"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lookups = {line.split()[1] for line in done.stderr.splitlines() if line.startswith("LOOKUP")}
    assert lookups <= {"github.com"}, lookups  # only the font check's HEAD request, which it survives
    best = tmp_path / "run" / "weights" / "best.pt"
    assert f"--model yolo:{best} --dataset images --data-root {tmp_path / 'images' / 'val'}" in done.stdout

    import torch
    from ultralytics import YOLO

    model = YOLO(str(best)).model.float().eval()
    assert model.names == dict(enumerate(shapes.CLASSES))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    out = out[0] if isinstance(out, (list, tuple)) else out
    # 4 box coordinates + 3 classes, over one anchor per cell at strides 8, 16, 32 of a 64x64 image
    assert out.shape == (1, 4 + 3, 8 * 8 + 4 * 4 + 2 * 2)
