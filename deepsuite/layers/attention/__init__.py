"""Attention layers: MLA (DeepSeek), multi-head attention (GPT), RoPE with YaRN, kernel backends."""

from deepsuite.layers.attention.backend import attention, resolve_attention_backend
from deepsuite.layers.attention.mha import MultiHeadAttention
from deepsuite.layers.attention.mla import MultiHeadLatentAttention
from deepsuite.layers.attention.rope import RotaryPositionEmbedding

__all__ = [
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "RotaryPositionEmbedding",
    "attention",
    "resolve_attention_backend",
]
