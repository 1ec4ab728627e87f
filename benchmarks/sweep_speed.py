"""Fast exact sweep against the naive loop (baseline + one full forward per block).

    python benchmarks/sweep_speed.py [--device cuda] [--model resnet56] [--data synthetic ...]

Prints both times, their ratio (target: at most 0.55 on the default ResNet-56), and the largest
difference between the two tables (they must agree to float tolerance).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe  # noqa: E402
from common import autocast, default_setup, describe, paired_ratio, parser, timed_rounds  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    model, data = default_setup(args)

    def fast():
        with autocast(args):
            return probe.sweep(model, data, progress=False)

    def naive():
        with autocast(args):
            return probe.sweep(model, data, fast=False, progress=False)

    fast_s, naive_s = timed_rounds([fast, naive], args.repeats, args.device)
    columns = ["accuracy", "loss", "flip_rate"]
    difference = (fast()[columns] - naive()[columns]).abs().to_numpy().max()
    blocks = len(probe.find_blocks(model))
    print("sweep: " + describe(args, blocks, data))
    print(f"  naive loop (1 + {blocks} full forwards per batch): {min(naive_s):.3f} s "
          f"(fastest of {args.repeats} rounds)")
    print(f"  fast exact sweep (suffixes only):              {min(fast_s):.3f} s")
    print(f"  ratio fast / naive: {paired_ratio(fast_s, naive_s):.3f}   (target <= 0.55; median of the rounds' "
          f"ratios; fastest against fastest: {min(fast_s) / min(naive_s):.3f})")
    print(f"  largest difference between the tables: {difference:.2e}")


if __name__ == "__main__":
    main()
