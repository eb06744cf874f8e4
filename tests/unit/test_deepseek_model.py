"""DeepSeek-V3 model: flavors and counting, losses with MTP, latent-cache and speculative generation."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from deepsuite.config.errors import ConfigError
from deepsuite.generation.latent_cache import LatentKVCache
from deepsuite.layers.attention.rope import apply_rotary
from deepsuite.layers.moe import DeepSeekMoE
from deepsuite.models.deepseek_v3.config import FLAVORS, DeepSeekV3Config, count_parameters
from deepsuite.models.deepseek_v3.model import DeepSeekV3
from deepsuite.models.outputs import LMOutput

TINY = dataclasses.replace(
    FLAVORS["deepseek-v3-debug"],
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=2,
    inter_dim=48,
    moe_inter_dim=16,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_seq_len=64,
)


def tiny_model(seed: int = 0, **overrides: object) -> DeepSeekV3:
    torch.manual_seed(seed)
    args = dataclasses.replace(TINY, **overrides)  # type: ignore[arg-type]
    model = DeepSeekV3(args)
    model.init_weights()
    with torch.no_grad():  # larger weights than init_std so that argmax decisions are well separated
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        for _, moe in model.moe_layers():
            moe.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


# ----------------------------------------------------------------------------- flavors / counting


def test_671b_on_meta_counts_as_published() -> None:
    start = time.perf_counter()
    args = FLAVORS["deepseek-v3-671b"]
    with torch.device("meta"):
        model = DeepSeekV3(args)
    built = sum(p.numel() for p in model.parameters())
    elapsed = time.perf_counter() - start
    counts = count_parameters(args)
    assert built == counts["total_with_mtp"]
    assert counts["total"] == pytest.approx(671e9, rel=0.01)
    mtp_params = sum(p.numel() for p in model.mtp.parameters())
    assert built - mtp_params == counts["total"]
    # per token: attention, dense FFNs, shared + 8 routed experts, router, norms, embedding and head:
    # 37.55B (DeepSeek's rounded "37B" is 1.5% lower; 36.63B without the input embedding lookup)
    assert counts["activated"] == pytest.approx(37e9, rel=0.016)
    assert counts["activated"] - counts["embedding"] == pytest.approx(37e9, rel=0.011)
    assert elapsed < 10.0
    assert model.layers[0].attn.wq_b.weight.shape == (128 * 192, 1536)
    assert model.layers[3].ffn.experts.gate_up_proj.shape == (256, 4096, 7168)


@pytest.mark.parametrize("flavor", [f for f in FLAVORS if f != "deepseek-v3-671b"])
def test_count_parameters_equals_meta_build(flavor: str) -> None:
    args = FLAVORS[flavor]
    args.validate()
    with torch.device("meta"):
        model = DeepSeekV3(args)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(args)["total_with_mtp"]


def test_activated_count_matches_a_forward_trace() -> None:
    """`activated` = the parameters a single token touches: count them from a real forward."""
    model = tiny_model(mtp_depth=0)
    touched: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, DeepSeekMoE):

            def hook(mod: DeepSeekMoE, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                _, idx, _ = mod.gate(inputs[0].reshape(-1, inputs[0].shape[-1]))
                touched.update(f"{name}:{e}" for e in idx.flatten().tolist())

            module.register_forward_hook(hook)
    model(torch.tensor([[3]]))
    expert = 3 * TINY.d_model * TINY.moe_inter_dim
    all_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    expected = sum(p.numel() for p in model.parameters()) - all_experts + len(touched) * expert
    assert count_parameters(model.args)["activated"] == expected


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_expert_groups", 3, "model.n_expert_groups=3 does not divide"),
        ("n_limited_groups", 3, "model.n_limited_groups=3"),
        ("n_activated_experts", 5, "model.n_activated_experts=5"),
        ("qk_rope_head_dim", 5, "model.qk_rope_head_dim"),
        ("score_func", "relu", "model.score_func"),
        ("d_model", 0, "model.d_model"),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object, message: str) -> None:
    args = dataclasses.replace(FLAVORS["deepseek-v3-debug"], **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        args.validate()


def test_meta_build_then_init_weights_fills_everything() -> None:
    with torch.device("meta"):
        model = DeepSeekV3(TINY)
    model = model.to_empty(device="cpu")
    for t in (*model.parameters(), *model.buffers()):
        t.data.fill_(float("nan"))
    model.init_weights()
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert torch.isfinite(t).all(), name
    reference = DeepSeekV3(TINY)
    torch.testing.assert_close(model.rope.cos, reference.rope.cos)


# ----------------------------------------------------------------------------- losses


def test_loss_is_main_plus_lambda_mtp_by_definition() -> None:
    model = tiny_model(mtp_depth=2).train()
    model.mtp_lambda = 0.25
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    assert isinstance(out, LMOutput)

    def ce(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.lm_head(h).flatten(0, 1), y.flatten(), ignore_index=-100)

    h = model.hidden_states(ids)
    main = ce(h, labels)
    rope = model.rope.cos_sin(0, 11)
    h1 = model.mtp[0](h[:, :11], model.embed(ids[:, 1:]), rope)  # Emb(t_{i+1}) predicts t_{i+2}
    mtp1 = ce(h1, labels[:, 1:])
    h2 = model.mtp[1](h1[:, :10], model.embed(ids[:, 2:]), model.rope.cos_sin(0, 10))
    mtp2 = ce(h2, labels[:, 2:])
    torch.testing.assert_close(out.metrics["main_loss"], main.detach())
    torch.testing.assert_close(out.metrics["mtp_loss_1"], mtp1.detach())
    torch.testing.assert_close(out.metrics["mtp_loss_2"], mtp2.detach())
    torch.testing.assert_close(out.loss, main + 0.25 * (mtp1 + mtp2) / 2)
    torch.testing.assert_close(out.metrics["total_loss"], out.loss.detach())
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad is not None
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_balance_loss_is_added_in_training_only() -> None:
    model = tiny_model(balance_loss_alpha=0.01).train()
    ids = torch.randint(0, TINY.vocab_size, (2, 10))
    out = model(ids, labels=ids)
    assert isinstance(out, LMOutput)
    assert out.metrics["balance_loss"] > 0
    expected = (
        out.metrics["main_loss"] + model.mtp_lambda * out.metrics["mtp_loss_1"] + out.metrics["balance_loss"]
    )
    torch.testing.assert_close(out.loss.detach(), expected)
    counts = sum(m.tokens_per_expert.sum() for _, m in model.moe_layers())
    n_moe = len(model.moe_layers())
    # main layers see 20 tokens, the MTP block 18; each token goes to top-k experts
    assert counts == TINY.n_activated_experts * (20 * (n_moe - 1) + 18)
    model.eval()
    out = model(ids, labels=ids)
    assert isinstance(out, LMOutput)
    assert "balance_loss" not in out.metrics


def test_bf16_cast_keeps_router_bias_fp32() -> None:
    model = tiny_model().to(torch.bfloat16)
    for _, moe in model.moe_layers():
        assert moe.e_score_correction_bias.dtype == torch.float32
        assert moe.tokens_per_expert.dtype == torch.float32
    logits = model(torch.tensor([[1, 2, 3]]))
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- generation


def _greedy_without_cache(model: DeepSeekV3, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        logits = model(ids)
        assert isinstance(logits, torch.Tensor)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_latent_cache_generation_equals_no_cache() -> None:
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _greedy_without_cache(model, prompt, 20)
    got = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(got, expected)


def test_cache_holds_only_latent_and_rotated_key() -> None:
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    cache = model.new_cache(2, 16)
    assert isinstance(cache, LatentKVCache)
    with torch.no_grad():
        model(ids, cache=cache, start_pos=0)
        # layer 0's latent: RMSNorm(wkv_a(attn_norm(embed)))[:C] and RoPE(k_pe)
        attn = model.layers[0].attn
        x = model.layers[0].attn_norm(model.embed(ids))
        kv, pe = attn.wkv_a(x).split([TINY.kv_lora_rank, TINY.qk_rope_head_dim], dim=-1)
        cos, sin = model.rope.cos_sin(0, 7)
        torch.testing.assert_close(cache.kv[0][:, :7], attn.kv_norm(kv))
        torch.testing.assert_close(cache.pe[0][:, :7], apply_rotary(pe, cos, sin))
    per_token = {t.shape[-1] for t in cache.kv} | {t.shape[-1] + 100 for t in cache.pe}
    assert per_token == {TINY.kv_lora_rank, TINY.qk_rope_head_dim + 100}
    assert cache.values_per_token() == TINY.kv_lora_rank + TINY.qk_rope_head_dim
    # main layers + the MTP block, 2 sequences × 16 positions, nothing else
    n_values = sum(t.numel() for t in (*cache.kv, *cache.pe))
    assert n_values == (TINY.n_layers + TINY.mtp_depth) * 2 * 16 * (TINY.kv_lora_rank + TINY.qk_rope_head_dim)


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_equals_greedy(seed: int) -> None:
    model = tiny_model(seed)
    prompt = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    plain = model.generate(prompt, max_new_tokens=20, temperature=0)
    spec = model.generate(prompt, max_new_tokens=20, temperature=0, speculative=True)
    assert torch.equal(spec, plain)
    stats = model.last_generation_stats
    assert stats["new_tokens"] == 20
    assert 0 < stats["drafted"] <= 20
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    # 1 token from the prompt pass, then 2 per accepted draft and 1 per rejected one (the last
    # accepted pair may be cut to fit max_new_tokens)
    assert stats["main_passes"] in (20 - 1 - stats["accepted"], 20 - stats["accepted"])


def test_speculative_accepts_a_perfect_drafter() -> None:
    """An MTP module that reproduces the main model's next-next token is always accepted."""
    model = tiny_model(4, n_layers=1, first_k_dense_replace=1)
    with torch.no_grad():  # all logits 0: main model and drafter both predict token 0 (first argmax)
        model.lm_head.weight.zero_()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = _greedy_without_cache(model, prompt, 9)
    got = model.generate(prompt, max_new_tokens=9, temperature=0, speculative=True)
    assert torch.equal(got, expected)
    assert got[0, 3:].eq(0).all()
    assert model.last_generation_stats["acceptance_rate"] == 1.0


def test_speculative_stops_at_eos_like_plain_generation() -> None:
    model = tiny_model(2)
    prompt = torch.randint(0, TINY.vocab_size, (1, 4), generator=torch.Generator().manual_seed(9))
    plain = model.generate(prompt, max_new_tokens=25, temperature=0)
    eos = int(plain[0, 10])
    plain_eos = model.generate(prompt, max_new_tokens=25, temperature=0, eos_token_id=eos)
    spec = model.generate(prompt, max_new_tokens=25, temperature=0, eos_token_id=eos, speculative=True)
    assert torch.equal(spec, plain_eos)


def test_speculative_needs_greedy_and_mtp() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(torch.tensor([[1]]), 3, temperature=1.0, speculative=True)
    no_mtp = tiny_model(mtp_depth=0)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        no_mtp.generate(torch.tensor([[1]]), 3, temperature=0, speculative=True)


def test_deepseek_config_is_torch_free() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import deepsuite.models.deepseek_v3.config as c; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(c.count_parameters(c.FLAVORS['deepseek-v3-671b'])['total'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == count_parameters(DeepSeekV3Config())["total"]
