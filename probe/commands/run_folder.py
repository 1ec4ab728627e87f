"""An output folder that survives interruption: it records what run it belongs to, and keeps
finished pieces of work so that rerunning the same command resumes instead of starting over.

    out/run.json           the run's configuration (model, checkpoint hash, data, mode, seed, versions)
    out/partial/<name>.pt  finished pieces (tables and tensors), each written atomically
    out/.lock              locked (flock) while a run writes into the folder

A rerun with the same configuration reuses the pieces; a rerun with another configuration is
refused, so results of two different runs are never mixed, and so is a second run while one is
using the folder. A piece that cannot be read back is computed again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

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
    """`out`, bound to one run configuration; see the module docstring.

    A writer holds an exclusive lock on the folder until `close()` or the end of a `with` block
    (at the latest until it is collected, or the process ends): a second RunDirectory on the
    folder raises ProbeError meanwhile.
    """

    def __init__(self, out: str | Path, config: Mapping, *, writer: bool = True) -> None:
        self.path = prepare_out_dir(out)
        self.writer = writer  # under torchrun only rank 0 writes; the others read what it wrote
        self._lock = self._acquire_lock() if writer else None
        try:
            self._bind_config(config)
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> BinaryIO:
        handle = open(self.path / ".lock", "ab")  # kept open: the lock lives as long as the file
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ProbeError(f"another probe run is using --out {str(self.path)!r}; wait for it to finish, "
                             "or choose another --out.") from None
        return handle

    def close(self) -> None:
        """Release the folder for other runs; safe to call twice."""
        handle, self._lock = self._lock, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _bind_config(self, config: Mapping) -> None:
        self.config = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
        self._partial = self.path / "partial"
        if self.writer and self._partial.exists() and not self._partial.is_dir():
            raise ProbeError(f"{str(self._partial)!r} is a file, where probe keeps the finished pieces of a run; "
                             "remove or rename that file, or choose another --out.")
        recorded = self.path / "run.json"
        if recorded.exists():
            try:
                previous = json.loads(recorded.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None
            if _compared(previous) != _compared(self.config):
                raise ProbeError(self._mismatch(previous))
        elif self.writer:
            write_text(recorded, json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def _mismatch(self, previous: Mapping | None) -> str:
        if not isinstance(previous, Mapping):
            return (f"--out {str(self.path)!r} holds an unreadable run.json; "
                    "choose another --out or delete that folder.")
        keys = sorted((set(previous) | set(self.config)) - set(UNCOMPARED))
        differing = [f"{k}: {previous.get(k)!r} there, {self.config.get(k)!r} now" for k in keys
                     if previous.get(k) != self.config.get(k)]
        return (f"--out {str(self.path)!r} holds a run of another configuration ({'; '.join(differing[:3])}); "
                "resuming into it would mix results. Choose another --out, or delete that folder to start over.")

    def load(self, name: str, kind: type | tuple[type, ...] = object) -> object | None:
        """A finished piece of work, or None when there is none to use.

        A piece that cannot be read back (cut short, or not written by probe) or is not a `kind`
        is dropped, with a warning naming its file, so that the run computes it again.
        """
        path = self._partial / f"{name}.pt"
        if not path.exists():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a damaged file fails in many ways: pickle, zip, EOF, missing class
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            problem = f"cannot be read back ({type(error).__name__}: {reason})"
        else:
            if isinstance(value, kind):
                return value
            problem = f"holds a {type(value).__name__}, not the expected {_names(kind)}"
        warnings.warn(f"{path} {problem}; computing that piece again.", stacklevel=2)
        if self.writer:
            path.unlink(missing_ok=True)
        return None

    def save(self, name: str, value: object) -> None:
        if not self.writer:
            return
        self._partial.mkdir(exist_ok=True)
        atomic_write(self._partial / f"{name}.pt", lambda tmp: torch.save(value, tmp))


# Recorded, but no reason to refuse a resume: how many CPU threads ran (the numbers do not depend on it).
UNCOMPARED = ("threads",)


def _compared(record: object) -> object:
    return {k: v for k, v in record.items() if k not in UNCOMPARED} if isinstance(record, Mapping) else record


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
