"""Attention backends against a float64 reference, incl. the bottom-right causal mask of a KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from deepsuite.layers.attention.backend import (
    attention,
    causal_mask,
    flash_attn_available,
    resolve_attention_backend,
)


def reference(q, k, v, causal=True, scale=None, mask=None):
    """Naive softmax attention in float64; queries are the last Tq of Tk positions."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, Tq, Tk)
    tq, tk = q.shape[-2], k.shape[-2]
    if causal:
        for i in range(tq):
            scores[..., i, tk - tq + i + 1 :] = float("-inf")
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def qkv(tq, tk, d=16, dv=None, b=2, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, h, tk, d, generator=g)
    v = torch.randn(b, h, tk, dv or d, generator=g)
    return q, k, v


@pytest.mark.parametrize(("tq", "tk"), [(7, 7), (1, 9), (3, 10), (5, 5)])
def test_sdpa_matches_reference_incl_cache_alignment(tq, tk):
    q, k, v = qkv(tq, tk)
    out = attention(q, k, v, causal=True, backend="sdpa")
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_chunked_queries_equal_full_sequence():
    """Queries fed in two chunks against a growing key set == one causal pass (what a cache does)."""
    q, k, v = qkv(10, 10)
    full = attention(q, k, v, backend="sdpa")
    first = attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], backend="sdpa")
    second = attention(q[:, :, 6:], k, v, backend="sdpa")
    torch.testing.assert_close(torch.cat([first, second], dim=2), full, atol=1e-6, rtol=1e-6)


def test_value_head_dim_may_differ_and_scale_is_used():
    q, k, v = qkv(6, 6, d=24, dv=8)
    out = attention(q, k, v, backend="sdpa", scale=0.3)
    assert out.shape == (2, 3, 6, 8)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_non_causal_and_extra_mask():
    q, k, v = qkv(4, 6)
    torch.testing.assert_close(
        attention(q, k, v, causal=False, backend="sdpa").double(),
        reference(q, k, v, causal=False),
        atol=1e-5,
        rtol=1e-5,
    )
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 0] = False  # row 1 must not see key 0
    out = attention(q, k, v, causal=True, backend="sdpa", attn_mask=pad)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask=pad), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 4, "cpu")
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError, match="Tq=3 > Tk=2"):
        causal_mask(3, 2, "cpu")


def test_resolve_backend():
    assert resolve_attention_backend("auto", "cpu", torch.float32, 64) == "sdpa"
    assert resolve_attention_backend("sdpa", "cpu", torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match="'flash' was requested"):
        resolve_attention_backend("flash", "cpu", torch.bfloat16, 64)
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention_backend("xformers", "cpu", torch.float32, 64)
    q, k, v = qkv(3, 3)
    with pytest.raises(ValueError, match="flash"):
        attention(q, k, v, backend="flash")


def test_auto_picks_flash_only_where_it_can_run(monkeypatch):
    from deepsuite.layers.attention import backend

    monkeypatch.setattr(backend, "flash_attn_available", lambda: True)
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 128) == "flash"
    assert resolve_attention_backend("auto", "cuda", torch.float16, 64) == "flash"
    assert resolve_attention_backend("auto", "cuda", torch.float32, 64) == "sdpa"
    assert resolve_attention_backend("auto", "cuda", torch.bfloat16, 512) == "sdpa"
    assert resolve_attention_backend("auto", "cpu", torch.bfloat16, 64) == "sdpa"
    with pytest.raises(ValueError, match="fp16 or bf16"):
        resolve_attention_backend("flash", "cuda", torch.float32, 64)


def test_flash_path_layout_padding_and_slicing(monkeypatch):
    """The flash branch on CPU with a stand-in kernel: (B, T, H, D) layout, V padded to the qk dim."""
    import sys
    import types

    from deepsuite.layers.attention import backend

    calls = []

    def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((tuple(q.shape), tuple(v.shape)))
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn 2 needs one head dim"
        out = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale)
        return out.transpose(1, 2).float()  # back to (B, T, H, D)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func)
    )
    q, k, v = qkv(3, 7, d=24, dv=8, b=2, h=5)
    out = backend._flash(q, k, v, causal=True, scale=0.25, dropout_p=0.0)
    assert calls == [((2, 3, 5, 24), (2, 7, 5, 24))]
    assert out.shape == (2, 5, 3, 8)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale=0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize(("tq", "tk", "dv"), [(64, 64, None), (1, 80, None), (16, 80, None), (32, 32, 8)])
def test_cuda_bf16_backends(backend, tq, tk, dv):
    if backend == "flash" and not flash_attn_available():
        pytest.skip("flash-attn not installed")
    q, k, v = (t.cuda().bfloat16() for t in qkv(tq, tk, d=64, dv=dv and 32))
    out = attention(q, k, v, backend=backend)
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-2, rtol=2e-2)
