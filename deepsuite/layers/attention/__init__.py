"""Attention layers: MLA (DeepSeek), multi-head attention (GPT), RoPE with YaRN, kernel backends."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MultiHeadLatentAttention": "deepsuite.layers.attention.mla",
    "RotaryPositionEmbedding": "deepsuite.layers.attention.rope",
    "MultiHeadAttention": "deepsuite.layers.attention.mha",
    "attention": "deepsuite.layers.attention.backend",
    "resolve_attention_backend": "deepsuite.layers.attention.backend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.layers.attention' has no attribute {name!r}")
