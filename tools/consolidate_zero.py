"""Consolidate a training checkpoint (ZeRO 0–3, expert-parallel shards included) into one safetensors
folder of fp32 weights: `deepsuite consolidate` as a script.

    python tools/consolidate_zero.py runs/default out/hf                       # `latest`, HF format
    python tools/consolidate_zero.py runs/default out/ds --step 400 --format deepsuite

The checkpoint is verified (manifest, weights-only unpickling) before DeepSpeed's consolidation
(`deepsuite.checkpoint.consolidate`) reads it; the output folder is written atomically.
"""

from __future__ import annotations

from deepsuite.cli import tool_main

if __name__ == "__main__":
    raise SystemExit(tool_main("consolidate", prog="consolidate_zero.py"))
