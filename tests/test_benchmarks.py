"""The benchmark scripts and the GPU check still run, and their own checks hold (on the CPU,
on tiny workloads: the timings themselves are for benchmarks/, never asserted here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ratio(output: str, label: str) -> float:
    match = re.search(rf"{label}:?\s+([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


TINY = ["--model", "resnet20", "--samples", "24", "--batch-size", "8", "--repeats", "1", "--threads", "1"]


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_sweep_speed_tables_agree_and_ratio_is_printed():
    output = run(sys.executable, "benchmarks/sweep_speed.py", *TINY)
    assert "resnet20 (9 blocks), 24 digits images 1x16x16, batch 8, cpu, fp32" in output
    assert ratio(output, "largest difference between the tables") == 0.0
    assert ratio(output, "ratio fast / naive") > 0


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_hook_overhead_and_throughput_on_synthetic_channels_last_bf16():
    options = [*TINY, "--data", "synthetic", "--image-size", "16", "--precision", "bf16", "--channels-last"]
    output = run(sys.executable, "benchmarks/hook_overhead.py", *options)
    assert "24 synthetic images 3x16x16, batch 8, cpu, bf16, channels_last" in output
    assert ratio(output, "ratio measure / plain") > 0
    output = run(sys.executable, "benchmarks/sweep_throughput.py", *options, "--stack", "1", "3")
    assert ratio(output, "ratio sweep / inference images/s") > 0
    assert re.search(r"stacked x3: +[0-9]+ images/s .* ratio sweep / inference images/s: [0-9.]+", output)


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_job_speed_reports_each_stage_against_the_sweep():
    output = run(sys.executable, "benchmarks/job_speed.py", "--workload", "resnet56-32px", "--images", "40",
                 "--sections", "skipping", "recalibration", "--threads", "1", "--allocator-too", "--rounds", "1")
    assert "resnet56-32px: whole job" in output and "threads: 1 (--threads)" in output
    for stage in ("measure", "sweep", "skipping", "recalibration"):
        assert re.search(rf"  {stage} +[0-9.]+ s +[0-9.]+x the sweep", output), output
    assert ratio(output, "after the sweep \\(skipping, recalibration\\)") > 0
    # Work per stage: sets asked for and evaluated, forward-equivalents, and the seconds per one against the sweep's.
    for stage in ("skipping", "recalibration"):
        assert re.search(rf"  {stage} .* sets [0-9]+ asked / [0-9]+ evaluated, [0-9.]+ forward-equivalents, "
                         r"[0-9.]+x the sweep's seconds per forward-equivalent", output), output
    assert ratio(output, "whole warm job") > 1
    # The allocator comparison: the setting kept (the commands' own) takes fewer page faults.
    faults = re.search(r"median of 1 paired rounds: .* page faults ([0-9.]+)", output)
    assert faults and float(faults.group(1)) < 1, output


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_curve_cost_counts_the_curves_work_against_the_sweeps():
    output = run(sys.executable, "benchmarks/curve_cost.py", "--model", "resnet20", "--image-size", "8",
                 "--samples", "12", "--batch-size", "6")
    assert "resnet20 (9 blocks), 12 random images 3x8x8" in output
    assert re.search(r"deletion curves \(45 sets\): +[0-9.]+ GMAC", output), output  # 5 orders x 9 points
    assert ratio(output, "ratio curves / sweep") > 0


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_memory_benchmark_reports_every_operation():
    output = run(sys.executable, "benchmarks/memory.py", "--samples", "40", "--batch-size", "20")
    assert re.search(r"measure\s+resident .* ratio [0-9.]+", output) and re.search(r"sweep\s+resident", output)
    # The representation analysis has its row too (its memory is measured, no target is asserted here).
    assert re.search(r"representation\s+resident\s+40 samples: .* 400 samples: .* ratio [0-9.]+", output)


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_gpu_correctness_checks_pass_on_the_cpu():
    output = run(sys.executable, "benchmarks/gpu_correctness.py", "--device", "cpu", "--models", "resnet20")
    assert "FAIL" not in output and output.strip().endswith("0 failed")
    assert "measure, bfloat16 autocast vs fp32" in output and "model left unchanged" in output


@pytest.mark.slow  # a benchmark script end to end in a subprocess
def test_gpu_check_runs_the_steps_it_is_asked_for_and_reports_failures(tmp_path):
    output = run("bash", "benchmarks/gpu_check.sh", str(tmp_path / "ok"),
                 env={**ENV, "GPU_CHECK_ONLY": "environment", "PYTHON": sys.executable})
    assert "== environment" in output and "== correctness" not in output
    assert "no GPU: CPU numbers" in output and output.strip().endswith("every step passed")
    assert (tmp_path / "ok" / "gpu_check.log").read_text().startswith("== environment")
    broken = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "broken")], cwd=ROOT,
                            env={**ENV, "GPU_CHECK_ONLY": "environment", "PYTHON": "no-such-python"},
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and "failed step: environment (exit 127)" in broken.stdout


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import paired_ratio

    # Rounds' ratios 3, 1 and 2.5: the median is 2.5; the ratio of the minima would say 3 / 1 = 3.
    assert paired_ratio([3.0, 3.0, 10.0], [1.0, 3.0, 4.0]) == 2.5
    assert paired_ratio([1.0, 3.0], [1.0, 1.0]) == 2.0  # even count: the mean of the middle two


@pytest.mark.slow  # three processes each load a small Llama
def test_big_model_benchmark_loads_three_ways_with_the_same_losses():
    output = run(sys.executable, "benchmarks/big_model.py", "--windows", "1", "--seq-len", "16", "--threads", "1")
    for way in ("fp32", "bf16", "bf16+disk"):
        assert re.search(rf"big model small {re.escape(way)} *: load [0-9.]+ s, [0-9]+ ms per deletion \(16, replay "
                         r"engine\), weights in memory [0-9]+ MiB, peak RSS \+[0-9]+ MiB, baseline loss [0-9.]+",
                         output), output
    # bf16 weights round the losses; the layers on disk change nothing
    assert ratio(output, "bf16: ratio weights in memory / fp32's") == pytest.approx(0.5, abs=0.01)
    assert ratio(output, "bf16\\+disk: ratio weights in memory / fp32's") < 0.5
    assert ratio(output, "against in memory \\(both bf16\\)") == 0.0
    assert re.search(r"bf16: .*largest loss difference from fp32: [0-9.e-]+", output)


def test_batch_size_benchmark_chooses_windows_whose_sweep_stays_in_the_budget():
    output = run(sys.executable, "benchmarks/batch_size.py", "--windows", "6", "--seq-len", "16", "--blocks", "2",
                 "--budget", "12MiB", "--threads", "1")
    chosen = int(re.search(r"--batch-size auto: ([0-9]+) windows per forward", output).group(1))
    assert 1 <= chosen < 6  # the budget binds: fewer than the windows there are
    assert ratio(output, "windows in one batch: tensor memory peak [0-9.]+ [KMG]iB,") <= 1.0
