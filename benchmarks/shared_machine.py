"""The warm default job alone, and with one other CPU-bound process on the same cores.

    python benchmarks/shared_machine.py [--threads-too]

Runs `python -m probe.ablate` (the built-in default, model cache warmed first) quietly, then
again while this script keeps one busy process running (a Python loop pinned to the same cores),
and prints both wall times and their ratio. Target: at most 2.2x (a fair share of two cores
gives about 2x). The thread choice each run made (`probe.commands.threads`) is printed beside it.
`--threads-too` adds a run under competition with `--threads` set to every usable core, what
the commands did before they looked at how busy the cores are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_speed import run_job  # noqa: E402

BUSY = "import time\nwhile True:\n    pass\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads-too", action="store_true",
                        help="also run under competition with every usable core as threads")
    parser.add_argument("--sections", nargs="+", default=None, help="passed on to probe.ablate")
    args = parser.parse_args()
    extra = ["--sections", *args.sections] if args.sections else []
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="probe-shared-") as scratch:
        run_job([], Path(scratch) / "warm", extra)
        quiet, _, quiet_threads, _ = run_job([], Path(scratch) / "quiet", extra)
        competitor = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            os.sched_setaffinity(competitor.pid, cores)
            shared, _, shared_threads, _ = run_job([], Path(scratch) / "shared", extra)
            forced = None
            if args.threads_too:
                forced, _, _, _ = run_job([], Path(scratch) / "forced", [*extra, "--threads", str(len(cores))])
        finally:
            competitor.kill()
            competitor.wait()
    print(f"default job, {len(cores)} usable cores")
    print(f"  alone:                         {quiet:6.1f} s   threads: {quiet_threads}")
    print(f"  with one busy process:         {shared:6.1f} s   threads: {shared_threads}")
    print(f"  ratio: {shared / quiet:.2f}   (target <= 2.2)")
    if forced is not None:
        print(f"  with one busy process, --threads {len(cores)}: {forced:6.1f} s   ratio {forced / quiet:.2f}")


if __name__ == "__main__":
    main()
