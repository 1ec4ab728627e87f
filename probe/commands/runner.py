"""What every command does around its work: threads, memory reuse, the out folder, one-line errors.

Each command is `main(argv=None) -> int` with argparse (`probe.commands.config.add_options`); it hands
its body to `run_command`, which turns a `ProbeError` (or an `OSError` such as a full disk)
into one line on stderr and exit code 2, and Ctrl-C into one line and exit code 130, without a
traceback. argparse's own mistakes (an unknown option, a missing value, a bad choice, a value of
the wrong type) are one line and exit code 2 too, instead of argparse's usage block. Every
output is written atomically (`probe.files`), so a failed write leaves no half-written file.
"""

from __future__ import annotations

import argparse
import difflib
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
    name = name or parser.prog
    try:
        args = _parse(parser, argv)
    except _UsageError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()  # put back afterwards: main() may be called from Python
    try:
        keep_freed_memory()  # this process's own allocator: no page faults for every fresh activation
        use_threads(getattr(args, "threads", None))
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(name)
            return body(args)
    except ProbeError as error:
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder: what the system said, and where
        where = f" ({error.filename})" if error.filename else ""
        print(f"{name}: error: {_one_line(error.strerror or error)}{where}; nothing half-written was left behind.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted.{' ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


class _UsageError(Exception):
    """argparse's complaint about the command line, as one line."""


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with argparse's mistakes raised as `_UsageError` (one line that
    names the option, suggests the closest one for a misspelt option, and points at --help)
    instead of printed as a usage block. --help still prints the help and exits 0."""
    def error(message: str) -> None:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            options = [o for o in parser._option_string_actions if o.startswith("--")]
            unknown = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("-")]
            close = [match for word in unknown for match in difflib.get_close_matches(word, options, n=1, cutoff=0.8)]
            hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _UsageError(f"{_one_line(message).rstrip('.')}.{hint} ({parser.prog} --help lists the options)")

    own = vars(parser).get("error")
    parser.error = error  # argparse reports every mistake through it
    try:
        return parser.parse_args(argv)
    finally:
        if own is None:
            del parser.error
        else:
            parser.error = own


def _one_line(message: object) -> str:
    """`message` on one line: its lines joined (a user's own exception may span several)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


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
        if config.batch_size == "auto":
            raise ProbeError(f"python -m analyses.{name} takes a number for --batch-size (e.g. 8); auto is "
                             "python -m probe.ablate's, which records the size it chose in run.json.")
        written = body(config, prepare_out_dir(args.out, analysis=True), not args.no_progress)
        print("wrote " + ", ".join(str(path) for path in written))
        return 0

    return run_command(parser, run, argv)
