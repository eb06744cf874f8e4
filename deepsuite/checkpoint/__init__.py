"""Every on-disk format: training checkpoints (save/resume: DeepSpeed + deepsuite state), their
consolidation, HF and deepsuite safetensors folders, conversion and inspection.

Imports are lazy, so that importing one of them does not load the others (and DeepSpeed).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointError": "deepsuite.checkpoint.manager",
    "save_checkpoint": "deepsuite.checkpoint.manager",
    "load_checkpoint": "deepsuite.checkpoint.manager",
    "verify_checkpoint": "deepsuite.checkpoint.manager",
    "find_checkpoint": "deepsuite.checkpoint.manager",
    "resolve_resume": "deepsuite.checkpoint.manager",
    "load_model_from_checkpoint": "deepsuite.checkpoint.consolidate",
    "consolidated_state_dict": "deepsuite.checkpoint.consolidate",
    "hf_to_deepsuite": "deepsuite.checkpoint.convert",
    "deepsuite_to_hf": "deepsuite.checkpoint.convert",
    "zero_to_hf": "deepsuite.checkpoint.convert",
    "consolidate_checkpoint": "deepsuite.checkpoint.convert",
    "inspect_checkpoint": "deepsuite.checkpoint.inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.checkpoint' has no attribute {name!r}")
