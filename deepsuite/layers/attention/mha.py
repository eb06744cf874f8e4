"""Causal multi-head self-attention (GPT-2): fused qkv projection, output projection, KV cache."""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.generation.kv_cache import KVCache
from deepsuite.layers.attention.backend import attention


class MultiHeadAttention(nn.Module):
    """GPT-2 attention: ``c_proj(attention(split_heads(c_attn(x))))`` with dropout on the output.

    ``layer_idx`` selects this layer's slot in a `KVCache`. ``attention_backend`` ("auto" |
    "flash" | "sdpa") is a plain attribute the trainer may set.
    """

    def __init__(
        self, d_model: int, n_heads: int, *, bias: bool = True, dropout: float = 0.0, layer_idx: int = 0
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} does not divide d_model={d_model}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.layer_idx = layer_idx
        self.attention_backend: str = "auto"
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q, k, v = self.c_attn(x).split(self.d_model, dim=-1)  # 3 × (B, T, C)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start_pos)  # (B, H, start_pos + T, D)
        y = attention(q, k, v, causal=True, backend=self.attention_backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(batch, seq_len, self.d_model)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) weights, zero biases; ``out_std`` (default ``std``) for the residual ``c_proj``."""
        for linear, s in ((self.c_attn, std), (self.c_proj, std if out_std is None else out_std)):
            nn.init.normal_(linear.weight, mean=0.0, std=s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
