"""Single-device building blocks (no torch.distributed, no Transformer Engine).

Names are resolved lazily. The seeds' specialised layers (complex, DFT, Hermite, …) live in
`deepsuite.vision.layers`; they are reachable here for compatibility with the seed imports but
are only imported when asked for, so the LLM path never loads the vision package.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DeepSeekMoE": "deepsuite.layers.moe",
    "MoERouter": "deepsuite.layers.moe",
    "GroupedExperts": "deepsuite.layers.moe",
    "SwiGLU": "deepsuite.layers.mlp",
    "GELUMLP": "deepsuite.layers.mlp",
    "RMSNorm": "deepsuite.layers.norm",
    "MultiHeadLatentAttention": "deepsuite.layers.attention.mla",
    "RotaryPositionEmbedding": "deepsuite.layers.attention.rope",
    "MultiHeadAttention": "deepsuite.layers.attention.mha",
    # seed-compatible aliases into the secondary package (imported only on access)
    "Bottleneck": "deepsuite.vision.layers",
    "ComplexConv2d": "deepsuite.vision.layers",
    "ComplexBatchNorm2d": "deepsuite.vision.layers",
    "DFT": "deepsuite.vision.layers",
    "HermiteFeatures": "deepsuite.vision.layers",
    "LaguerreFeatures": "deepsuite.vision.layers",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.layers' has no attribute {name!r}")
