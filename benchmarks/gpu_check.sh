#!/usr/bin/env bash
# Check probe's GPU path and print the benchmarks' ratios, in one run of about 8 minutes.
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]     # default LOG_DIR: $OUT, else /tmp/probe-gpu-check
#   GPU_CHECK_ONLY="correctness hooks-default" bash benchmarks/gpu_check.sh   # some steps only
#
# Without a GPU every step runs on the CPU instead (slowly). Each step has its own time limit
# and a failing step does not stop the others; the ratios are summed up at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs=${1:-${OUT:-/tmp/probe-gpu-check}}
mkdir -p "$logs"
log="$logs/gpu_check.log"
: >"$log"
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/probe-gpu-check-cache}  # trained models of the CLI steps
python=${PYTHON:-python3}
device=$($python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
failed=()

step() {  # step NAME SECONDS COMMAND...: run, log, note a failure or a timeout
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
    echo "== $name  ($(date +%T), limit ${limit}s)" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "-- $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

bench() { step "$1" "$2" $python "benchmarks/${@:3}" --device "$device"; }

step environment 60 $python -c "
import torch, torchvision, pandas, sklearn
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'pandas', pandas.__version__, 'sklearn', sklearn.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f'{p.total_memory / 2**30:.0f} GiB,', p.multi_processor_count, 'SMs')
else:
    print('no GPU: CPU numbers')"

step correctness 150 $python benchmarks/gpu_correctness.py --device "$device"

# The issue's targets are stated for the default: ResNet-56 on the 360 digits test images.
bench sweep-default 60 sweep_speed.py
bench hooks-default 60 hook_overhead.py
# The same 360 images in 12 batches of 32: launch-bound, and measure replays CUDA graphs from the third.
bench hooks-default-batch32 60 hook_overhead.py --batch-size 32
bench throughput-default 60 sweep_throughput.py --stack 1 4 16

# The main job end to end on the GPU: trains the default net, then measures, sweeps and runs
# the analyses (but the degradation section's training) in bf16 autocast and channels_last.
step cli-bf16 150 $python -m probe.ablate --device "$device" --precision bf16 --no-progress \
    --skip degradation --out /tmp/probe-gpu-run-bf16
cp /tmp/probe-gpu-run-bf16/blocks.csv "$logs/blocks-bf16.csv" 2>/dev/null
cp /tmp/probe-gpu-run-bf16/report.html "$logs/report-bf16.html" 2>/dev/null
if [ "$device" = cuda ]; then
    step cli-fp16 90 $python -m probe.ablate --device cuda --precision fp16 --no-channels-last --no-progress \
        --skip degradation recalibration --bn-recalibrate --limit 200 --out /tmp/probe-gpu-run-fp16
    cp /tmp/probe-gpu-run-fp16/blocks.csv "$logs/blocks-fp16.csv" 2>/dev/null
fi

bench captum 90 captum_compare.py
# Sizes that fill a GPU: CIFAR-size images, and a torchvision ResNet-50 at ImageNet size.
bench sweep-cifar-size 60 sweep_speed.py --data synthetic --samples 8192 --batch-size 1024
bench hooks-cifar-size 60 hook_overhead.py --data synthetic --samples 16384 --batch-size 1024 --repeats 15
bench sweep-resnet50 90 sweep_speed.py --model resnet50 --data synthetic --image-size 224 --samples 512 \
    --batch-size 128 --precision bf16 --channels-last
bench hooks-resnet50 60 hook_overhead.py --model resnet50 --data synthetic --image-size 224 --samples 1024 \
    --batch-size 128 --precision bf16 --channels-last --repeats 15
# Other ways to compute the hooks' reductions, and CUDA graphs, on the same three workloads.
bench variants-default 90 hook_variants.py
bench variants-cifar-size 90 hook_variants.py --data synthetic --samples 16384 --batch-size 1024
bench variants-resnet50 90 hook_variants.py --model resnet50 --data synthetic --image-size 224 --samples 1024 \
    --batch-size 128 --precision bf16 --channels-last
bench memory 90 memory.py
# A 1.1B-parameter Llama built from a config: fp32, bf16 and half its layers on disk (a small one on a CPU).
if [ "$device" = cuda ]; then bench big-model 300 big_model.py --size 1b; else bench big-model 300 big_model.py; fi

# --batch-size auto: the windows chosen from the free memory, and the sweep's real peak against that budget.
if [ "$device" = cuda ]; then bench batch-size 240 batch_size.py --size 1b; else bench batch-size 240 batch_size.py; fi

echo "== summary ($device)"
grep -E "^(sweep|hooks|throughput|captum|hook variants|peak memory|batch size):|ratio|of the budget|failed$|[0-9]+ failed" "$log" \
    | grep -v "^--" || true
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed step: %s\n' "${failed[@]}"
    exit 1
fi
echo "every step passed"
