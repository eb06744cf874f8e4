"""Describe and check a checkpoint: `deepsuite inspect` as a script.

    python tools/inspect_checkpoint.py runs/default            # training checkpoint through `latest`
    python tools/inspect_checkpoint.py runs/default/step_400 --json
    python tools/inspect_checkpoint.py out/hf                  # an HF or a deepsuite model folder

Prints model family/flavor/config, step, tokens seen, parameters per dtype, files and the shard
layout (ZeRO stage, world size, EP size, files per rank); exits 2 with one `error:` line when the
checkpoint is missing or corrupt. The work is `deepsuite.checkpoint.inspect.inspect_checkpoint`.
"""

from __future__ import annotations

from deepsuite.cli import tool_main

if __name__ == "__main__":
    raise SystemExit(tool_main("inspect", prog="inspect_checkpoint.py"))
