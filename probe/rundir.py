"""An output folder that survives interruption: it records what run it belongs to, and keeps
finished pieces of work so that rerunning the same command resumes instead of starting over.

    out/run.json           the run's configuration (model, checkpoint hash, data, mode, seed, versions)
    out/partial/<name>.pt  finished pieces (tables and tensors), each written atomically

A rerun with the same configuration reuses the pieces; a rerun with another configuration is
refused, so results of two different runs are never mixed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from probe.errors import ProbeError
from probe.files import atomic_write, prepare_out_dir, write_text


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits): the identity of a checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class RunDirectory:
    """`out`, bound to one run configuration; see the module docstring."""

    def __init__(self, out: str | Path, config: Mapping, *, writer: bool = True) -> None:
        self.path = prepare_out_dir(out)
        self.writer = writer  # under torchrun only rank 0 writes; the others read what it wrote
        self.config = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
        self._partial = self.path / "partial"
        recorded = self.path / "run.json"
        if recorded.exists():
            try:
                previous = json.loads(recorded.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous != self.config:
                raise ProbeError(self._mismatch(previous))
        elif writer:
            write_text(recorded, json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def _mismatch(self, previous: Mapping | None) -> str:
        if not isinstance(previous, Mapping):
            return (f"--out {str(self.path)!r} holds an unreadable run.json; "
                    "choose another --out or delete that folder.")
        keys = sorted(set(previous) | set(self.config))
        differing = [f"{k}: {previous.get(k)!r} there, {self.config.get(k)!r} now" for k in keys
                     if previous.get(k) != self.config.get(k)]
        return (f"--out {str(self.path)!r} holds a run of another configuration ({'; '.join(differing[:3])}); "
                "resuming into it would mix results. Choose another --out, or delete that folder to start over.")

    def load(self, name: str) -> object | None:
        """A finished piece of work, or None."""
        path = self._partial / f"{name}.pt"
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def save(self, name: str, value: object) -> None:
        if not self.writer:
            return
        self._partial.mkdir(exist_ok=True)
        atomic_write(self._partial / f"{name}.pt", lambda tmp: torch.save(value, tmp))
