"""measure's instrumented forward against a plain inference forward over the same data.

    python benchmarks/hook_overhead.py [--device cuda] [--model resnet56] [--data synthetic ...]

Prints the fastest round of each and the median of the rounds' ratios; 40 rounds unless --repeats
says otherwise: on a shared CPU fewer rounds leave the median noisy. On a GPU measure replays its
instrumented forward from CUDA graphs (`probe.instrument.graphs`; target: at most 1.2x the plain forward),
and the eager hooks are timed too (`graphs=False`). The earlier target for the eager hooks on
the CPU (at most 1.05) is retired; the figure is still printed.
"""

import sys
from collections.abc import Callable
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

    def measured(graphs: bool | None = None) -> Callable[[], None]:
        def run() -> None:
            with autocast(args):
                probe.measure(model, data, progress=False, graphs=graphs)
        return run

    gpu = args.device.startswith("cuda")
    # On a GPU outside autocast, measure's default replays CUDA graphs; in autocast it runs
    # eagerly unless asked: the graphs row asks.
    runs = [plain, measured(False)] + ([measured(True)] if gpu else [])
    plain_s, eager_s, *graph_s = timed_rounds(runs, args.repeats, args.device)
    print("hooks: " + describe(args, len(blocks), data))
    print(f"  plain inference forward: {min(plain_s):.3f} s (fastest of {args.repeats} rounds)")
    print(f"  probe.measure, eager:    {min(eager_s):.3f} s")
    print(f"  ratio measure / plain:   {paired_ratio(eager_s, plain_s):.3f}   (eager hooks; median of the "
          f"rounds' ratios; fastest against fastest: {min(eager_s) / min(plain_s):.3f})")
    if graph_s:
        print(f"  probe.measure, CUDA graph replays: {min(graph_s[0]):.3f} s")
        print(f"  ratio measure with graphs / plain: {paired_ratio(graph_s[0], plain_s):.3f}   (target <= 1.2; "
              f"fastest against fastest: {min(graph_s[0]) / min(plain_s):.3f})")


if __name__ == "__main__":
    main()
