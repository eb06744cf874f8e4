"""Attention kernels behind one call: flash-attn when it can run, PyTorch SDPA otherwise.

``attention(q, k, v)`` takes ``(B, H, T, D)`` tensors. With a KV cache the queries are the *last*
``Tq`` positions of the ``Tk`` keys, so the causal mask is aligned bottom-right (query ``i`` sees
keys ``0 … Tk - Tq + i``); flash-attn >= 2.1 aligns it so too, SDPA's ``is_causal`` aligns it
top-left, hence the explicit mask here when ``Tq != Tk``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["auto", "flash", "sdpa"]
_BACKENDS = ("auto", "flash", "sdpa")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def _flash_unusable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if not flash_attn_available():
        return "the flash-attn package is not installed (pip install 'deepsuite[flash]')"
    if device.type != "cuda":
        return f"flash-attn needs CUDA tensors, got device {device}"
    if dtype not in _FLASH_DTYPES:
        return f"flash-attn needs fp16 or bf16, got {dtype}"
    if head_dim > _FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head_dim <= {_FLASH_MAX_HEAD_DIM}, got {head_dim}"
    return None


def resolve_attention_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> Literal["flash", "sdpa"]:
    """The kernel that ``attention`` will use: ``"flash"`` or ``"sdpa"``.

    ``"auto"`` picks flash-attn when it is installed and the inputs suit it (CUDA, fp16/bf16,
    head_dim <= 256), SDPA otherwise. ``"flash"`` raises ``ValueError`` saying why it cannot run.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(_BACKENDS)}")
    if backend == "sdpa":
        return "sdpa"
    reason = _flash_unusable_reason(torch.device(device), dtype, head_dim)
    if reason is None:
        return "flash"
    if backend == "flash":
        raise ValueError(f"attention backend 'flash' was requested but {reason}; use 'auto' or 'sdpa'")
    return "sdpa"


def causal_mask(q_len: int, k_len: int, device: torch.device | str) -> torch.Tensor:
    """Boolean ``(Tq, Tk)`` mask, True = may attend; queries are the last ``Tq`` of ``Tk`` positions."""
    if q_len > k_len:
        raise ValueError(
            f"causal attention needs at least as many keys as queries, got Tq={q_len} > Tk={k_len}"
        )
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos


def _combine_masks(causal: torch.Tensor, attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.to(dtype).masked_fill(~causal, float("-inf"))


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    is_causal = False
    if causal:
        if attn_mask is None and q_len == k_len:
            is_causal = True  # top-left == bottom-right alignment; lets SDPA pick its fused kernels
        elif attn_mask is None and q_len == 1:
            pass  # the single (last) query sees every key
        else:
            mask = causal_mask(q_len, k_len, q.device)
            attn_mask = mask if attn_mask is None else _combine_masks(mask, attn_mask, q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, dropout_p: float
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    v_dim = v.shape[-1]
    qk_dim = q.shape[-1]
    if v_dim != qk_dim:  # flash-attn 2 wants one head dim: pad V (MLA has v_head_dim != qk_head_dim)
        if v_dim > qk_dim:
            raise ValueError(f"flash attention needs v_head_dim <= qk_head_dim, got {v_dim} > {qk_dim}")
        v = F.pad(v, (0, qk_dim - v_dim))
    # flash-attn layout is (B, T, H, D)
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=causal,
    )
    out = out.transpose(1, 2)  # (B, H, Tq, D)
    return out[..., :v_dim] if v_dim != qk_dim else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    backend: str = "auto",
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, H, T, D)`` tensors; returns ``(B, H, Tq, Dv)``.

    Args:
        q: queries ``(B, H, Tq, D)``; with a KV cache these are the last ``Tq`` positions.
        k: keys ``(B, H, Tk, D)``.
        v: values ``(B, H, Tk, Dv)``; ``Dv`` may differ from ``D`` (MLA).
        causal: mask future keys (bottom-right aligned when ``Tq != Tk``).
        backend: ``"auto"``, ``"flash"`` or ``"sdpa"`` (see `resolve_attention_backend`).
        scale: softmax scale; default ``1 / sqrt(D)``.
        attn_mask: optional extra mask for SDPA (bool True = attend, or additive float),
            broadcastable to ``(B, H, Tq, Tk)``; forces the SDPA backend.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, H, T, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={q.shape[-2]}, Tk={k.shape[-2]}")
    kind = resolve_attention_backend(backend, q.device, q.dtype, q.shape[-1])
    if attn_mask is not None:
        if backend == "flash":
            raise ValueError("attention backend 'flash' does not take attn_mask; use 'sdpa' or 'auto'")
        kind = "sdpa"
    if kind == "flash":
        return _flash(q, k, v, causal, scale, dropout_p)
    return _sdpa(q, k, v, causal, scale, attn_mask, dropout_p)


__all__: list[str] = ["attention", "causal_mask", "flash_attn_available", "resolve_attention_backend"]
