#!/usr/bin/env bash
# The checks of a GPU session, in one run (docs/GPU.md says what they gave on an H200): the
# test files whose models, training and search run on the GPU when there is one (model.device
# "auto" = cuda, bf16), search throughput with a trained tiny policy, and the HF backend at
# Qwen2.5-Math-7B's shape.
#
#   bash bench/gpu_check.sh [POLICY_DIR]     # logs to $OUT (default /tmp/gpu_check)
#
# Needs the project's dependencies importable (pip install -e ".[dev]", or PYTHONPATH); the
# tests' data lies in the repository. Each part writes its own log and has
# its own time limit, and each test a shorter one (pytest-timeout), so a slow part fails its
# tests, with their names, instead of being cut off before pytest's summary.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, torch, transformers, trl, datasets, math_verify, rstar
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" || exit 1

part() {  # part NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "(exit $?)" >>"$OUT/$name.log"
  grep -v -i "loading weights\|writing model" "$OUT/$name.log" | tail -15
}

part tests 200 $PY -m pytest -q -p no:cacheprovider --timeout 60 -rf --tb=short --durations=8 \
  tests/test_models_hf.py tests/test_training.py tests/test_ppm.py tests/test_pipeline.py \
  tests/test_evaluate.py
part hf_7b 100 $PY bench/hf_throughput.py --shape qwen2.5-math-7b --requests 64 --n 8 --max-new-tokens 64
if [ -n "${1:-}" ]; then
  part search 120 $PY bench/search.py --policy "$1" --problems 16 --rollouts 4 --samples 4
fi
# The quick preset killed and resumed: 86 s on the 2-core CPU; it did not finish within 140 s
# on an H200 (tiny models are launch-bound there), so it runs last, with the time left.
part evolve 300 $PY -m pytest -q -p no:cacheprovider --timeout 280 -rf --tb=short tests/test_evolve.py
