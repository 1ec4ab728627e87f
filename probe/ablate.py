"""`python -m probe.ablate`: find, measure, ablate and report on a trained residual network.

With no arguments it trains (once, then caches) a CIFAR-style ResNet-56 on scikit-learn's
digits, measures every block's branch against its shortcut, deletes each block alone, prints
which blocks carry the network and which it skips, and writes `blocks.csv` and `report.html`.

This is an entry point (docs/architecture.md): it sits on top of the core, the analyses and
the report, and nothing imports it. It holds the command line only: the job itself
(`probe.job`) is imported once the options are read, so that `--help` and a one-line error
do not wait for the analyses, the report and the data sets.
"""

from __future__ import annotations

import argparse
import importlib
import time

from analyses import registry
from probe import distributed
from probe.commands.config import RunConfig, add_options
from probe.commands.runner import run_command

def __getattr__(name: str) -> object:
    """The job's names where notebooks and scripts reach them (`probe.ablate.run`), imported on use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("probe.job"), name)


_PARSER_DESCRIPTION = (
    "Measure each residual block's branch F(x) against its shortcut s(x), delete each block alone, and "
    "report which blocks carry the network and which it skips. Without --checkpoint or --weights, the model "
    "is trained on the data set's training split first and cached (under $XDG_CACHE_HOME/probe, or "
    "~/.cache/probe).")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m probe.ablate", description=_PARSER_DESCRIPTION)
    parser.add_argument("--out", help="output folder (default: runs/<model>-<dataset>)")
    parser.add_argument("--list-blocks", action="store_true",
                        help="print the discovered blocks (name, branch, shortcut, output shape) and exit")
    return add_options(parser, "model", "ablation", "skipping", "uncertainty", "degradation", "lm", "report",
                       sections=registry.available())


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        config = RunConfig.from_args(args)
        from probe import job  # the analysis stack, once the options are known to be good
        if args.list_blocks:
            print(job.list_blocks(config))
            return 0
        first = distributed.leader()  # global rank 0: the process group is not joined yet
        # The answer is printed as soon as the sweep is done; the analyses and the report follow.
        start = time.perf_counter()
        table, _, out = job.run(config, progress=not args.no_progress and first,
                                on_table=lambda table: print(job.format_summary(table) + "\n", flush=True)
                                if first else None)
        if first:
            print(f"wrote {out / 'blocks.csv'} and {out / 'report.html'}")
            stages = ", ".join(f"{name} {value:.1f}" for name, value in job.table_info(table).seconds.items())
            print(f"took {time.perf_counter() - start:.1f} s ({stages}); threads: {job.threads_words()}")
        return 0

    return run_command(_parser(), body, argv, name="probe.ablate",
                       interrupted="Finished pieces are kept in the out folder: rerun the same command to resume.")


if __name__ == "__main__":
    raise SystemExit(main())
