"""probe's exact sweep against captum's LayerConductance over every block's branch.

    python benchmarks/captum_compare.py [--device cuda] [--steps 10] [--model resnet20] [--samples 64]

Both answer "how much does each block matter" for the same model and data; the sweep measures
the real accuracy cost of deleting each block, LayerConductance estimates a gradient path
integral per block (n_steps forward+backward passes per block). Prints times and their ratio.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from captum.attr import LayerConductance  # noqa: E402

import probe  # noqa: E402
from common import best_time, default_setup, describe, parser  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=10, help="LayerConductance n_steps (default: %(default)s)")
    p.set_defaults(model="resnet20", samples=64)
    args = p.parse_args()
    args.repeats = 1
    model, data = default_setup(args)
    modules = dict(model.named_modules())
    blocks = probe.find_blocks(model)

    def conductance() -> None:
        for block in blocks:
            # An intercepted block's branch ends in a function: there is no layer to attribute to.
            if block.strategy != "hooks":
                continue
            layer = LayerConductance(model, modules[block.branch])
            for inputs, targets in data:
                layer.attribute(inputs, target=targets, n_steps=args.steps, internal_batch_size=2 * len(inputs))

    sweep_s = best_time(lambda: probe.sweep(model, data, progress=False), args.repeats, args.device)
    captum_s = best_time(conductance, args.repeats, args.device)
    print("captum: " + describe(args, len(blocks), data))
    print(f"  probe.sweep (exact drop of every block):          {sweep_s:.2f} s")
    print(f"  captum LayerConductance, {args.steps} steps, every block: {captum_s:.2f} s")
    print(f"  ratio sweep / LayerConductance: {sweep_s / captum_s:.3f}")


if __name__ == "__main__":
    main()
