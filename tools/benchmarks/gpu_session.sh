#!/usr/bin/env bash
# Every GPU check of the project in one go (~8 minutes on an H100/H200), for a machine that has
# CUDA but maybe not deepsuite installed: run from the repository root with the image's python3.
#
#   OUT=/some/folder bash tools/benchmarks/gpu_session.sh [CHECKPOINT DATA]
#
# Writes under $OUT (at most 8 files): smi.txt, tests_gpu.txt, mfu.json, mfu.log, profiles.txt,
# fp8_linear.json, train_step.json (GPT vs transformers' GPT2LMHeadModel, fp32 and bf16) and, with a trained DeepSeek-V3 CHECKPOINT and its prepared DATA folder,
# speculative.json. Each step has its own timeout and the JSON files are written as rows finish,
# so a step that runs long costs only itself. Prints a short summary last.
set -u
OUT=${OUT:-/tmp/deepsuite_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv \
    >"$OUT/smi.txt" 2>&1
timeout 150 "$PY" -m pytest -q tests/gpu -o addopts="" -rs -p no:cacheprovider >"$OUT/tests_gpu.txt" 2>&1
# bf16 / FP8 native, eager and compiled; the three models; kernel profiles of each configuration
timeout 330 "$PY" tools/benchmarks/mfu_gpu.py --quick --models gpt-1b,dsv3-small,dsv3-large \
    --profile "$OUT/profiles.txt" --json "$OUT/mfu.json" >"$OUT/mfu.log" 2>&1
timeout 100 "$PY" tools/benchmarks/fp8.py --quick --device cuda --json "$OUT/fp8_linear.json" \
    >>"$OUT/mfu.log" 2>&1
timeout 75 "$PY" tools/benchmarks/train_step.py --device cuda --rounds 1 --json "$OUT/train_step.json" \
    >>"$OUT/mfu.log" 2>&1
if [ $# -ge 2 ]; then
    timeout 60 "$PY" tools/benchmarks/speculative.py --device cuda --checkpoint "$1" --data "$2" \
        --json "$OUT/speculative.json" >>"$OUT/mfu.log" 2>&1
fi

echo "== $(head -2 "$OUT/smi.txt" | tail -1)"
tail -3 "$OUT/tests_gpu.txt"
grep -v -i warn "$OUT/mfu.log" | grep -E "^(gpt|deepseek)|tokens/s|acceptance|speedup|speed-up" | tail -30
