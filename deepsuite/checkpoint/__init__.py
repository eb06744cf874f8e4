"""Checkpoints: training save/resume (DeepSpeed + deepsuite state), HF/safetensors model I/O, conversion.

Imports are lazy so that `deepsuite.checkpoint.hf_io` can be used without DeepSpeed.
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
    "load_model_from_checkpoint": "deepsuite.checkpoint.manager",
    "hf_to_deepsuite": "deepsuite.checkpoint.convert",
    "deepsuite_to_hf": "deepsuite.checkpoint.convert",
    "zero_to_hf": "deepsuite.checkpoint.convert",
    "inspect_checkpoint": "deepsuite.checkpoint.inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.checkpoint' has no attribute {name!r}")
