"""Output files that are either complete or absent: write a temporary file, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING
from pathlib import Path

from probe.errors import ProbeError

if TYPE_CHECKING:  # only for annotations: a command's start does not wait for pandas
    import pandas as pd


def prepare_out_dir(out: str | os.PathLike, *, analysis: bool = False) -> Path:
    """Create `out` if needed, after refusing a place a run's files do not belong: a file, a
    folder we cannot write to, the root folder, the home folder, a folder that holds files probe does not write (a repository, a data set, someone's
    notes), where a run's several files and its partial/ folder would be scattered among them,
    and a folder that holds another run: for `probe.ablate` (the default), tables, figures or a
    report that no run.json records (an analysis command's); for an analysis command
    (`analysis=True`), a `probe.ablate` run (its run.json), whose own tables it would replace.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ProbeError(f"--out {str(path)!r} is a file; give a folder (it is created if missing).")
    _refuse_system_places(path)
    if path.is_dir():
        _refuse_foreign_files(path, analysis=analysis)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ProbeError(f"cannot create --out folder {str(path)!r} ({error.strerror}); choose another place.") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ProbeError(f"--out folder {str(path)!r} is not writable; choose another place.")
    return path


def prepare_out_file(out: str | os.PathLike) -> Path:
    """Check, before any work, that `out` may receive a file probe writes (a checkpoint): not a
    folder, not an existing file that is no checkpoint (notes.txt would be overwritten), and in a
    folder that can be created and written. (Not in probe's cache: `RunConfig` checks that.)"""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ProbeError(f"--out {str(path)!r} is a folder; give the file to write, e.g. {str(path / 'model.pt')!r}.")
    if path.exists() and not _is_checkpoint(path):
        raise ProbeError(f"--out {str(path)!r} is a file that holds no checkpoint; writing there would replace it: "
                         "give a new file name, e.g. model.pt.")
    existing = next(folder for folder in (path.parent.resolve(), *path.parent.resolve().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ProbeError(f"cannot write --out {str(path)!r}: {str(existing)!r} is not a writable folder; choose "
                         "another place.")
    return path


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` holds something torch.save or safetensors wrote (by its first bytes)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix == ".safetensors"


# What probe writes into an out folder: the run record, its lock and finished pieces, the tables,
# figures and report, a pruned model, and temporary files (renamed onto those when complete).
_OUR_NAMES = {"run.json", ".lock", "partial", ".DS_Store"}
_OUR_SUFFIXES = (".csv", ".png", ".html", ".pt")


def _ours(entry: Path) -> bool:
    if entry.name in _OUR_NAMES:
        return True
    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
        return True
    return entry.suffix.lower() in _OUR_SUFFIXES and entry.is_file()


def _refuse_system_places(path: Path) -> None:
    """The root folder and the home folder are no place for a run's files (nor probe's cache:
    `probe.commands.config.RunConfig` refuses an --out there, knowing where the cache is)."""
    where = path.resolve()
    if where == Path(where.anchor):
        raise ProbeError(f"--out {str(path)!r} is the root folder; give a folder of its own for the run's files, "
                         "e.g. runs/NAME.")
    if where == Path.home().resolve():
        raise ProbeError(f"--out {str(path)!r} is your home folder; give a folder of its own for the run's files, "
                         "e.g. runs/NAME.")


def _refuse_foreign_files(path: Path, *, analysis: bool) -> None:
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return  # an unreadable folder: mkdir and the access check below say so
    foreign = [entry.name + ("/" if entry.is_dir() else "") for entry in entries if not _ours(entry)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ProbeError(f"--out {str(path)!r} holds files probe did not write ({shown}); a run writes its tables, "
                         "figures, report and a partial/ folder there: choose an empty or new folder.")
    recorded = (path / "run.json").exists()
    if analysis and recorded:
        raise ProbeError(f"--out {str(path)!r} holds a probe.ablate run (run.json); this analysis's tables would "
                         "replace that run's own: choose an empty or new folder.")
    outputs = [entry.name for entry in entries if entry.suffix.lower() in (".csv", ".png", ".html") and entry.is_file()]
    if not analysis and not recorded and outputs:
        shown = ", ".join(outputs[:3]) + (", ..." if len(outputs) > 3 else "")
        raise ProbeError(f"--out {str(path)!r} holds tables, figures or a report ({shown}) that no probe run recorded "
                         "(no run.json: another command's, or yours); a run would overwrite some and leave the others "
                         "beside its own: choose an empty or new folder.")


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


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/probe` if XDG_CACHE_HOME is set (and non-empty), else `~/.cache/probe`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "probe"
