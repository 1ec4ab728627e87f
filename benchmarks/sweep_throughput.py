"""Sweep throughput against plain inference throughput, in images per second.

    python benchmarks/sweep_throughput.py [--device cuda] [--model resnet56] [--data synthetic ...]

A sweep of N blocks evaluates every image N + 1 times; "images/s" here counts each image once
per sweep, so the ratio says how much slower a whole sweep is than one inference pass.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import probe  # noqa: E402
from common import autocast, best_times, default_setup, describe, parser, plain_inference  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    model, data = default_setup(args)
    samples = sum(len(y) for _, y in data)

    plain = plain_inference(model, data, args)

    def sweep() -> None:
        with autocast(args):
            probe.sweep(model, data, progress=False)

    plain_s, sweep_s = best_times([plain, sweep], max(args.repeats, 5), args.device)
    blocks = len(probe.find_blocks(model))
    print("throughput: " + describe(args, blocks, data))
    print(f"  plain inference: {samples / plain_s:10.0f} images/s")
    print(f"  whole sweep:     {samples / sweep_s:10.0f} images/s  ({blocks + 1} evaluations per image)")
    print(f"  ratio sweep / inference images/s: {plain_s / sweep_s:.3f}   "
          f"(naive loop would be {1 / (blocks + 1):.3f})")


if __name__ == "__main__":
    main()
