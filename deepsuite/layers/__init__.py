"""Single-device building blocks (no torch.distributed, no Transformer Engine).

The seeds' specialised layers (complex, DFT, Hermite, …) are in `deepsuite.vision`.
"""

from deepsuite.layers.attention import MultiHeadAttention, MultiHeadLatentAttention, RotaryPositionEmbedding
from deepsuite.layers.mlp import GELUMLP, SwiGLU
from deepsuite.layers.moe import DeepSeekMoE, GroupedExperts, MoERouter
from deepsuite.layers.norm import RMSNorm

__all__ = [
    "GELUMLP",
    "DeepSeekMoE",
    "GroupedExperts",
    "MoERouter",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "RMSNorm",
    "RotaryPositionEmbedding",
    "SwiGLU",
]
