"""Multi-head latent attention: absorbed latent-cache path vs the expanded training path and HF."""

from __future__ import annotations

import pytest
import torch

from deepsuite.generation.latent_cache import LatentKVCache
from deepsuite.layers.attention.mla import MultiHeadLatentAttention
from deepsuite.layers.attention.rope import RotaryPositionEmbedding

H, C, NOPE, ROPE, V, D = 4, 16, 12, 8, 10, 40


def make_mla(q_lora_rank: int = 0, seed: int = 0) -> tuple[MultiHeadLatentAttention, RotaryPositionEmbedding]:
    torch.manual_seed(seed)
    mla = MultiHeadLatentAttention(D, H, q_lora_rank, C, NOPE, ROPE, V, softmax_scale=0.3, layer_idx=1)
    mla.init_weights(std=0.3)
    with torch.no_grad():
        mla.kv_norm.weight.uniform_(0.5, 1.5)
    return mla.eval(), RotaryPositionEmbedding(ROPE, 64)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_absorbed_prefill_equals_expanded(q_lora_rank: int) -> None:
    mla, rope = make_mla(q_lora_rank)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        expanded = mla(x, rope.cos_sin(0, 11))
        cache = LatentKVCache(2, 2, 16, C, ROPE)
        absorbed = mla(x, rope.cos_sin(0, 11), cache=cache, start_pos=0)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_equals_full_sequence() -> None:
    mla, rope = make_mla(20)
    x = torch.randn(1, 9, D)
    with torch.no_grad():
        full = mla(x, rope.cos_sin(0, 9))
        cache = LatentKVCache(2, 1, 9, C, ROPE)
        parts = [mla(x[:, :4], rope.cos_sin(0, 4), cache=cache, start_pos=0)]
        for t in range(4, 9):
            parts.append(mla(x[:, t : t + 1], rope.cos_sin(t, 1), cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9
    assert cache.kv[0].abs().sum() == 0  # layer 0 untouched: this module is layer 1
    assert cache.values_per_token() == C + ROPE


def test_equals_transformers_attention() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    config = transformers.DeepseekV3Config(
        hidden_size=D,
        num_attention_heads=H,
        num_key_value_heads=H,
        q_lora_rank=None,
        kv_lora_rank=C,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    hf = DeepseekV3Attention(config, layer_idx=0).eval()
    mla = MultiHeadLatentAttention(D, H, 0, C, NOPE, ROPE, V, softmax_scale=hf.scaling).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        mla.wq.weight.copy_(hf.q_proj.weight)
        mla.wkv_a.weight.copy_(hf.kv_a_proj_with_mqa.weight)
        mla.kv_norm.weight.copy_(hf.kv_a_layernorm.weight)
        mla.wkv_b.weight.copy_(hf.kv_b_proj.weight)
        mla.wo.weight.copy_(hf.o_proj.weight)
    x = torch.randn(2, 7, D)
    pos = torch.arange(7)[None]
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, pos)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = hf(x, (cos, sin), mask)
        got = mla(x, RotaryPositionEmbedding(ROPE, 64).cos_sin(0, 7))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_every_projection() -> None:
    mla, rope = make_mla(24)
    mla.train()
    mla(torch.randn(2, 5, D), rope.cos_sin(0, 5)).sum().backward()
    for name, p in mla.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
