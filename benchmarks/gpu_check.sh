#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and eetools installed (pip install -e .), run the
# unit tests of the exit model on the GPU, the quick reproduction pipeline in bfloat16 and
# the benchmark suite, and the Qwen3-4B-shaped scale check (calibration of 8 x 4,096 tokens, an RL
# step of 8 x 8 rollouts x 1,024 tokens, decode tokens/s with exits skipping 0-75 % of the blocks
# against bridge.generate and HF generate; benchmarks/bench_gpu_scale.py), and print the results.
# Budget: under 8 minutes on one GPU (the time limits below add up to more, as a guard).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # default OUT_DIR: runs/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}
$PY - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
step unit_tests_cuda 120 $PY -m pytest -q -x -p no:cacheprovider tests/unit/test_exits.py tests/unit/test_skipping.py --device cuda
step reproduce_quick_bf16 180 $PY -m eetools.cli reproduce --quick --device cuda --dtype bfloat16 --out "$OUT/reproduce" --no-progress
step scale_4b_bf16 240 $PY benchmarks/bench_gpu_scale.py --shape 4b --device cuda --dtype bfloat16 --json "$OUT/scale.json"
step benchmarks_cuda_bf16 200 $PY benchmarks/run_all.py --quick --device cuda --dtype bfloat16 --skip ddp --json "$OUT/bench.json"
echo "=== results ($OUT/bench.json)"
cat "$OUT/bench.json" 2>/dev/null
echo "=== 4B-shaped scale check ($OUT/scale.json)"
cat "$OUT/scale.json" 2>/dev/null
exit $status
