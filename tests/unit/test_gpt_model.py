"""GPT model: flavor parameter counts, meta build + init, causal masking, tying, loss path, layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepsuite.layers.mlp import GELUMLP, SwiGLU
from deepsuite.layers.norm import RMSNorm
from deepsuite.models.gpt.config import FLAVORS, GPTConfig
from deepsuite.models.gpt.model import GPT

TINY = GPTConfig(vocab_size=101, max_seq_len=32, d_model=48, n_layers=3, n_heads=4, d_ffn=96)


def gpt2_param_count(args: GPTConfig) -> int:
    """Closed form: embeddings + n_layers · (2 LN + qkv + out proj + MLP) + ln_f (+ untied head)."""
    d, f, b = args.d_model, args.ffn_dim, int(args.bias)
    ln = d * (1 + b)
    block = 2 * ln + (d * 3 * d + 3 * d * b) + (d * d + d * b) + (d * f + f * b) + (f * d + d * b)
    head = 0 if args.tie_embeddings else args.vocab_size * d
    return args.vocab_size * d + args.max_seq_len * d + args.n_layers * block + ln + head


# published sizes (OpenAI GPT-2 checkpoints as counted by transformers, tied embeddings)
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_flavor_param_counts_on_meta(flavor):
    args = FLAVORS[flavor]
    with torch.device("meta"):
        model = GPT(args)
    assert model.num_params() == gpt2_param_count(args)
    if flavor in PUBLISHED:
        assert model.num_params() == PUBLISHED[flavor]
    assert (
        model.num_params(exclude_embeddings=True)
        == model.num_params() - args.vocab_size * args.d_model - args.max_seq_len * args.d_model
    )


def test_untied_and_biasless_counts():
    for args in (
        GPTConfig(**{**TINY.__dict__, "tie_embeddings": False}),
        GPTConfig(**{**TINY.__dict__, "bias": False}),
    ):
        assert GPT(args).num_params() == gpt2_param_count(args)


def test_meta_build_to_empty_init_weights():
    with torch.device("meta"):
        model = GPT(TINY)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.wte.weight, "to_empty must keep the head tied"
    torch.manual_seed(0)
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for name, b in model.named_buffers():
        assert torch.isfinite(b).all(), name
    # GPT-2 init: residual projections scaled by 1/sqrt(2·n_layers), biases 0, LayerNorm 1/0
    out_std = 0.02 / math.sqrt(2 * TINY.n_layers)
    c_proj = torch.cat(
        [torch.cat([b.attn.c_proj.weight.flatten(), b.mlp.c_proj.weight.flatten()]) for b in model.layers]
    )
    assert abs(c_proj.std().item() - out_std) < 0.15 * out_std
    c_fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.layers])
    assert abs(c_fc.std().item() - 0.02) < 0.1 * 0.02
    assert abs(model.wte.weight.std().item() - 0.02) < 0.1 * 0.02
    assert all(torch.count_nonzero(b.attn.c_attn.bias) == 0 for b in model.layers)
    assert torch.equal(model.ln_f.weight, torch.ones(TINY.d_model))
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    assert torch.isfinite(model(x)).all()


def test_init_weights_is_complete():
    """Every parameter is overwritten by init_weights (garbage in -> GPT-2 init out)."""
    model = GPT(GPTConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % TINY.vocab_size
    lx, ly = model(x), model(y)
    torch.testing.assert_close(lx[:, :7], ly[:, :7], atol=0, rtol=0)
    assert (lx[:, 7:] - ly[:, 7:]).abs().max() > 1e-4


def test_tied_head_is_one_parameter_and_untied_is_two():
    tied = GPT(TINY)
    assert tied.lm_head.weight is tied.wte.weight
    assert len({id(p) for p in tied.parameters()}) == len(list(tied.parameters()))
    untied = GPT(GPTConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.wte.weight


def test_labels_path_equals_cross_entropy_on_logits():
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (3, 10))
    labels = torch.randint(0, TINY.vocab_size, (3, 10))
    labels[0, :4] = -100
    for smoothing in (0.0, 0.1):
        model.label_smoothing = smoothing
        model.loss_chunk_size = 7  # several chunks
        out = model(x, labels=labels)
        ref = F.cross_entropy(
            model(x).flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=smoothing
        )
        torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
        assert set(out.metrics) >= {"main_loss", "total_loss"}
        assert not out.metrics["main_loss"].requires_grad
    # gradients flow to every parameter (the tied head through wte)
    model.zero_grad()
    model(x, labels=labels).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_rms_norm_matches_float64_and_casts_back():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(4, 16, dtype=torch.float64) * 3
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), ref, atol=1e-6, rtol=1e-6)
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    hf = DeepseekV3RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    hf.weight.data.copy_(norm.weight.data)
    assert transformers is not None
    assert torch.equal(hf(x.bfloat16()), out)


def test_mlps():
    x = torch.randn(2, 5, 8)
    swiglu = SwiGLU(8, 12)
    swiglu.init_weights(std=0.5, out_std=0.1)
    ref = swiglu.down_proj(F.silu(swiglu.gate_proj(x)) * swiglu.up_proj(x))
    torch.testing.assert_close(swiglu(x), ref)
    assert abs(swiglu.down_proj.weight.std().item() - 0.1) < 0.03
    mlp = GELUMLP(8, 32, bias=True)
    h = mlp.c_fc(x)
    gelu_new = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h.pow(3))))
    torch.testing.assert_close(mlp(x), mlp.c_proj(gelu_new), atol=1e-6, rtol=1e-6)


def test_bad_config_is_rejected():
    from deepsuite.config.errors import ConfigError

    with pytest.raises(ConfigError, match="n_heads"):
        GPT(GPTConfig(d_model=30, n_heads=4))


def test_init_weights_reaches_wrapped_blocks():
    """parallel/ may wrap each element of model.layers (activation checkpointing, compile) before init."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    with torch.device("meta"):
        model = GPT(TINY)
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.layers[0]._checkpoint_wrapped_module.ln_1.weight, torch.ones(TINY.d_model))
    x = torch.randint(0, TINY.vocab_size, (2, 6))
    model(x).sum().backward()
    assert model.layers[1]._checkpoint_wrapped_module.mlp.c_fc.weight.grad is not None
