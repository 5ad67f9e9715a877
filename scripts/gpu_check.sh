#!/usr/bin/env bash
# GPU check for the N2UQ kernels: the gpu-marked tests, then the GPU and quantizer benchmarks.
# Usage: bash scripts/gpu_check.sh [OUTPUT_DIR]      (default ./gpu_results)
# Needs a CUDA machine with torch (2.4+, with its Triton) and pytest; downloads nothing (random
# init, no pretrained weights). Each step has its own time limit; a failing step is reported and
# the next one still runs. Everything is printed and also written to OUTPUT_DIR. Under 4 minutes on
# an H100: the gpu-marked tests of the whole suite (Triton kernels, torch.compile on CUDA, engine,
# export; the slow interpreter check runs on CPU in the normal suite), then the two benchmarks.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-./gpu_results}"
mkdir -p "$OUT"
STATUS=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || STATUS=1
}

: > "$OUT/summary.txt"
step environment 60 python -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); import triton; print('triton', triton.__version__)"
step nvidia_smi 20 nvidia-smi
step gpu_tests 150 python -m pytest -q -m "gpu and not slow" -rs --durations=8 tests/
step gpu_benchmark 150 python scripts/benchmark.py --mode gpu --batch-size 256 --step-bits 2 --rounds 4 --warmup 1
step quantizer_cuda 60 python scripts/benchmark.py --mode quantizer --device cuda --rounds 20 --warmup 3
echo "=== done: outputs in $OUT (overall status $STATUS)" | tee -a "$OUT/summary.txt"
exit $STATUS
