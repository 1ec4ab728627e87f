"""What every command does around its work: threads, memory reuse, the out folder, one-line errors.

Each command is `main(argv=None) -> int` with argparse (`probe.commands.config.add_options`); it hands
its body to `run_command`, which turns a `ProbeError` (or an `OSError` such as a full disk)
into one line on stderr and exit code 2, and Ctrl-C into one line and exit code 130, without a
traceback. Every output is written atomically (`probe.files`), so a failed write leaves no
half-written file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from probe.commands.allocator import keep_freed_memory
from probe.commands.config import RunConfig, add_options
from probe.errors import ProbeError
from probe.files import prepare_out_dir
from probe.commands.threads import use_threads

__all__ = ["run_analysis_command", "run_command"]


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                argv: list[str] | None, *, name: str | None = None, interrupted: str = "") -> int:
    """Parse `argv`, run `body(args)` and return its exit code; ProbeError -> one line, exit 2.

    name: how the one-line messages name the command (default: the parser's prog).
    """
    args = parser.parse_args(argv)
    name = name or parser.prog
    threads = torch.get_num_threads()  # put back afterwards: main() may be called from Python
    try:
        keep_freed_memory()  # this process's own allocator: no page faults for every fresh activation
        use_threads(getattr(args, "threads", None))
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(name)
            return body(args)
    except ProbeError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder: what the system said, and where
        where = f" ({error.filename})" if error.filename else ""
        print(f"{name}: error: {error.strerror or error}{where}; nothing half-written was left behind.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted.{' ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


def _one_line_warning(name: str) -> Callable[..., None]:
    """A `warnings.showwarning` that prints "NAME: warning: MESSAGE" as one line on stderr, as
    the commands print their own warnings (no source line, no file and line number)."""
    def show(message, _category, _filename, _lineno, file=None, _line=None) -> None:
        print(f"{name}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    return show


def run_analysis_command(name: str, about: str, groups: tuple[str, ...],
                         body: Callable[[RunConfig, Path, bool], list[Path]], argv: list[str] | None) -> int:
    """`python -m analyses.NAME`: the options of `groups`, then `body(config, out, progress)`,
    which returns the files it wrote into the out folder; they are listed on stdout."""
    parser = argparse.ArgumentParser(prog=f"python -m analyses.{name}", description=about.strip().split("\n\n")[0])
    parser.add_argument("--out", default=str(Path("runs") / "analyses" / name),
                        help="folder for the CSV tables and PNG figures (default: %(default)s)")
    add_options(parser, *groups)

    def run(args: argparse.Namespace) -> int:
        config = RunConfig.from_args(args)
        written = body(config, prepare_out_dir(args.out), not args.no_progress)
        print("wrote " + ", ".join(str(path) for path in written))
        return 0

    return run_command(parser, run, argv)
