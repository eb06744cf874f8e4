"""The MLA inference cache: the normalised KV latent and the rotated shared key slice, nothing else.

Per token and layer it holds ``kv_lora_rank + qk_rope_head_dim`` values (DeepSeek-V3: 512 + 64 =
576), against ``n_heads · (qk_head_dim + v_head_dim)`` = 40,960 for a full K/V cache of the same
heads (71×). The per-head keys and values are never rebuilt: MLA absorbs ``wkv_b`` into the query
and the output (see `deepsuite.layers.attention.mla`).
"""

from __future__ import annotations

import torch


class LatentKVCache:
    """Per-layer preallocated ``kv`` ``(B, max_seq_len, kv_lora_rank)`` and ``pe`` ``(B, max_seq_len, rope_dim)``.

    Attention layer ``i`` calls ``update(i, kv, pe, start_pos)`` with the latents of the new
    positions and gets back those of every position up to the last one written.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.kv = [
            torch.zeros(batch_size, max_seq_len, kv_lora_rank, device=device, dtype=dtype)
            for _ in range(n_layers)
        ]
        self.pe = [
            torch.zeros(batch_size, max_seq_len, qk_rope_head_dim, device=device, dtype=dtype)
            for _ in range(n_layers)
        ]
        self.length = 0
        """End position of the latest write (the number of valid positions)."""

    @property
    def n_layers(self) -> int:
        """Number of layers cached."""
        return len(self.kv)

    def values_per_token(self) -> int:
        """Cached values per token per layer: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv[0].shape[-1] + self.pe[0].shape[-1]

    def nbytes(self) -> int:
        """Bytes held by the whole cache (all layers, all preallocated positions)."""
        return sum(t.numel() * t.element_size() for t in (*self.kv, *self.pe))

    def update(
        self, layer_idx: int, kv: torch.Tensor, pe: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``kv`` ``(B, T, C)`` and ``pe`` ``(B, T, R)`` at ``start_pos``; return positions ``[0, start_pos + T)``."""
        batch, seq_len, _ = kv.shape
        end = start_pos + seq_len
        if batch != self.batch_size:
            raise ValueError(f"latent cache was made for batch size {self.batch_size}, got {batch}")
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(
                f"latent cache holds {self.max_seq_len} positions; cannot write positions {start_pos}..{end - 1}"
            )
        cache_kv, cache_pe = self.kv[layer_idx], self.pe[layer_idx]
        cache_kv[:, start_pos:end] = kv
        cache_pe[:, start_pos:end] = pe
        self.length = end
        return cache_kv[:, :end], cache_pe[:, :end]
