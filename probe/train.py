"""`python -m probe.train`: train a model on a data set and save its checkpoint.

    python -m probe.train --model resnet56 --dataset digits

The training itself is `probe.training`; this is its command line.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from probe.cli import run_command
from probe.models import save_checkpoint
from probe.training import TrainConfig, default_checkpoint_path, train_model

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m probe.train",
        description="Train a model on a data set and save its checkpoint.",
    )
    p.add_argument("--model", default=d.model,
                   help=f"model name, e.g. resnet20, resnet56, plain56, resnet18, or "
                        f"package.module:factory (default: {d.model})")
    p.add_argument("--dataset", default=d.dataset, help=f"data set name (default: {d.dataset})")
    p.add_argument("--data-root", default=None,
                   help="directory holding (or receiving) the data set files")
    p.add_argument("--download", action="store_true",
                   help="download the data set if it is not under --data-root")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"passes over the training set (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"training batch size (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak learning rate, decayed to 0 by a cosine (default: {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help=f"SGD momentum (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"L2 weight decay (default: {d.weight_decay})")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N samples of each split (quick runs)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed for weights and data order (default: {d.seed})")
    p.add_argument("--device", default=d.device, help=f"torch device (default: {d.device})")
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: runs/<model>-<dataset>-seed<seed>.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a user error, printed as one line)."""

    def body(args: argparse.Namespace) -> int:
        config = TrainConfig(
            model=args.model, dataset=args.dataset, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, seed=args.seed, device=args.device,
            limit=args.limit, data_root=args.data_root, download=args.download,
        )
        out = Path(args.out) if args.out else default_checkpoint_path(config)
        start = time.perf_counter()
        model, history = train_model(config, progress=not args.quiet)
        seconds = time.perf_counter() - start
        final = history.iloc[-1]
        save_checkpoint(model, out, config=asdict(config), history=history.to_dict(orient="list"),
                        train_seconds=seconds)
        print(f"{config.model} on {config.dataset}: train accuracy {final.train_accuracy:.4f}, "
              f"test accuracy {final.test_accuracy:.4f} ({config.epochs} epochs, {seconds:.1f} s)")
        print(f"checkpoint saved to {out}")
        return 0

    return run_command(_parser(), body, argv, name="probe.train")


if __name__ == "__main__":
    raise SystemExit(main())
