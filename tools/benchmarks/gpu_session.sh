#!/usr/bin/env bash
# Every GPU check of the project in one call, for a machine that has CUDA but maybe not deepsuite
# installed: run from the repository root with the image's python3 (data/shakespeare prepared, for
# the FP8 loss run; without it that run uses a synthetic task). From the device tool: carry data/shakespeare.
#
#   OUT=/some/folder bash tools/benchmarks/gpu_session.sh [quick|full]
#
# Step timeouts add up to 9.5 min (full), inside one 10-minute device call.
# quick (~4 min on an H200): tests/gpu, the MoE layer vs transformers, deepseek-v3-xl bf16 / FP8
# eager with kernel profiles. full (~8 min): the same, plus torch.compile rows, the d 4096 GPT
# FP8 / bf16 rows and 300 steps of FP8 vs bf16 loss on deepseek-v3-xl.
# Writes under $OUT (at most 8 files): smi.txt, tests_gpu.txt, moe_gpu.json, mfu.json,
# profiles.txt, session.log, fp8_parity.json, fp8_parity.png. Each step has its own timeout and
# the JSON files are written as rows finish, so a step that runs long costs only itself.
set -u
OUT=${OUT:-/tmp/deepsuite_gpu}
PHASE=${1:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
stamp() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv \
    >"$OUT/smi.txt" 2>&1
stamp "tests/gpu"
timeout 110 "$PY" -m pytest -q tests/gpu -o addopts="" -rs -p no:cacheprovider >"$OUT/tests_gpu.txt" 2>&1
stamp "MoE layer: deepsuite bf16 / FP8 vs transformers grouped_mm"
timeout 90 "$PY" tools/benchmarks/moe_gpu.py --json "$OUT/moe_gpu.json" --profile "$OUT/profiles.txt" \
    >>"$LOG" 2>&1
if [ "$PHASE" = quick ]; then
    stamp "deepseek-v3-xl bf16 / native FP8, eager"
    timeout 200 "$PY" tools/benchmarks/mfu_gpu.py --quick --no-compile --models dsv3-xl --modes bf16,native \
        --profile "$OUT/profiles.txt" --json "$OUT/mfu.json" >>"$LOG" 2>&1
else
    stamp "deepseek-v3-xl and GPT d 4096: bf16 / native FP8, eager and compiled"
    timeout 240 "$PY" tools/benchmarks/mfu_gpu.py --quick --models dsv3-xl,gpt-d4096 --modes bf16,native \
        --profile "$OUT/profiles.txt" --json "$OUT/mfu.json" >>"$LOG" 2>&1
    stamp "deepseek-v3-xl: 300 steps FP8 vs bf16 loss"
    timeout 130 "$PY" tools/benchmarks/fp8_loss_parity.py --device cuda --model deepseek-v3-xl --n-layers 12 \
        --steps 300 --batch 4 --seq-len 512 --json "$OUT/fp8_parity.json" --plot "$OUT/fp8_parity.png" >>"$LOG" 2>&1
fi
stamp "done"

echo "== $(head -2 "$OUT/smi.txt" | tail -1)"
tail -3 "$OUT/tests_gpu.txt"
grep -v -i warn "$LOG" | grep -E "^==|^(gpt|deepseek|deepsuite|transformers)|tokens/s|gap|FAILED|Error" | tail -40
