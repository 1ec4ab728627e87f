"""An output folder that survives interruption: it records what run it belongs to, and keeps
finished pieces of work so that rerunning the same command resumes instead of starting over.

    out/run.json           the run's configuration (model and its digest, data, mode, seed, versions)
    out/partial/<name>.pt  finished pieces (tables and tensors), each written atomically and
                           stamped with the configuration that computed it
    out/.lock              locked (flock) while a run writes into the folder; names its holder

A rerun with the same configuration reuses the pieces; a rerun with another configuration is
refused, so results of two different runs are never mixed, and so is a second run while one is
using the folder. A piece is used only by the configuration that computed it, with or without
run.json: one of another configuration (run.json deleted, pieces copied in), one that does not
say which (written by an earlier probe) and one that cannot be read back are computed again,
with a warning.

Under torchrun the folder is rank 0's: it alone takes the lock, reads and writes, and gives the
other processes the pieces it found, so that all of them resume alike (they need no shared file
system). A restarted attempt of the same torchrun job (`--max-restarts`) waits a while for the
lock its dead predecessor may still hold on a network file system, instead of refusing.

The stamp is a file `probe-piece.json` inside the piece's own zip archive (`torch.save`'s
format), beside its `data.pkl`: `torch.load` still reads a piece as the bare value, and the value
and its stamp are written in one atomic rename. It holds the digest of the compared record (the
record but UNCOMPARED) and that record, so that a mismatch can say what differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from probe import distributed
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
        self.path = Path(out).expanduser()
        self.writer = writer  # under torchrun rank 0 alone (distributed.leader())
        self._lock: BinaryIO | None = None
        # Under torchrun rank 0 alone reads and writes the folder, and hands every other process
        # what it found (`load`): they need no shared file system, never see a file rank 0 does
        # not (a network file system's caches), and their ranks hold no lock on it.
        self._relayed = distributed.active()
        self._bind_config(config, check=False)  # every process knows the configuration
        if self._relayed:
            self._refuse_unequal_processes()
            distributed.on_leader(lambda: self._open(config))
        else:
            self._open(config)

    def _refuse_unequal_processes(self) -> None:
        """Under torchrun, ProbeError in every process unless all run the same configuration: a
        node with another file at the checkpoint's path, other data, another torch, or a model
        it trained itself (an unshared cache) would sum its shard into the others' silently."""
        records = distributed.gather_objects([_compared(self.config)])
        for other, record in enumerate(records):
            if record != records[0]:
                keys = sorted(set(record) | set(records[0]))
                differing = [f"{k}: {_short(records[0].get(k))} in rank 0, {_short(record.get(k))} in rank {other}"
                             for k in keys if record.get(k) != records[0].get(k)]
                raise ProbeError(f"the processes of this torchrun job do not run the same thing "
                                 f"({'; '.join(differing[:2])}); give every node the same model file, data and "
                                 "software (a --checkpoint on a shared file system, not a model each node trains "
                                 "into its own cache).")

    def _open(self, config: Mapping) -> None:
        self.path = prepare_out_dir(self.path)
        self._lock = self._acquire_lock() if self.writer else None
        try:
            self._bind_config(config)
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> BinaryIO:
        handle = open(self.path / ".lock", "a+b")  # kept open: the lock lives as long as the file
        # A restarted torchrun attempt may find the lock of the attempt before it still held: on a
        # network file system a dead machine's lock lasts until the server's lease on it expires.
        deadline = time.monotonic() + (RESTART_LOCK_WAIT if _held_by_earlier_attempt(handle) else 0)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    raise ProbeError(f"another probe run is using --out {str(self.path)!r}; wait for it to "
                                     "finish, or choose another --out.") from None
                time.sleep(1)
        handle.truncate(0)  # who holds it: a restarted attempt of the same job waits for it (above)
        handle.write(json.dumps(_holder()).encode())
        handle.flush()
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

    def _bind_config(self, config: Mapping, *, check: bool = True) -> None:
        self.config = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
        self.digest = config_digest(self.config)
        self._foreign: set[str] = set()  # digests of other configurations whose pieces were dropped
        self._partial = self.path / "partial"
        if not check:
            return
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
        return (f"--out {str(self.path)!r} holds a run of another configuration ({self._differences(previous)}); "
                "resuming into it would mix results. Choose another --out, or delete that folder to start over.")

    def _differences(self, previous: Mapping) -> str:
        """The first three compared keys whose values differ, "key: old there, new now"."""
        keys = sorted((set(previous) | set(self.config)) - set(UNCOMPARED))
        def shown(record: Mapping, key: str) -> str:  # a key one record lacks differs from None too
            return repr(record[key]) if key in record else "(not recorded)"

        differing = [f"{k}: {shown(previous, k)} there, {shown(self.config, k)} now" for k in keys
                     if shown(previous, k) != shown(self.config, k)]
        return "; ".join(differing[:3])

    def load(self, name: str, kind: type | tuple[type, ...] = object) -> object | None:
        """A finished piece of work, or None when there is none to use.

        A piece that cannot be read back (cut short, or not written by probe), that another
        configuration computed or that does not say which did, or that is not a `kind`, is
        dropped, with a warning naming its file, so that the run computes it again. Pieces of
        another configuration are announced once per configuration (the first one's file, and
        what differs). Under torchrun, rank 0's answer in every process: they all resume alike.
        """
        if self._relayed:
            return distributed.from_leader(self._read(name, kind) if distributed.leader() else None)
        return self._read(name, kind)

    def _read(self, name: str, kind: type | tuple[type, ...]) -> object | None:
        path = self._partial / f"{name}.pt"
        if not path.exists():
            return None
        again = "that piece"
        try:
            stamp = _read_stamp(path)
            foreign = stamp is None or stamp.get("config") != self.digest
            value = None if foreign else torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # a damaged file fails in many ways: pickle, zip, EOF, missing class
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            problem = f"cannot be read back ({type(error).__name__}: {reason})"
        else:
            if foreign:
                problem, again = self._foreign_piece(stamp), "it and every other such piece"
            elif isinstance(value, kind):
                return value
            else:
                problem = f"holds a {type(value).__name__}, not the expected {_names(kind)}"
        if problem:
            warnings.warn(f"{path} {problem}; computing {again} again.", stacklevel=3)
        if self.writer:
            path.unlink(missing_ok=True)
        return None

    def _foreign_piece(self, stamp: Mapping | None) -> str | None:
        """Why a piece of another configuration is not used, in words; None when a piece of that
        configuration was announced already."""
        other = "unstamped" if stamp is None else str(stamp.get("config"))
        if other in self._foreign:
            return None
        self._foreign.add(other)
        if stamp is None:
            return "does not say which configuration computed it (an earlier probe wrote it)"
        record = stamp.get("record")
        differences = self._differences(record) if isinstance(record, Mapping) else ""
        return f"was computed by another configuration ({differences or 'what differs is not recorded'})"

    def annotate(self, key: str, value: object) -> None:
        """Add `key` (one of UNCOMPARED: a fact about this run, not its configuration) to run.json."""
        if key not in UNCOMPARED:
            raise ValueError(f"run.json records {key!r} as configuration; only {UNCOMPARED} may be added")
        self.config[key] = json.loads(json.dumps(value, default=str))
        if self.writer:
            write_text(self.path / "run.json", json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def save(self, name: str, value: object) -> None:
        if not self.writer:
            return
        self._partial.mkdir(exist_ok=True)
        stamp = {"config": self.digest, "record": _compared(self.config)}

        def write(tmp: Path) -> None:
            torch.save(value, tmp)
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(f"{_archive_folder(archive)}/{STAMP}", json.dumps(stamp, sort_keys=True))

        atomic_write(self._partial / f"{name}.pt", write)


# Recorded, but no reason to refuse a resume: how many CPU threads ran (the numbers do not depend on it),
# what the run's stages evaluated (`RunDirectory.annotate`), and how --batch-size auto chose (the
# memory free then; the chosen size itself is `batch_size`, compared).
UNCOMPARED = ("threads", "evaluations", "batch_size_auto")


# Seconds a restarted torchrun attempt waits for the lock its previous attempt held (a network
# file system's lease on a dead machine's lock: 90 s by default for NFSv4).
RESTART_LOCK_WAIT = 180


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _holder() -> dict:
    """Who holds the lock: the torchrun job (its run id) and attempt, or a plain process."""
    return {"job": os.environ.get("TORCHELASTIC_RUN_ID"), "attempt": distributed.restart_count(),
            "host": socket.gethostname(), "pid": os.getpid()}


def _held_by_earlier_attempt(handle: BinaryIO) -> bool:
    """Whether the lock file names an earlier attempt of this torchrun job as its holder."""
    if distributed.restart_count() == 0 or os.environ.get("TORCHELASTIC_RUN_ID") is None:
        return False
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or b"null")
    except ValueError:
        return False
    return (isinstance(holder, dict) and holder.get("job") == os.environ.get("TORCHELASTIC_RUN_ID")
            and isinstance(holder.get("attempt"), int) and holder["attempt"] < distributed.restart_count())


# The name of a piece's stamp inside its zip archive.
STAMP = "probe-piece.json"


def config_digest(record: Mapping) -> str:
    """sha256 (first 16 hex digits) of a run record's compared part: what a piece is stamped with."""
    text = json.dumps(_compared(json.loads(json.dumps(dict(record), default=str))), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compared(record: object) -> object:
    return {k: v for k, v in record.items() if k not in UNCOMPARED} if isinstance(record, Mapping) else record


def _archive_folder(archive: zipfile.ZipFile) -> str:
    """The one folder every record of torch.save's archive lies in (torch.load refuses others)."""
    return archive.namelist()[0].split("/")[0]


def _read_stamp(path: Path) -> dict | None:
    """A piece's stamp, or None for a piece without one (raises for a file that is no zip)."""
    with zipfile.ZipFile(path) as archive:
        try:
            stamp = json.loads(archive.read(f"{_archive_folder(archive)}/{STAMP}"))
        except KeyError:
            return None
    return stamp if isinstance(stamp, dict) else None


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
