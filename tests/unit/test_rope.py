"""RoPE/YaRN against transformers' DeepSeek-V3 rotary code and a complex-number reference."""

from __future__ import annotations

import pytest
import torch

from deepsuite.layers.attention.rope import RotaryPositionEmbedding, apply_rotary, yarn_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)


def hf_config(rope: dict, dim: int = 16, max_pos: int = 256):  # type: ignore[no-untyped-def]
    return transformers.DeepseekV3Config(
        hidden_size=32,
        num_attention_heads=2,
        qk_rope_head_dim=dim,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        dict(
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=16,
            beta_slow=2,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        dict(
            factor=8.0,
            original_max_position_embeddings=32,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),
    ],
)
def test_yarn_tables_equal_transformers(params: dict) -> None:
    config = hf_config({"rope_type": "yarn", "rope_theta": 10000.0, **params}, dim=16)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours = RotaryPositionEmbedding(
        16,
        256,
        scaling="yarn",
        factor=params["factor"],
        original_max_seq_len=params["original_max_position_embeddings"],
        beta_fast=params["beta_fast"],
        beta_slow=params["beta_slow"],
        mscale=params["mscale"],
        mscale_all_dim=params["mscale_all_dim"],
    )
    assert torch.equal(ours.inv_freq(), hf_inv_freq)
    assert ours.attention_factor == pytest.approx(hf_factor, rel=1e-12)
    rotary = DeepseekV3RotaryEmbedding(config)
    pos = torch.arange(256)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    assert torch.equal(ours.cos, cos[0, :, :8])
    assert torch.equal(ours.sin, sin[0, :, :8])


def test_plain_rope_equals_transformers_and_rotation_matches() -> None:
    config = hf_config({"rope_type": "default", "rope_theta": 500.0}, dim=8)
    rotary = DeepseekV3RotaryEmbedding(config)
    ours = RotaryPositionEmbedding(8, 256, base=500.0)
    cos, sin = rotary(torch.zeros(1), torch.arange(3, 13)[None])
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 1, 10, 8)
    hf_q, hf_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    our_q, our_k = ours(q, k, start_pos=3)
    assert torch.equal(our_q, hf_q)
    assert torch.equal(our_k, hf_k)


def test_dot_products_equal_deepseek_complex_rotation() -> None:
    """DeepSeek's official code rotates view_as_complex pairs; the de-interleaved layout keeps q·k."""
    dim, base = 8, 10000.0
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = torch.arange(6, dtype=torch.float64)
    freqs = torch.polar(torch.ones(6, dim // 2, dtype=torch.float64), pos[:, None] * inv[None])
    q, k = torch.randn(6, dim, dtype=torch.float64), torch.randn(6, dim, dtype=torch.float64)

    def official(x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.view_as_complex(x.view(6, dim // 2, 2)) * freqs).flatten(1)

    rope = RotaryPositionEmbedding(dim, 6, base=base)
    ours_q = apply_rotary(q, rope.cos.double(), rope.sin.double())
    ours_k = apply_rotary(k, rope.cos.double(), rope.sin.double())
    torch.testing.assert_close(ours_q @ ours_k.T, official(q) @ official(k).T, atol=1e-6, rtol=1e-6)


def test_yarn_extrapolates_high_frequencies_and_interpolates_low() -> None:
    inv = yarn_inv_freq(64, 10000.0, 40.0, 4096)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    assert torch.equal(inv[:4], plain[:4])  # fastest rotations untouched
    torch.testing.assert_close(inv[-4:], plain[-4:] / 40.0)  # slowest interpolated by the factor


def test_meta_build_then_init_weights() -> None:
    with torch.device("meta"):
        rope = RotaryPositionEmbedding(16, 128, scaling="yarn", factor=4.0, original_max_seq_len=32)
    assert rope.cos.is_meta
    rope = rope.to_empty(device="cpu")
    rope.init_weights()
    ref = RotaryPositionEmbedding(16, 128, scaling="yarn", factor=4.0, original_max_seq_len=32)
    assert torch.equal(rope.cos, ref.cos) and torch.equal(rope.sin, ref.sin)
    assert "cos" not in rope.state_dict()


def test_out_of_table_positions_raise() -> None:
    rope = RotaryPositionEmbedding(8, 16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        rope.cos_sin(10, 8)
