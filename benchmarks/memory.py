"""Peak memory of measure and sweep against the amount of data: 10x the samples must cost at
most 1.1x the peak resident memory (statistics are streamed, activations never stored).

    python benchmarks/memory.py [--samples 2000]

Each measurement runs in a fresh process (peak RSS only grows within a process). The data is a
generator of random batches, so the data set itself occupies no memory either.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(operation: str, samples: int, batch_size: int) -> None:
    import torch

    import probe
    from probe.models import cifar_resnet

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=10, in_channels=1).eval()

    def data():
        generator = torch.Generator().manual_seed(1)
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            yield torch.randn(n, 1, 16, 16, generator=generator), torch.randint(0, 10, (n,), generator=generator)

    if operation == "measure":
        probe.measure(model, data(), progress=False)
    else:
        probe.sweep(model, data(), progress=False)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak(operation: str, samples: int, batch_size: int) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", operation, str(samples), str(batch_size)],
                            capture_output=True, text=True, check=True, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    print(f"peak resident memory, resnet20 on 16x16 inputs, batch {args.batch_size}")
    for operation in ("measure", "sweep"):
        small = peak(operation, args.samples, args.batch_size)
        large = peak(operation, 10 * args.samples, args.batch_size)
        print(f"  {operation:8s} {args.samples:>6d} samples: {small:7.1f} MiB   {10 * args.samples:>6d} samples: "
              f"{large:7.1f} MiB   ratio {large / small:.3f}   (target <= 1.1)")


if __name__ == "__main__":
    main()
