"""Trained models cached on disk, keyed by their training config: train once, load afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

from torch import nn

from probe.errors import ProbeError
from probe.files import cache_dir
from probe.loading.checkpoints import load_checkpoint, save_checkpoint
from probe.loading.training import TrainConfig, build_for, train_model

__all__ = ["cache_dir", "cache_key", "cached_model", "checkpoint_path"]


def cache_key(config: TrainConfig) -> str:
    """A 12-hex-digit hash of every config field that can change the trained weights.

    `download` only says whether data may be fetched, so it is left out; `data_root` is made
    absolute so the same folder reached from two working directories gives one key.
    """
    fields = asdict(config)
    fields.pop("download", None)
    if fields.get("data_root") is not None:
        fields["data_root"] = str(Path(fields["data_root"]).expanduser().resolve())
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(config: TrainConfig) -> Path:
    """<cache_dir>/models/<model>-<dataset>-<cache_key>.pt"""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.model}-{config.dataset}")
    return cache_dir() / "models" / f"{stem}-{cache_key(config)}.pt"


def cached_model(config: TrainConfig, *, progress: bool = True) -> tuple[nn.Module, Path]:
    """(model in eval mode on `config.device`, checkpoint path) for `config`.

    Loads the cached checkpoint if there is one; otherwise trains with `train_model` and saves
    atomically (concurrent callers never read a partial file). An unreadable cache entry is
    retrained and replaced. Says on stderr, in one line, which of the two happened.
    """
    path = checkpoint_path(config)
    if path.is_file():
        model = build_for(config)
        try:
            load_checkpoint(model, path)
        except ProbeError as e:
            print(f"probe: cached checkpoint unusable ({e}); retraining.", file=sys.stderr)
        else:
            model.to(config.device).eval()
            print(f"probe: loaded {config.model} on {config.dataset} from cache {path}",
                  file=sys.stderr)
            return model, path
    start = time.perf_counter()
    model, history = train_model(config, progress=progress)
    seconds = time.perf_counter() - start
    save_checkpoint(
        model, path, config=asdict(config), history=history.to_dict(orient="list"),
        train_seconds=seconds,
    )
    final = history.iloc[-1]
    print(
        f"probe: trained {config.model} on {config.dataset} in {seconds:.0f} s "
        f"(test accuracy {final.test_accuracy:.4f}); saved to {path}",
        file=sys.stderr,
    )
    return model, path
