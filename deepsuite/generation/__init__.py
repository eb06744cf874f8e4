"""Text generation: sampling, KV caches (full K/V for GPT, latent for MLA), MTP speculative decoding,
and text in / text out through a tokenizer."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "generate": "deepsuite.generation.generate",
    "generate_text": "deepsuite.generation.text",
    "encode_prompt": "deepsuite.generation.text",
    "GenerationError": "deepsuite.generation.text",
    "sample_next_token": "deepsuite.generation.sampling",
    "KVCache": "deepsuite.generation.kv_cache",
    "LatentKVCache": "deepsuite.generation.latent_cache",
    "speculative_generate": "deepsuite.generation.speculative",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.generation' has no attribute {name!r}")
