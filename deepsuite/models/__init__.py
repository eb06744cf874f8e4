"""Model families. Heavy (torch) imports happen on first attribute access."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GPT": "deepsuite.models.gpt.model",
    "DeepSeekV3": "deepsuite.models.deepseek_v3.model",
    "get_model_spec": "deepsuite.models.registry",
    "build_model": "deepsuite.models.registry",
    "ModelSpec": "deepsuite.models.registry",
    # the public names of the HF folder I/O, which lives with every other file format in checkpoint/
    "load_hf": "deepsuite.checkpoint.hf",
    "save_hf": "deepsuite.checkpoint.hf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.models' has no attribute {name!r}")
