"""The boxes a detector draws on a few images, intact and with one block deleted: what the
detection report shows, since a user would rather look than read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from probe.batches import batches, call_model, input_dtype, model_device
from probe.deletion.ablated import ablated
from probe.deletion.batchnorm import recalibrated
from probe.discovery.find import Block
from probe.instrument.hooks import model_preserved
from probe.instrument.measurement import branch_means

BOX_COLUMNS = ["image", "view", "block", "x1", "y1", "x2", "y2", "score", "label", "name"]


def first_images(model: nn.Module, data: Iterable, count: int) -> tuple[list[torch.Tensor], str | None]:
    """The inputs of the first `count` samples of `data`, as the model takes them, one tensor per
    batch they came in (images of different batches may differ in size); and why there are none
    when the inputs are no batch of images (batch, 1 or 3 channels, height, width)."""
    parts: list[torch.Tensor] = []
    taken = 0
    for batch in batches(data, model_device(model), dtype=input_dtype(model)):
        x = batch.inputs
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] in (1, 3)):
            what = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            return [], (f"no pictures: the model's inputs are {what}, not a batch of images "
                        "(batch, 1 or 3 channels, height, width).")
        parts.append(x[:count - taken].clone())
        taken += len(parts[-1])
        if taken >= count:
            break
    return parts, None


def as_picture(image: torch.Tensor) -> np.ndarray:
    """(channels, height, width) model input -> (height, width, 3) uint8. Inputs in [0, 1] (as
    detectors take them) are shown as they are; others are stretched to their own range."""
    x = image.detach().float().cpu()
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        x = (x - low) / max(high - low, 1e-12)
    x = x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x
    return (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _class_name(names: object, label: int) -> str:
    if isinstance(names, Mapping):
        return str(names.get(label, label))
    if isinstance(names, Sequence) and not isinstance(names, str) and 0 <= label < len(names):
        return str(names[label])
    return str(label)


def pictured_boxes(model: nn.Module, task: object, parts: Sequence[torch.Tensor],
                   views: Sequence[tuple[str, Block | None]], *, mode: str = "zero",
                   data: Iterable | None = None, calibration: Iterable | None = None) -> pd.DataFrame:
    """One row per detection (`BOX_COLUMNS`) on the images in `parts`, for each view: (name,
    None) the intact model, (name, block) the model with that block deleted as the per-block
    table deleted it (`mode`; its BatchNorm statistics refitted on `calibration` when given).
    Detections are the task's own (`task.detections(outputs)`: its decoding, NMS and
    thresholds). `data`: for mode "mean", where the branch means come from. The model is left
    as found."""
    deleted = [block for _, block in views if block is not None]
    means = branch_means(model, data, blocks=deleted, progress=False) if mode == "mean" and deleted else None
    names = getattr(model, "names", None)
    rows = []

    def detect(view: str, block: Block | None) -> None:
        image = 0
        for x in parts:
            for found in task.detections(call_model(model, x)):
                boxes = found["boxes"].detach().float().cpu().reshape(-1, 4).tolist()
                scores = found["scores"].detach().float().cpu().reshape(-1).tolist()
                labels = found["labels"].detach().cpu().reshape(-1).tolist()
                rows.extend({"image": image, "view": view, "block": "" if block is None else block.name,
                             "x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "label": int(label),
                             "name": _class_name(names, int(label))}
                            for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels))
                image += 1

    with model_preserved(model), torch.no_grad():
        for view, block in views:
            if block is None:
                detect(view, None)
            elif calibration is not None:
                with recalibrated(model, calibration, blocks=[block], mode=mode, means=means, progress=False):
                    detect(view, block)
            else:
                with ablated(model, [block], mode=mode, means=means):
                    detect(view, block)
    return pd.DataFrame(rows, columns=BOX_COLUMNS)
