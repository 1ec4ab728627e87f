"""Fast exact sweep against the naive loop (baseline + one full forward per block).

    python benchmarks/sweep_speed.py [--device cuda] [--depth 56]

Prints both times, their ratio (target: at most 0.55 on the default ResNet-56), and the largest
difference between the two tables (they must agree to float tolerance).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import probe  # noqa: E402
from common import best_time, default_setup, parser  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    model, data = default_setup(args)
    fast = lambda: probe.sweep(model, data, progress=False)  # noqa: E731
    naive = lambda: probe.sweep(model, data, fast=False, progress=False)  # noqa: E731
    fast_s = best_time(fast, args.repeats, args.device)
    naive_s = best_time(naive, args.repeats, args.device)
    columns = ["accuracy", "loss", "flip_rate"]
    difference = (fast()[columns] - naive()[columns]).abs().to_numpy().max()
    blocks = len(probe.find_blocks(model))
    samples = sum(len(y) for _, y in data)
    print(f"sweep of resnet{args.depth} ({blocks} blocks, {samples} samples, {args.device}, "
          f"{torch.get_num_threads()} threads)")
    print(f"  naive loop (1 + {blocks} full forwards per batch): {naive_s:.3f} s")
    print(f"  fast exact sweep (suffixes only):              {fast_s:.3f} s")
    print(f"  ratio fast / naive: {fast_s / naive_s:.3f}   (target <= 0.55)")
    print(f"  largest difference between the tables: {difference:.2e}")


if __name__ == "__main__":
    main()
