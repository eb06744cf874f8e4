"""Convert model checkpoints between Hugging Face and deepsuite folders: `deepsuite convert` as a script.

    python tools/convert_hf.py hf-to-deepsuite path/to/hf out/ds     # config.json → model.yaml (GPT, DeepSeek-V3)
    python tools/convert_hf.py deepsuite-to-hf out/ds out/hf         # a deepsuite folder or a training checkpoint
    python tools/convert_hf.py zero-to-hf runs/default out/hf        # a training checkpoint, any ZeRO stage

The arguments, the conversions and the errors (one `error:` line, exit 2) are those of the
subcommand; the conversions themselves live in `deepsuite.checkpoint.convert`.
"""

from __future__ import annotations

from deepsuite.cli import tool_main

if __name__ == "__main__":
    raise SystemExit(tool_main("convert", prog="convert_hf.py"))
