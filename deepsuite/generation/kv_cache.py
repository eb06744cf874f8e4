"""Full key/value cache for multi-head attention (GPT)."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer preallocated keys and values ``(B, H, max_seq_len, D)``.

    Attention layer ``i`` calls ``update(i, k, v, start_pos)`` with the keys/values of the new
    positions and gets back the keys/values of every position up to the last one written.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        shape_k = (batch_size, n_heads, max_seq_len, head_dim)
        shape_v = (batch_size, n_heads, max_seq_len, v_head_dim or head_dim)
        self.k = [torch.zeros(shape_k, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape_v, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0
        """End position of the latest write (the number of valid positions)."""

    @property
    def n_layers(self) -> int:
        """Number of layers cached."""
        return len(self.k)

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``(B, H, T, D)`` at ``start_pos`` and return positions ``[0, start_pos + T)``."""
        batch, _, seq_len, _ = k.shape
        end = start_pos + seq_len
        if batch != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got {batch}")
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(
                f"KV cache holds {self.max_seq_len} positions; cannot write positions {start_pos}..{end - 1}"
            )
        cache_k, cache_v = self.k[layer_idx], self.v[layer_idx]
        cache_k[:, :, start_pos:end] = k
        cache_v[:, :, start_pos:end] = v
        self.length = end
        return cache_k[:, :, :end], cache_v[:, :, :end]
