#!/usr/bin/env bash
# Run the benchmarks on a GPU when one is available (else on the CPU) and print their ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
echo "device: $device"
python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU: CPU numbers')"
python benchmarks/sweep_speed.py --device "$device"
python benchmarks/hook_overhead.py --device "$device"
python benchmarks/sweep_throughput.py --device "$device"
python benchmarks/captum_compare.py --device "$device"
