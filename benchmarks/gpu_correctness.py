"""Does probe compute the same numbers on a GPU as on the CPU? Run by gpu_check.sh first.

    python benchmarks/gpu_correctness.py [--device cuda]

For a few architectures (untrained, seeded, so the CPU and GPU copies are identical), checks:
measure and sweep on the device against the CPU in fp32 with TF32 off; measure replayed from CUDA
graphs against its eager forward (fp32 and autocast); the fast sweep against
the naive loop on the device; channels_last against the default layout; bf16 and fp16 autocast
against fp32 (loose: half precision); and that the model is left exactly as it was.
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import probe  # noqa: E402
from probe.loading.models import build_model  # noqa: E402

# (model, input channels, image side, batch, batches)
CASES = [("resnet20", 1, 16, 64, 3), ("resnet18", 3, 64, 16, 2), ("mobilenet_v2", 3, 64, 16, 2),
         ("vit_b_16", 3, 224, 2, 2)]
STAT_COLUMNS = ["branch_norm", "shortcut_norm", "ratio", "cosine"]
SWEEP_COLUMNS = ["loss", "accuracy", "flip_rate"]
failures: list[str] = []


def check(name: str, difference: float, tolerance: float) -> None:
    ok = difference <= tolerance
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {difference:.2e} (tolerance {tolerance:.0e})", flush=True)
    if not ok:
        failures.append(name)


def relative(a, b, columns) -> float:
    """Largest |a - b| / (|b| + a thousandth of the column's largest |b|): relative, but a value
    near zero (an untrained net's vanishing branch) is judged on its column's scale."""
    a, b = a[columns].to_numpy(dtype=float), b[columns].to_numpy(dtype=float)
    if not (abs(a) < float("inf")).all() or not (abs(b) < float("inf")).all():
        return float("inf")
    floor = 1e-3 * abs(b).max(axis=0) + 1e-12
    return float((abs(a - b) / (abs(b) + floor)).max())


def snapshot(model: torch.nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]}


def unchanged(model: torch.nn.Module, before: dict) -> bool:
    after = snapshot(model)
    return (before["training"] == after["training"] and before["hooks"] == after["hooks"]
            and all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"]))


def case(name: str, channels: int, side: int, batch: int, count: int, device: torch.device) -> None:
    print(f"{name} ({channels}x{side}x{side}, {count} batches of {batch})", flush=True)
    torch.manual_seed(0)
    cpu_model = build_model(name, num_classes=10, in_channels=channels).eval()
    model = copy.deepcopy(cpu_model).to(device)
    generator = torch.Generator().manual_seed(1)
    cpu_data = [(torch.randn(batch, channels, side, side, generator=generator),
                 torch.randint(0, 10, (batch,), generator=generator)) for _ in range(count)]
    data = [(x.to(device), y.to(device)) for x, y in cpu_data]
    before = snapshot(model)

    stats_cpu = probe.measure(cpu_model, cpu_data, progress=False)
    stats = probe.measure(model, data, progress=False, graphs=False)
    check("measure, device vs cpu (fp32)", relative(stats, stats_cpu, STAT_COLUMNS), 1e-3)
    # Replayed from CUDA graphs (the default on a GPU; asked for here: no fallback). A shape is
    # replayed from its third batch on: the data three times over gives every case replays.
    thrice = data * 3
    if device.type == "cuda":
        check("measure, CUDA graph replays vs eager",
              relative(probe.measure(model, thrice, progress=False, graphs=True),
                       probe.measure(model, thrice, progress=False, graphs=False), STAT_COLUMNS), 1e-5)
    sweep_cpu = probe.sweep(cpu_model, cpu_data, progress=False)
    fast = probe.sweep(model, data, progress=False)
    naive = probe.sweep(model, data, fast=False, progress=False)
    check("sweep loss, device vs cpu (fp32)", relative(fast, sweep_cpu, ["loss"]), 1e-3)
    check("sweep, fast vs naive on the device", relative(fast, naive, SWEEP_COLUMNS), 1e-4)
    # Pinned host batches moved with non_blocking copies must give the same table.
    if device.type == "cuda":
        pinned = [(x.pin_memory(), y.pin_memory()) for x, y in cpu_data]
        check("measure from pinned host batches", relative(probe.measure(model, pinned, progress=False), stats,
                                                           STAT_COLUMNS), 1e-5)

    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    last_data = [(x.to(memory_format=torch.channels_last), y) for x, y in data]
    # cuDNN picks its algorithms per layout (Winograd among them), so fp32 layouts agree to
    # about 1e-3 (mobilenet_v2 on an H100: 1.7e-3), not to the last bit.
    check("measure, channels_last vs default", relative(probe.measure(last, last_data, progress=False), stats,
                                                        STAT_COLUMNS), 1e-2)
    check("sweep, channels_last fast vs naive", relative(probe.sweep(last, last_data, progress=False),
                                                         probe.sweep(last, last_data, fast=False, progress=False),
                                                         SWEEP_COLUMNS), 1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        label = str(dtype).removeprefix("torch.")
        with torch.autocast(device.type, dtype=dtype):
            low = probe.measure(model, data, progress=False)
            if device.type == "cuda":
                check(f"measure, {label} autocast, CUDA graph replays vs eager",
                      relative(probe.measure(model, thrice, progress=False, graphs=True),
                               probe.measure(model, thrice, progress=False, graphs=False), STAT_COLUMNS), 1e-3)
            low_fast = probe.sweep(model, data, progress=False)
            low_naive = probe.sweep(model, data, fast=False, progress=False)
        # Untrained nets such as mobilenet_v2 shrink activations towards zero block by block, below
        # what fp16 can hold: compare the blocks whose branch is not vanishingly small.
        kept = stats["branch_norm"] > 1e-3 * stats["branch_norm"].max()
        check(f"measure, {label} autocast vs fp32 ({int(kept.sum())} of {len(kept)} blocks)",
              relative(low[kept], stats[kept], ["ratio"]), 5e-2)
        check(f"sweep loss, {label} autocast vs fp32", relative(low_fast, fast, ["loss"]), 5e-2)
        check(f"sweep, {label} fast vs naive", relative(low_fast, low_naive, ["loss"]), 1e-2)
    check("model left unchanged (parameters, buffers, modes, hooks)", 0.0 if unchanged(model, before) else 1.0, 0.0)


class _Syncing(torch.nn.Module):
    """A block that reads a tensor's value into Python: a CUDA graph cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (2.0 if float(x.mean()) > 0 else 0.5) * self.conv(x)


def graph_fallback(device: torch.device) -> None:
    """A model whose capture fails is measured eagerly, and leaves the default stream current."""
    print("a model that cannot be captured", flush=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), _Syncing(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).to(device).eval()
    data = [(torch.randn(8, 3, 8, 8, device=device), torch.randint(0, 10, (8,), device=device)) for _ in range(4)]
    eager = probe.measure(model, data, progress=False, graphs=False)
    fallback = probe.measure(model, data, progress=False)  # graphs=None: tries, fails, goes on eagerly
    check("measure after a failed capture vs eager", relative(fallback, eager, STAT_COLUMNS), 1e-6)
    check("the default stream is current after a failed capture",
          0.0 if torch.cuda.current_stream(device) == torch.cuda.default_stream(device) else 1.0, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=[c[0] for c in CASES], help="a subset of the cases")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    # TF32 would make fp32 convolutions differ from the CPU's by about 1e-3 relative.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    for name, channels, side, batch, count in [c for c in CASES if c[0] in args.models]:
        try:
            case(name, channels, side, batch, count, torch.device(args.device))
        except Exception as error:  # report and go on: one run should show every problem
            print(f"  FAIL {name}: {type(error).__name__}: {error}", flush=True)
            failures.append(name)
    if args.device.startswith("cuda"):
        try:
            graph_fallback(torch.device(args.device))
        except Exception as error:
            print(f"  FAIL graph fallback: {type(error).__name__}: {error}", flush=True)
            failures.append("graph fallback")
    print(f"{len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
