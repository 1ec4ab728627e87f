"""Output files that are either complete or absent: write a temporary file, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from probe.errors import ProbeError


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create `out` if needed; refuse a path that is a file or a folder we cannot write to."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ProbeError(f"--out {str(path)!r} is a file; give a folder (it is created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProbeError(f"cannot create --out folder {str(path)!r} ({error.strerror}); choose another place.") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ProbeError(f"--out folder {str(path)!r} is not writable; choose another place.")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should read like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: str | os.PathLike, table: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def write_tables(out: str | os.PathLike, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Each table as `out/<name>.csv`; the paths written."""
    return [write_csv(Path(out) / f"{name}.csv", table) for name, table in tables.items()]
