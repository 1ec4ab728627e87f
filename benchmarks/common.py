"""Shared setup for the benchmarks: the default model and data, and a fair timer."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from probe.data import load_dataset, make_loader
from probe.models import cifar_resnet


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--depth", type=int, default=56, help="CIFAR-style ResNet depth (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the minimum is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="use only the first N test samples (default: all 360)")
    return p


def default_setup(args) -> tuple[torch.nn.Module, list]:
    """ResNet-`depth` for digits (timings do not depend on trained weights) and the test split
    as a list of batches already on the device, so that loading is not what we time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = cifar_resnet(args.depth, num_classes=10, in_channels=1).to(device).eval()
    loader = make_loader(load_dataset("digits", split="test"), batch_size=args.batch_size, limit=args.samples)
    data = [(x.to(device), y.to(device)) for x, y in loader]
    return model, data


def best_time(function: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Minimum wall time of `repeats` runs after one warm-up run (the least noisy estimate)."""
    function()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)
