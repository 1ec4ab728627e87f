"""Shared setup for the benchmarks: a model and data on the device, precision, and a fair timer."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from probe.loading.datasets import load_dataset, make_loader
from probe.loading.models import build_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--model", default="resnet56",
                   help="CIFAR-style resnetN/plainN or a torchvision name (default: %(default)s)")
    p.add_argument("--data", default="digits", choices=["digits", "synthetic"],
                   help="the digits test split (360 images, 1x16x16), or random images of "
                        "--image-size (timings do not depend on the pixels; default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic images' side (default: %(default)s)")
    p.add_argument("--channels", type=int, default=3, help="synthetic images' channels (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=None,
                   help="digits: use only the first N test samples; synthetic: N images (default 2048)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast dtype for every timed forward (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds, in which the timed functions take turns (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    return p


def default_setup(args) -> tuple[torch.nn.Module, list]:
    """The model in eval mode (untrained: timings do not depend on the weights) and the data as
    a list of batches already on the device, so that loading is not what we time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.data == "digits":
        channels, classes = 1, 10
        loader = make_loader(load_dataset("digits", split="test"), batch_size=args.batch_size, limit=args.samples)
        data = list(loader)
    else:
        channels, classes = args.channels, 10
        samples = args.samples or 2048
        generator = torch.Generator().manual_seed(1)
        data = [(torch.randn(min(args.batch_size, samples - start), channels, args.image_size, args.image_size,
                             generator=generator),
                 torch.randint(0, classes, (min(args.batch_size, samples - start),), generator=generator))
                for start in range(0, samples, args.batch_size)]
    model = build_model(args.model, num_classes=classes, in_channels=channels).to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    data = [(x.to(device, memory_format=memory_format), y.to(device)) for x, y in data]
    return model, data


def describe(args, model_blocks: int, data: list) -> str:
    """One line naming the workload, for the top of each benchmark's output."""
    samples = sum(len(y) for _, y in data)
    shape = "x".join(str(n) for n in data[0][0].shape[1:])
    layout = ", channels_last" if args.channels_last else ""
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    return (f"{args.model} ({model_blocks} blocks), {samples} {args.data} images {shape}, batch {args.batch_size}, "
            f"{args.device}, {args.precision}{layout}{threads}")


def plain_inference(model: torch.nn.Module, data: list, args) -> Callable[[], None]:
    """The baseline every ratio is taken against: one no-grad forward over every batch."""

    def run() -> None:
        with torch.no_grad(), autocast(args):
            for inputs, _ in data:
                model(inputs)

    return run


def autocast(args):
    """The autocast context `--precision` asks for (none for fp32)."""
    dtype = PRECISIONS[args.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


def best_time(function: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Minimum wall time of `repeats` runs after one warm-up run (the least noisy estimate)."""
    return best_times([function], repeats, device)[0]


def best_times(functions: list[Callable[[], object]], repeats: int, device: str = "cpu") -> list[float]:
    """Minimum wall time of each function over `repeats` rounds (see `timed_rounds`)."""
    return [min(spent) for spent in timed_rounds(functions, repeats, device)]


def timed_rounds(functions: list[Callable[[], object]], repeats: int, device: str = "cpu") -> list[list[float]]:
    """Wall time of each function in each of `repeats` rounds, after one warm-up each. The
    functions take turns within every round, so a slow spell on a shared machine hits all of
    them alike instead of the one that happened to run then."""
    for function in functions:
        function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, spent in zip(functions, times):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator within the same round. The ratio of the two
    minima rewards whichever function had the luckiest round: on the dev VM, whose host takes
    back up to half the CPU, it swung from 0.89 to 1.18 between runs of the hook benchmark, while
    medians over 40 rounds stayed between 1.07 and 1.11."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
