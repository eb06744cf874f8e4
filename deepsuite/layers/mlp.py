"""Feed-forward blocks: GPT-2's GELU MLP and the SwiGLU of DeepSeek-V3 (dense layers, shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GELUMLP(nn.Module):
    """``c_proj(gelu_tanh(c_fc(x)))`` with dropout on the output (GPT-2's MLP).

    GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
    """

    def __init__(self, d_model: int, d_ffn: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ffn, bias=bias)
        self.c_proj = nn.Linear(d_ffn, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) weights, zero biases; ``out_std`` (default ``std``) for the residual ``c_proj``."""
        _init_linear(self.c_fc, std)
        _init_linear(self.c_proj, std if out_std is None else out_std)


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (DeepSeek-V3 / LLaMA naming)."""

    def __init__(self, d_model: int, d_ffn: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ffn, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ffn, bias=bias)
        self.down_proj = nn.Linear(d_ffn, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) weights, zero biases; ``out_std`` (default ``std``) for ``down_proj``."""
        _init_linear(self.gate_proj, std)
        _init_linear(self.up_proj, std)
        _init_linear(self.down_proj, std if out_std is None else out_std)


@torch.no_grad()
def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
