"""measure's instrumented forward against a plain inference forward over the same data.

    python benchmarks/hook_overhead.py [--device cuda] [--model resnet56] [--data synthetic ...]

Prints the fastest round of each and the median of the rounds' ratios (target: at most 1.05);
40 rounds unless --repeats says otherwise: on a shared CPU fewer rounds leave the median noisy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import probe  # noqa: E402
from common import autocast, default_setup, describe, paired_ratio, parser, plain_inference, timed_rounds  # noqa: E402


def main() -> None:
    options = parser(__doc__)
    options.set_defaults(repeats=40)
    args = options.parse_args()
    model, data = default_setup(args)
    blocks = probe.find_blocks(model)  # discovery is cached per model; time the measuring, not the trace

    plain = plain_inference(model, data, args)

    def measured() -> None:
        with autocast(args):
            probe.measure(model, data, progress=False)

    plain_s, measure_s = timed_rounds([plain, measured], args.repeats, args.device)
    print("hooks: " + describe(args, len(blocks), data))
    print(f"  plain inference forward: {min(plain_s):.3f} s (fastest of {args.repeats} rounds)")
    print(f"  probe.measure:           {min(measure_s):.3f} s")
    print(f"  ratio measure / plain:   {paired_ratio(measure_s, plain_s):.3f}   (target <= 1.05; median of the "
          f"rounds' ratios; fastest against fastest: {min(measure_s) / min(plain_s):.3f})")


if __name__ == "__main__":
    main()
