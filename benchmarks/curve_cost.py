"""What the skipping analysis's deletion curves compute, against the sweep, in convolution multiply-adds.

    python benchmarks/curve_cost.py [--model resnet56] [--image-size 32] [--samples 1000] [--batch-size 256]

Counts the multiply-adds of every Conv2d call (a forward hook) while the fast single-block sweep
runs, and while the curve sets of `analyses.skipping` (ratio, drop and 3 random orders, 14 points
each) are evaluated the way that analysis evaluates them. Work, not time: the ratio says what the
curves must cost however fast the code runs. An untrained model (BN statistics of a few random
batches) on random images: the amount of work does not depend on the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import probe  # noqa: E402
from analyses.skipping import curve_ks, deletion_orders  # noqa: E402
from probe.commands.config import RunConfig  # noqa: E402
from probe.loading.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_channels=3)
    with torch.no_grad():  # BN statistics of a few random batches, as after a little training
        for _ in range(4):
            model(torch.rand(64, 3, args.image_size, args.image_size))
    model.eval()
    generator = torch.Generator().manual_seed(1)
    data = [(torch.rand(min(args.batch_size, args.samples - start), 3, args.image_size, args.image_size,
                        generator=generator),
             torch.randint(0, 10, (min(args.batch_size, args.samples - start),), generator=generator))
            for start in range(0, args.samples, args.batch_size)]
    blocks = probe.find_blocks(model)
    counted = [0]

    def count(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        counted[0] += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        stats = probe.measure(model, data, progress=False)
        counted[0] = 0
        sweep = probe.sweep(model, data, progress=False)
        sweep_macs = counted[0]
        table = probe.join_block_table(stats, sweep)
        by_name = {block.name: block for block in blocks}
        ks = curve_ks(len(blocks), RunConfig.curve_points)
        sets = [[by_name[n] for n in names[:k]] for _, _, names in deletion_orders(table, random_draws=3) for k in ks]
        counted[0] = 0
        probe.evaluate_ablations(model, data, sets, progress=False)
        curve_macs = counted[0]
    finally:
        for handle in handles:
            handle.remove()
    print(f"curve cost: {args.model} ({len(blocks)} blocks), {args.samples} random images "
          f"3x{args.image_size}x{args.image_size}, batch {args.batch_size}")
    print(f"  sweep ({len(blocks)} single-block deletions): {sweep_macs / 1e9:.1f} GMAC")
    print(f"  deletion curves ({len(sets)} sets):           {curve_macs / 1e9:.1f} GMAC")
    print(f"  ratio curves / sweep: {curve_macs / sweep_macs:.2f}")


if __name__ == "__main__":
    main()
