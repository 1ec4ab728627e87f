"""Sweep throughput against plain inference throughput, in images per second.

    python benchmarks/sweep_throughput.py [--device cuda] [--model resnet56] [--data synthetic ...]

A sweep of N blocks evaluates every image N + 1 times; "images/s" here counts each image once
per sweep, so the ratio says how much slower a whole sweep is than one inference pass.
`--stack 1 4 16` also times sweeps that evaluate that many ablations per forward, their copies of
each batch stacked (`probe.evaluate_ablations(stack=)`): fewer, larger forwards, for GPUs whose
small forwards are launch-bound. On a CPU they only add arithmetic.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import probe  # noqa: E402
from common import autocast, best_times, default_setup, describe, parser, plain_inference  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--stack", type=int, nargs="+", default=[1],
                   help="ablations per forward to time the sweep with (default: 1)")
    args = p.parse_args()
    model, data = default_setup(args)
    samples = sum(len(y) for _, y in data)

    plain = plain_inference(model, data, args)

    def sweep(stack: int):
        def run() -> None:
            with autocast(args):
                probe.sweep(model, data, stack=stack, progress=False)
        return run

    plain_s, *sweep_s = best_times([plain, *(sweep(stack) for stack in args.stack)], max(args.repeats, 5),
                                   args.device)
    blocks = len(probe.find_blocks(model))
    print("throughput: " + describe(args, blocks, data))
    print(f"  plain inference: {samples / plain_s:10.0f} images/s")
    for stack, seconds in zip(args.stack, sweep_s):
        label = "whole sweep:" if stack == 1 else f"stacked x{stack}:"
        print(f"  {label:<16} {samples / seconds:10.0f} images/s  ({blocks + 1} evaluations per image)  "
              f"ratio sweep / inference images/s: {plain_s / seconds:.3f}")
    print(f"  (a naive loop would be {1 / (blocks + 1):.3f})")


if __name__ == "__main__":
    main()
