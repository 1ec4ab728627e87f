"""Command-line plumbing shared by `python -m analyses.NAME`: options, loading, outputs, errors.

Every analysis command takes the same model and data options as `python -m probe.ablate`
(the model is trained once and cached when no --checkpoint is given), writes its tables as CSV
and its figures as PNG into --out, and turns a ProbeError into one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from torch import nn

from probe.batches import device_for
from probe.errors import ProbeError

ANALYSES_OUT = Path("runs") / "analyses"


@dataclass
class Inputs:
    """What an analysis runs on: the model, the evaluation batches, and optional calibration batches."""

    model: nn.Module
    data: Iterable
    calibration: Iterable | None
    source: str
    progress: bool
    blocks: list | None = None  # from --blocks-spec; None: the analyses discover them


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    name = prog.rsplit(".", 1)[-1]
    parser.add_argument("--out", default=str(ANALYSES_OUT / name),
                        help="folder for the CSV tables and PNG figures (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for training, data and draws (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def model_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options of `probe.ablate` that choose the model, the data and the ablation."""
    parser = base_parser(prog, description)
    add = parser.add_argument
    add("--model", default="resnet56", help="model name, as for probe.ablate (default: %(default)s)")
    add("--checkpoint", help="a state_dict for --model; without it the model is trained once and cached")
    add("--dataset", default="digits", help="digits (default), cifar10, cifar100, mnist or imagefolder")
    add("--data-root", help="folder holding the data set's files")
    add("--download", action="store_true", help="download torchvision data sets that are missing")
    add("--split", default="test", choices=["train", "test"], help="split to evaluate on (default: %(default)s)")
    add("--mode", default="zero", choices=["zero", "mean"], help="what replaces a deleted branch (default: %(default)s)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    add("--batch-size", type=int, default=256, help="samples per forward pass (default: %(default)s)")
    add("--limit", type=int, help="use only the first N samples of the split")
    add("--epochs", type=int, help="training epochs when the model must be trained")
    add("--bn-recalibrate", action="store_true",
        help="after each deletion, refit BatchNorm statistics on held-out training data before evaluating")
    add("--calibration-samples", type=int, default=256,
        help="training samples used to refit BatchNorm statistics (default: %(default)s)")
    add("--blocks-spec", metavar="SPEC",
        help="name the blocks yourself instead of discovering them: 'MODULE[#K]=BRANCH[,SHORTCUT];...' "
             "or a JSON file (see probe.parse_spec)")
    return parser


def positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ProbeError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


def calibration_loader(dataset: str, *, samples: int, batch_size: int, seed: int = 0,
                       data_root: str | None = None, download: bool = False):
    """The first `samples` samples of the training split: data the evaluation never sees."""
    from probe.data import load_dataset, make_loader

    train = load_dataset(dataset, split="train", root=data_root, download=download, seed=seed)
    return make_loader(train, batch_size=batch_size, limit=samples)


def load_inputs(args: argparse.Namespace) -> Inputs:
    from probe.ablate import RunConfig, load_model
    from probe.data import load_dataset, make_loader

    for name in ("batch_size", "limit", "epochs", "calibration_samples"):
        positive(name, getattr(args, name))
    device = device_for(args.device)
    progress = not args.no_progress
    config = RunConfig(model=args.model, checkpoint=args.checkpoint, dataset=args.dataset,
                       data_root=args.data_root, download=args.download, seed=args.seed, epochs=args.epochs)
    model, source = load_model(config, device, progress=progress)
    dataset = load_dataset(args.dataset, split=args.split, root=args.data_root, download=args.download,
                           seed=args.seed)
    data = make_loader(dataset, batch_size=args.batch_size, limit=args.limit)
    calibration = None
    if args.bn_recalibrate:
        calibration = calibration_loader(args.dataset, samples=args.calibration_samples,
                                         batch_size=args.batch_size, seed=args.seed,
                                         data_root=args.data_root, download=args.download)
    blocks = None
    if args.blocks_spec:
        from probe.blocks import find_blocks

        blocks = find_blocks(model, spec=args.blocks_spec)
    return Inputs(model=model, data=data, calibration=calibration, source=source, progress=progress, blocks=blocks)


def write_tables(out: Path, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    from probe.files import write_csv

    return [write_csv(out / f"{name}.csv", table) for name, table in tables.items()]


def write_figure(path: Path, draw: Callable, df: pd.DataFrame, **kwargs) -> Path:
    """Draw `draw(df, ax=..., **kwargs)` and write it as a PNG, atomically."""
    from probe.files import atomic_write
    from reports.embed import render_png

    png = render_png(draw, df, **kwargs)
    return atomic_write(path, lambda tmp: tmp.write_bytes(png))


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace, Path], list[Path]],
        argv: list[str] | None) -> int:
    """Parse `argv`, run `body(args, out)`, list what it wrote; ProbeError -> one line, exit 2."""
    args = parser.parse_args(argv)
    try:
        from probe.files import prepare_out_dir
        from probe.train import default_threads

        default_threads()
        out = prepare_out_dir(args.out)
        written = body(args, out)
    except ProbeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
