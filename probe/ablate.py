"""`python -m probe.ablate`: find, measure, ablate and report on a trained residual network.

With no arguments it trains (once, then caches) a CIFAR-style ResNet-56 on scikit-learn's
digits, measures every block's branch against its shortcut, deletes each block alone, prints
which blocks carry the network and which it skips, and writes `blocks.csv` and `report.html`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tqdm.auto import tqdm

from probe import distributed
from probe.batches import device_for
from probe.errors import ProbeError


@dataclass(frozen=True)
class RunConfig:
    """What one `probe.ablate` run measures; recorded in the report and the out folder."""

    model: str = "resnet56"
    checkpoint: str | None = None
    weights: str | None = None
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    split: str = "test"
    mode: str = "zero"
    device: str = "auto"
    batch_size: int = 256
    limit: int | None = None
    seed: int = 0
    epochs: int | None = None
    out: str | None = None
    # The analysis sections of the report (analyses.pipeline.SECTIONS). None: every one that
    # applies (degradation only when the model is trained here); `skip` leaves some out.
    sections: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    degradation_depths: tuple[int, ...] = (20, 56)
    bn_recalibrate: bool = False
    calibration_samples: int = 256
    random_draws: int = 3
    curve_points: int | None = 14
    blocks_spec: str | None = None
    save_every: int = 8
    precision: str = "fp32"
    channels_last: bool | None = None
    bootstrap: int = 1000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m probe.ablate",
        description="Measure each residual block's branch F(x) against its shortcut s(x), delete each "
                    "block alone, and report which blocks carry the network and which it skips. "
                    "Without --checkpoint or --weights, the model is trained on the data set's "
                    "training split first and cached (under $XDG_CACHE_HOME/probe, or ~/.cache/probe).",
    )
    add = parser.add_argument
    add("--model", default="resnet56",
        help="CIFAR-style resnet20/32/44/56/110, a torchvision name (resnet18, resnet50, ...), "
             "or package.module:factory for your own model (default: %(default)s)")
    add("--checkpoint", help="a state_dict (.pt/.pth) for --model; skips training")
    add("--weights", help="torchvision weights name (e.g. DEFAULT); needs a machine that can download them")
    add("--dataset", default="digits",
        help="digits (built in, default), cifar10, cifar100, mnist or imagefolder (with --data-root)")
    add("--data-root", help="folder holding the data set's files (default: the probe cache)")
    add("--download", action="store_true", help="download torchvision data sets that are missing")
    add("--split", default="test", choices=["train", "test"], help="which split to measure on (default: %(default)s)")
    add("--mode", default="zero", choices=["zero", "mean"],
        help="what replaces a deleted branch: zeros, or its mean output over the data (default: %(default)s)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="auto picks cuda when available (default: %(default)s)")
    add("--batch-size", type=int, default=256, help="samples per forward pass (default: %(default)s)")
    add("--limit", type=int, help="use only the first N samples of the split")
    add("--epochs", type=int, help="training epochs when the model must be trained (default: the trainer's)")
    add("--seed", type=int, default=0, help="seed for training and data order (default: %(default)s)")
    add("--out", help="output folder (default: runs/<model>-<dataset>)")
    from analyses.pipeline import SECTIONS as sections

    add("--sections", nargs="+", choices=sections, metavar="SECTION",
        help=f"analysis sections to run, of: {', '.join(sections)} (default: all; degradation only when the "
             "model is trained here)")
    add("--skip", nargs="+", choices=sections, default=(), metavar="SECTION",
        help="analysis sections to leave out, e.g. --skip degradation recalibration (the slowest)")
    add("--degradation-depths", type=int, nargs="+", default=(20, 56), metavar="DEPTH",
        help="depths of the plain and residual nets the degradation section trains (default: 20 56)")
    add("--bn-recalibrate", action="store_true",
        help="refit BatchNorm statistics on held-out training data after every deletion, before evaluating")
    add("--calibration-samples", type=int, default=256,
        help="training samples for BatchNorm recalibration (default: %(default)s)")
    add("--random-draws", type=int, default=3, help="random deletion orders in the deletion curves (default: %(default)s)")
    add("--curve-points", type=int, default=14,
        help="k values per deletion curve, spread from 1 to all blocks (default: %(default)s)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples per block (default: %(default)s)")
    add("--blocks-spec", metavar="SPEC",
        help="name the blocks yourself instead of discovering them: 'MODULE[#K]=BRANCH[,SHORTCUT];...' "
             "or a JSON file (see probe.parse_spec)")
    add("--list-blocks", action="store_true",
        help="print the discovered blocks (name, branch, shortcut, output shape) and exit")
    add("--save-every", type=int, default=8, metavar="N",
        help="save sweep results every N blocks, so an interrupted run resumes (default: %(default)s)")
    add("--precision", default="fp32", choices=list(_PRECISIONS),
        help="fp32, or autocast to bf16/fp16 for the forward passes (statistics stay in fp32; default: %(default)s)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="run convolutions in channels_last memory format (default: on for cuda, off for cpu)")
    add("--no-progress", action="store_true", help="hide progress bars")
    return parser


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(config: RunConfig, device: torch.device):
    """The autocast context `--precision` asks for (a no-op for fp32)."""
    dtype = _PRECISIONS[config.precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type == "cpu":
        raise ProbeError("--precision fp16 needs --device cuda; on the CPU use bf16 or fp32.")
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_model(config: RunConfig, device: torch.device, *, progress: bool,
               train: bool = True) -> tuple[nn.Module, str]:
    """The model to probe, and where its weights came from (`train=False`: untrained if no
    checkpoint is given, for listing its blocks)."""
    from probe.data import dataset_info
    from probe.models import build_model, load_checkpoint

    info = dataset_info(config.dataset, root=config.data_root)
    if config.checkpoint or config.weights:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            weights=config.weights)
        if config.checkpoint:
            load_checkpoint(model, config.checkpoint)
        return model.to(device).eval(), config.checkpoint or f"weights={config.weights}"
    untrained = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels)
    if not train:
        return untrained.to(device).eval(), "untrained"
    if not config.blocks_spec:
        import probe

        probe.find_blocks(untrained)  # a model with no residual block is refused before it is trained
    from probe.cache import cached_model
    from probe.train import TrainConfig

    fields = {"epochs": config.epochs} if config.epochs else {}
    train_config = TrainConfig(model=config.model, dataset=config.dataset, seed=config.seed,
                               device=str(device), data_root=config.data_root, download=config.download,
                               **fields)
    # Under torchrun rank 0 trains (or loads) first; the others then load its checkpoint.
    if distributed.rank() != 0:
        distributed.barrier()
    model, path = cached_model(train_config, progress=progress)
    if distributed.rank() == 0:
        distributed.barrier()
    return model.to(device).eval(), str(path)


def _run_record(config: RunConfig, source: str, blocks: list) -> dict:
    """What makes two runs the same: resuming into an out folder requires an equal record."""
    import torchvision

    import probe
    from probe.rundir import file_digest

    checkpoint = Path(source)
    return {
        "model": config.model, "checkpoint": source,
        "checkpoint_sha256": file_digest(checkpoint) if checkpoint.is_file() else None,
        "dataset": config.dataset, "split": config.split, "limit": config.limit, "seed": config.seed,
        "mode": config.mode, "batch_size": config.batch_size, "bn_recalibrate": config.bn_recalibrate,
        "precision": config.precision,
        "blocks": [block.name for block in blocks], "save_every": config.save_every,
        "versions": {"probe": probe.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def list_blocks(config: RunConfig) -> str:
    """The `--list-blocks` table: every block with its branch, shortcut and output shape."""
    import probe
    from probe.data import load_dataset

    model, _ = load_model(config, device_for(config.device), progress=False, train=False)
    image, _ = load_dataset(config.dataset, split=config.split, root=config.data_root,
                            download=config.download, seed=config.seed)[0]
    blocks = probe.find_blocks(model, spec=config.blocks_spec) if config.blocks_spec else None
    table = probe.describe_blocks(model, image.unsqueeze(0).to(device_for(config.device)), blocks=blocks)
    return table.to_string(index=False)


def run(config: RunConfig, *, progress: bool = True) -> tuple[pd.DataFrame, dict, Path]:
    """Everything the CLI does, for notebooks: returns (block table, baseline, out folder).

    Besides the per-block table, runs the analyses `config` asks for (analyses.pipeline) and
    writes their tables, and a report section each, next to blocks.csv and report.html.
    """
    import probe
    from analyses.evaluation import evaluate_sets, sweep_table
    from analyses.pipeline import calibration_for, choose_sections
    from analyses.verdict import VerdictRule, classify
    from probe.data import load_dataset, make_loader
    from probe.files import prepare_out_dir
    from probe.rundir import RunDirectory

    # Settings are checked before anything is trained or loaded.
    for name in ("calibration_samples", "bootstrap"):
        if getattr(config, name) < 1:
            raise ProbeError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(config, name)}.")
    if config.random_draws < 0:
        raise ProbeError(f"--random-draws must be 0 or more, got {config.random_draws}.")
    if config.curve_points is not None and config.curve_points < 2:
        raise ProbeError(f"--curve-points must be 2 or more, got {config.curve_points}.")
    chosen, _ = choose_sections(config)
    out = prepare_out_dir(config.out or Path("runs") / f"{config.model.replace(':', '_')}-{config.dataset}")
    device = device_for(config.device)
    _autocast(config, device)  # refuse an impossible precision before any work
    distributed.init_from_environment(device)
    model, source = load_model(config, device, progress=progress)
    if config.channels_last if config.channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # our own copy: the checkpoint is untouched
    blocks = probe.find_blocks(model, spec=config.blocks_spec) if config.blocks_spec else probe.find_blocks(model)
    dataset = load_dataset(config.dataset, split=config.split, root=config.data_root,
                           download=config.download, seed=config.seed)
    if config.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(config.limit, len(dataset))))
    loader = make_loader(distributed.shard(dataset), batch_size=config.batch_size,
                         pin_memory=device.type == "cuda")
    calibration = calibration_for(config, needed=chosen)
    run_dir = RunDirectory(out, _run_record(config, source, blocks), writer=distributed.rank() == 0)
    seconds = {}
    start = time.perf_counter()
    stats = run_dir.load("measure")
    if stats is None:
        with _autocast(config, device):
            stats = probe.measure(model, loader, blocks=blocks, progress=progress)
        run_dir.save("measure", stats)
    seconds["measure"] = time.perf_counter() - start
    start = time.perf_counter()
    # One sweep serves the table and the uncertainty section (per-class and per-sample outcomes),
    # saved every `save_every` blocks: an interrupted run resumes from the last saved piece.
    baseline, results = None, []
    pieces = [blocks[i:i + config.save_every] for i in range(0, len(blocks), config.save_every)]
    outer = progress and len(pieces) > 1  # one bar over the pieces, or the sweep's own bar
    for index, piece in enumerate(tqdm(pieces, desc=f"sweep ({len(blocks)} blocks)", unit="piece", disable=not outer)):
        evaluation = run_dir.load(f"sweep-{index}")
        if evaluation is None:
            with _autocast(config, device):
                evaluation = evaluate_sets(model, loader, [[block] for block in piece], mode=config.mode,
                                           calibration=calibration if config.bn_recalibrate else None,
                                           per_class=True, outcomes=True, progress=progress and not outer)
            run_dir.save(f"sweep-{index}", evaluation)
        baseline = evaluation[0]
        results += evaluation[1]
    result = sweep_table(blocks, baseline, results, mode=config.mode, recalibrated=config.bn_recalibrate)
    evaluation = (baseline, results)
    seconds["sweep"] = time.perf_counter() - start
    baseline = result.attrs["baseline"]
    table = classify(stats.merge(result.drop(columns="samples"), on=["block", "position"]), VerdictRule())
    if distributed.rank() != 0:
        distributed.barrier()  # every process holds the totals; rank 0 alone writes and reports
        return table, baseline, out
    # The analyses after the sweep run in rank 0 alone, on all the data.
    with distributed.local(), _autocast(config, device):
        loader = make_loader(dataset, batch_size=config.batch_size, pin_memory=device.type == "cuda")
        _write_outputs(config, model, loader, table, evaluation, baseline, calibration, source,
                       device, out, seconds, progress, blocks)
    distributed.barrier()
    return table, baseline, out


def _write_outputs(config, model, loader, table, evaluation, baseline, calibration, source,
                   device, out, seconds, progress, blocks) -> None:
    """blocks.csv, the analyses' tables and figures, and report.html."""
    import probe
    from analyses.pipeline import run_analyses
    from analyses.verdict import VerdictRule
    from probe.files import write_csv
    from reports.html import write_report

    write_csv(out / "blocks.csv", table)
    analyses = run_analyses(model, loader, table, evaluation, config=config, out=out, device=str(device),
                            calibration=calibration, sweep_seconds=seconds["sweep"], blocks=blocks,
                            progress=progress)
    seconds.update(analyses.seconds)
    versions = {"torch": torch.__version__, "probe": probe.__version__}
    report_config = {**{k: v for k, v in vars(config).items() if v is not None and v != ()},
                     "checkpoint": source, "device": str(device), "samples": baseline["samples"],
                     "BN recalibration": (f"on ({len(calibration.dataset)} held-out training samples)"
                                          if config.bn_recalibrate else "off (trained BatchNorm statistics)"),
                     "seconds": {name: f"{value:.1f}" for name, value in seconds.items()},
                     "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M")}
    write_report(out / "report.html", table, baseline=baseline, config=report_config, rule=VerdictRule(),
                 sections=analyses.sections)


def format_summary(table: pd.DataFrame, baseline: dict, out: Path, n: int = 5) -> str:
    """The short terminal answer: what helps most, what is skipped, where the files are."""
    from analyses.verdict import VerdictRule, summarize

    summary = summarize(table, n=n)
    lines = [f"baseline: accuracy {baseline['accuracy']:.2%}, loss {baseline['loss']:.4f} "
             f"on {baseline['samples']} samples; {len(table)} residual blocks", ""]
    columns = ["block", "ratio", "cosine", "accuracy_drop", "flip_rate", "verdict"]
    shown = table[columns].copy()
    shown["accuracy_drop"] = (shown["accuracy_drop"] * 100).map("{:+.1f} pts".format)
    shown["flip_rate"] = (shown["flip_rate"] * 100).map("{:.1f}%".format)
    if summary["helps_most"]:
        helps = shown.set_index("block").loc[summary["helps_most"]]
        lines += ["blocks that help most (deleting one alone costs the most accuracy):",
                  helps.to_string(float_format="{:.3f}".format), ""]
    else:
        lines += ["no block costs more than noise when deleted alone.", ""]
    skipped = summary["skipped"]
    lines.append(f"skipped blocks ({len(skipped)}): " + (", ".join(skipped) if skipped else "none"))
    lines.append(f"rule: {VerdictRule().describe()}")
    lines.append(f"Spearman rank correlation of ratio with accuracy drop: {summary['spearman_rho']:+.2f}")
    lines += ["", f"wrote {out / 'blocks.csv'} and {out / 'report.html'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    try:
        from probe.train import default_threads

        default_threads()
        for name in ("batch_size", "limit", "epochs", "save_every"):
            value = getattr(config, name)
            if value is not None and value < 1:
                raise ProbeError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
        if args.list_blocks:
            print(list_blocks(config))
            return 0
        table, baseline, out = run(config, progress=not args.no_progress and distributed.rank() == 0)
    except ProbeError as error:
        print(f"probe.ablate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probe.ablate: interrupted. Finished pieces are kept in the out folder: rerun the same "
              "command to resume.", file=sys.stderr)
        return 130
    if distributed.rank() == 0:
        print(format_summary(table, baseline, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
