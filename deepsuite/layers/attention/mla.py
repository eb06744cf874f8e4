"""Multi-head latent attention (DeepSeek-V2/V3).

Queries: ``wq`` (or ``wq_a → RMSNorm → wq_b`` with q compression) to per-head ``[nope | rope]``.
Keys and values: ``wkv_a`` to ``[latent c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]``; the latent
is RMS-normalised and ``wkv_b`` expands it to per-head ``[k_nope | v]``; ``k_pe`` is one rotated key
slice shared by all heads.

Two paths, numerically equal (tests/unit/test_mla.py):

* training / no cache: expand keys and values per head and call the attention backend (SDPA, or
  flash-attn with V padded on CUDA);
* with a `LatentKVCache`: cache only ``c_kv`` and the rotated ``k_pe`` and absorb ``wkv_b``:
  ``q_nope·k_nope = (q_nope·W_UK)·c_kv`` and ``Σ p·v = (Σ p·c_kv)·W_UV`` — DeepSeek's "absorb" mode,
  attention over ``kv_lora_rank + rope`` values per cached token instead of per-head keys.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.generation.latent_cache import LatentKVCache
from deepsuite.layers.attention.backend import attention, causal_mask
from deepsuite.layers.attention.rope import apply_rotary
from deepsuite.layers.norm import RMSNorm


class MultiHeadLatentAttention(nn.Module):
    """MLA with an optional latent cache.

    Args:
        d_model: hidden size.
        n_heads: attention heads.
        q_lora_rank: query compression rank; 0 = a single ``wq`` projection.
        kv_lora_rank: rank of the joint key/value latent (what the cache holds).
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head sizes.
        softmax_scale: scale of the attention logits (``qk_head_dim^-0.5``, × mscale² with YaRN).
        rms_norm_eps: epsilon of the q and kv latent norms.
        layer_idx: which cache layer this module reads and writes.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float | None = None,
        rms_norm_eps: float = 1e-6,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.qk_head_dim**-0.5
        self.layer_idx = layer_idx
        self.attention_backend: str = "auto"

        if q_lora_rank:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=rms_norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d_model, n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=rms_norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        return q.view(*x.shape[:2], self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dqk)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Attend over ``x`` ``(B, T, C)`` at positions ``start_pos + t``; ``rope`` = (cos, sin) ``(T, rope/2)``.

        Without a cache the sequence attends causally to itself (``start_pos`` only shifts RoPE).
        With a cache the new latents are written at ``start_pos`` and the queries attend to every
        cached position before them (absorbed path).
        """
        batch, seq_len, _ = x.shape
        cos, sin = rope
        q = self._queries(x)  # (B, H, T, Dqk)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)  # (B, H, T, R)

        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)  # (B, T, C) the latent
        k_pe = apply_rotary(k_pe, cos, sin)  # (B, T, R) shared by all heads

        if cache is not None:
            out = self._absorbed(q_nope, q_pe, kv, k_pe, cache, start_pos)  # (B, H, T, Dv)
        else:
            kv_up = self.wkv_b(kv).view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
            k_nope, v = torch.split(kv_up, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k_pe_heads = k_pe[:, None].expand(-1, self.n_heads, -1, -1)  # (B, H, T, R)
            k = torch.cat([k_nope, k_pe_heads], dim=-1)  # (B, H, T, Dqk)
            q = torch.cat([q_nope, q_pe], dim=-1)
            out = attention(q, k, v, causal=True, backend=self.attention_backend, scale=self.softmax_scale)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.v_head_dim)
        return self.wo(out)

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv: torch.Tensor,
        k_pe: torch.Tensor,
        cache: LatentKVCache,
        start_pos: int,
    ) -> torch.Tensor:
        batch, n_heads, seq_len, _ = q_nope.shape
        kv_all, pe_all = cache.update(self.layer_idx, kv, k_pe, start_pos)  # (B, S, C), (B, S, R)
        w = self.wkv_b.weight.view(n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # (H, Dn, C), (H, Dv, C)
        q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # (B, H, T, C): W_UK absorbed into q
        # heads and query positions share the keys (MQA over the latent): one bmm each
        scores = torch.bmm(q_lat.reshape(batch, n_heads * seq_len, -1), kv_all.transpose(1, 2))
        scores = scores + torch.bmm(q_pe.reshape(batch, n_heads * seq_len, -1), pe_all.transpose(1, 2))
        scores = scores.view(batch, n_heads, seq_len, -1).float() * self.softmax_scale  # (B, H, T, S)
        if seq_len > 1:
            mask = causal_mask(seq_len, kv_all.shape[1], scores.device)  # (T, S)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv_all.dtype)
        ctx = torch.bmm(probs.view(batch, n_heads * seq_len, -1), kv_all)  # (B, H·T, C)
        ctx = ctx.view(batch, n_heads, seq_len, self.kv_lora_rank)
        return torch.einsum("bhtc,hdc->bhtd", ctx, w_uv)  # (B, H, T, Dv): W_UV applied after attention

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections, unit norms."""
        for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
            linear = getattr(self, name, None)
            if linear is not None:
                nn.init.normal_(linear.weight, mean=0.0, std=std)
        if self.q_lora_rank:
            self.q_norm.init_weights()
        self.kv_norm.init_weights()
