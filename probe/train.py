"""`python -m probe.train`: train a model on a data set and save its checkpoint.

    python -m probe.train --model resnet56 --dataset digits

The training itself is `probe.loading.training`; this is its command line.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from probe.batches import device_for
from probe.commands.runner import run_command
from probe.commands.config import RunConfig, add_options
from probe.commands.inputs import training_settings
from probe.files import prepare_out_file
from probe.loading.checkpoints import save_checkpoint
from probe.loading.training import TrainConfig, default_checkpoint_path, train_model

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m probe.train",
        description="Train a model on a data set and save its checkpoint.",
    )
    parser.add_argument("--out", help="checkpoint path (default: runs/<model>-<dataset>-seed<seed>.pt)")
    return add_options(parser, "training")


def _train_config(config: RunConfig) -> TrainConfig:
    """What `config` trains: the same settings, cache key included, as `probe.ablate` would train."""
    return training_settings(config, device_for(config.device), limit=config.limit)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a user error, printed as one line)."""

    def body(args: argparse.Namespace) -> int:
        config = _train_config(RunConfig.from_args(args))
        out = prepare_out_file(args.out or default_checkpoint_path(config))  # refused before training
        start = time.perf_counter()
        model, history = train_model(config, progress=not args.no_progress)
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
