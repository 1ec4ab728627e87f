"""Peak memory of measure, sweep and the representation analysis against the amount of data: 10x
the samples must cost at most 1.1x the peak resident memory (statistics are streamed, activations
never stored; the representation's CKA sums cross-covariances, O(features^2) whatever the samples).

    python benchmarks/memory.py [--samples 1000] [--device cuda]

Each measurement runs in a fresh process (peak RSS only grows within a process). The data is
random batches made afresh on every pass, so the data set itself occupies no memory either. On
cuda the peak GPU memory torch allocated is measured as well. The representation analysis fits
its linear probes on `TRAIN_SAMPLES` training samples in both runs; the last line gives 10x those
instead, for reference: the probes keep their training features (samples x pooled width), the
one part that is not streamed, so no target applies to it.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


TRAIN_SAMPLES = 500
# operation -> (evaluation samples, training samples) for a run with `samples`.
OPERATIONS = {"measure": lambda n: (n, 0), "sweep": lambda n: (n, 0),
              "representation": lambda n: (n, TRAIN_SAMPLES), "probe training": lambda n: (TRAIN_SAMPLES, n)}


def child(operation: str, samples: int, batch_size: int, device: str) -> None:
    import torch

    import probe
    from probe.loading.models import cifar_resnet

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=10, in_channels=1).eval().to(device)

    class RandomBatches:
        """Seeded random batches, made afresh on every pass (the representation makes several)."""

        def __init__(self, count: int, seed: int) -> None:
            self.count, self.seed = count, seed

        def __iter__(self):
            generator = torch.Generator().manual_seed(self.seed)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                yield (torch.randn(n, 1, 16, 16, generator=generator).to(device),
                       torch.randint(0, 10, (n,), generator=generator).to(device))

    evaluated, trained = OPERATIONS[operation](samples)
    data = RandomBatches(evaluated, seed=1)
    if operation == "measure":
        probe.measure(model, data, progress=False)
    elif operation == "sweep":
        probe.sweep(model, data, progress=False)
    else:  # imported here only: scikit-learn and pandas would raise the other operations' baseline
        from analyses.representation import representation

        representation(model, data, train_data=RandomBatches(trained, seed=2), progress=False)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_mib": gpu}))


def peak(operation: str, samples: int, batch_size: int, device: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", operation, str(samples), str(batch_size), device],
                            capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = parser.parse_args()
    print(f"peak memory, resnet20 on 16x16 inputs, batch {args.batch_size}, {args.device}")
    kinds = [("peak_mib", "resident")] + ([("gpu_mib", "GPU")] if args.device == "cuda" else [])
    for operation in OPERATIONS:
        small = peak(operation, args.samples, args.batch_size, args.device)
        large = peak(operation, 10 * args.samples, args.batch_size, args.device)
        target = "" if operation == "probe training" else "   (target <= 1.1)"
        for key, kind in kinds:
            print(f"  {operation:14s} {kind:8s} {args.samples:>6d} samples: {small[key]:7.1f} MiB   "
                  f"{10 * args.samples:>6d} samples: {large[key]:7.1f} MiB   ratio {large[key] / small[key]:.3f}{target}")


if __name__ == "__main__":
    main()
