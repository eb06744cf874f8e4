"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on the same random weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deepsuite.models.deepseek_v3 import hf_adapter  # noqa: E402
from deepsuite.models.deepseek_v3.config import DeepSeekV3Config  # noqa: E402
from deepsuite.models.deepseek_v3.model import DeepSeekV3  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    max_position_embeddings=128,
    routed_scaling_factor=1.0,
)

CONFIGS = {
    "plain": {},
    "q_lora_yarn_groups": dict(
        q_lora_rank=24, rope_parameters=YARN, n_group=4, topk_group=2, routed_scaling_factor=2.5
    ),
    "all_moe_two_shared": dict(
        first_k_dense_replace=0, n_shared_experts=2, num_experts_per_tok=3, n_group=2, topk_group=1
    ),
    "two_dense_yarn_mscale": dict(
        first_k_dense_replace=2,
        num_hidden_layers=4,
        rope_parameters={**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707},
        q_lora_rank=20,
        norm_topk_prob=False,
        n_group=4,
        topk_group=3,
        num_experts_per_tok=4,
    ),
}


def random_hf_model(overrides: dict[str, Any], seed: int = 0) -> Any:
    """A tiny random DeepseekV3ForCausalLM with non-trivial norms and a nonzero router bias."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**BASE, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))  # large enough to change some choices
    return model


def to_deepsuite(hf_model: Any, mtp_depth: int = 0) -> DeepSeekV3:
    args = hf_adapter.config_from_hf(hf_model.config.to_dict())
    args.mtp_depth = mtp_depth
    with torch.device("meta"):
        model = DeepSeekV3(args)
    model = model.to_empty(device="cpu")
    model.init_weights()  # MTP modules (absent from transformers' model) stay randomly initialised
    sd = hf_adapter.state_dict_from_hf(hf_model.state_dict(), dataclasses.replace(args))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("mtp.") for k in missing)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str) -> None:
    hf = random_hf_model(CONFIGS[name])
    ours = to_deepsuite(hf)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert isinstance(got, torch.Tensor)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bias_changes_routing_in_the_parity_setup() -> None:
    """The parity configs exercise the bias: zeroing it changes the logits."""
    hf = random_hf_model(CONFIGS["q_lora_yarn_groups"])
    ours = to_deepsuite(hf)
    ids = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = ours(ids)
        for _, moe in ours.moe_layers():
            moe.e_score_correction_bias.zero_()
        after = ours(ids)
    assert isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
    assert (before - after).abs().max() > 1e-3


def test_gradients_match_transformers() -> None:
    hf = random_hf_model(CONFIGS["q_lora_yarn_groups"])
    hf.train()
    ours = to_deepsuite(hf).train()
    ids = torch.randint(0, BASE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    hf(ids).logits.square().mean().backward()
    out = ours(ids)
    assert isinstance(out, torch.Tensor)
    out.square().mean().backward()
    grads = hf_adapter.state_dict_from_hf({n: p.grad for n, p in hf.named_parameters()}, ours.args)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _with_mtp_keys(hf_sd: dict[str, torch.Tensor], args: DeepSeekV3Config) -> dict[str, torch.Tensor]:
    """Add DeepSeek-style MTP weights at layer index num_hidden_layers (as the official checkpoints)."""
    n = args.n_layers
    layer = {
        k.removeprefix(f"model.layers.{n - 1}."): v
        for k, v in hf_sd.items()
        if k.startswith(f"model.layers.{n - 1}.")
    }
    gen = torch.Generator().manual_seed(5)
    out = dict(hf_sd)
    for sub, t in layer.items():
        out[f"model.layers.{n}.{sub}"] = torch.randn(t.shape, generator=gen)
    d = args.d_model
    out[f"model.layers.{n}.enorm.weight"] = torch.randn(d, generator=gen)
    out[f"model.layers.{n}.hnorm.weight"] = torch.randn(d, generator=gen)
    out[f"model.layers.{n}.eh_proj.weight"] = torch.randn(d, 2 * d, generator=gen)
    out[f"model.layers.{n}.shared_head.norm.weight"] = torch.randn(d, generator=gen)
    out[f"model.layers.{n}.embed_tokens.weight"] = hf_sd["model.embed_tokens.weight"]
    out[f"model.layers.{n}.shared_head.head.weight"] = hf_sd["lm_head.weight"]
    return out


def test_hf_roundtrip_is_bitwise_with_mtp_weights(tmp_path: Any) -> None:
    hf = random_hf_model(CONFIGS["q_lora_yarn_groups"])
    hf.save_pretrained(tmp_path)  # transformers 5 writes per-expert keys
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in on_disk)
    args = hf_adapter.config_from_hf(hf.config.to_dict())
    assert args.mtp_depth == 1
    on_disk = _with_mtp_keys(on_disk, args)
    sd = hf_adapter.state_dict_from_hf(on_disk, args)
    with torch.device("meta"):
        model = DeepSeekV3(args)
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    back = hf_adapter.state_dict_to_hf(model.state_dict(), args)
    assert sorted(back) == sorted(on_disk)
    for key, t in on_disk.items():
        assert torch.equal(back[key], t), key
    assert torch.equal(model.mtp[0].eh_proj.weight, on_disk[f"model.layers.{args.n_layers}.eh_proj.weight"])


def test_config_roundtrip_and_transformers_reads_ours() -> None:
    hf = random_hf_model(CONFIGS["two_dense_yarn_mscale"])
    args = hf_adapter.config_from_hf(hf.config.to_dict())
    again = hf_adapter.config_from_hf(hf_adapter.config_to_hf(args))
    assert again == args
    config = transformers.DeepseekV3Config(**hf_adapter.config_to_hf(args))
    rebuilt = transformers.DeepseekV3ForCausalLM(config).eval()
    ours = to_deepsuite(hf)
    hf_sd = hf_adapter.state_dict_to_hf(ours.state_dict(), ours.args)
    stacked = {k: v for k, v in hf_sd.items() if ".experts." not in k}
    for i in range(args.first_k_dense_replace, args.n_layers):  # transformers' in-memory expert layout
        p = f"model.layers.{i}.mlp.experts"
        e = range(args.n_routed_experts)
        stacked[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([hf_sd[f"{p}.{j}.gate_proj.weight"], hf_sd[f"{p}.{j}.up_proj.weight"]]) for j in e]
        )
        stacked[f"{p}.down_proj"] = torch.stack([hf_sd[f"{p}.{j}.down_proj.weight"] for j in e])
    rebuilt.load_state_dict(stacked, strict=True)
    ids = torch.randint(0, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_load_hf_reads_a_transformers_folder(tmp_path: Any) -> None:
    from deepsuite.models import load_hf

    hf = random_hf_model(CONFIGS["q_lora_yarn_groups"])
    hf.save_pretrained(tmp_path)  # num_nextn_predict_layers=1 but no MTP weights
    ours = load_hf(tmp_path).eval()
    assert ours.args.mtp_depth == 0
    ids = torch.randint(0, BASE["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_save_hf_is_read_by_transformers_and_keeps_mtp(tmp_path: Any) -> None:
    from deepsuite.models import load_hf, save_hf

    hf = random_hf_model(CONFIGS["all_moe_two_shared"])
    ours = to_deepsuite(hf, mtp_depth=1)
    with torch.no_grad():
        ours.mtp[0].eh_proj.weight.normal_()
    save_hf(ours, tmp_path)
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids), atol=1e-4, rtol=0)
    reloaded = load_hf(tmp_path)
    assert reloaded.args == ours.args
    for (name, a), b in zip(ours.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_mtp_module_equals_transformers_mtp_layer() -> None:
    """Our MTP module on the same weights as transformers' `MtpModel` layer (enorm/hnorm order,
    eh_proj, block, shared_head.norm = post_norm): same h^1."""
    from transformers.modeling_layers import MtpModel

    hf = random_hf_model(CONFIGS["q_lora_yarn_groups"])
    ours = to_deepsuite(hf, mtp_depth=1)
    with torch.no_grad():
        for name, p in ours.mtp.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.25)
        ours.mtp[0].block.ffn.e_score_correction_bias.normal_(0.0, 0.2)
    sd = {}
    for key, t in ours.mtp.state_dict().items():
        key = key.removeprefix("0.")
        if key == "norm.weight":
            sd["layers.0.post_norm.weight"] = t
        elif key.startswith("block."):
            sub = key.removeprefix("block.")
            sd[
                "layers.0.mtp_block."
                + hf_adapter._BLOCK.get(sub, sub.replace("ffn.experts.", "mlp.experts."))
            ] = t
        else:
            sd["layers.0." + key] = t
    mtp = MtpModel(hf, 1).eval()
    missing, unexpected = mtp.load_state_dict(sd, strict=False)
    assert not unexpected and sorted(missing) == [
        "embed_tokens.weight",
        "shared_head.weight",
    ]  # shared with hf
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = ours.hidden_states(ids)
        got = ours.mtp_hidden_states(1, h[:, :11], ids[:, 1:])  # h_i with Emb(t_{i+1})
        # transformers places module 1 at the positions of the embedded tokens (RoPE is relative)
        expected = mtp.forward_layer(0, h[:, :11], torch.arange(1, 12)[None], None, input_ids=ids[:, 1:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_yarn_attention_factor_is_checked() -> None:
    """An explicit ``attention_factor`` (transformers uses it instead of the mscale-derived one) is
    accepted when it equals what mscale implies and refused otherwise (it would change the logits)."""
    from deepsuite.config import ConfigError
    from deepsuite.layers.attention.rope import yarn_get_mscale

    rope = {**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    implied = yarn_get_mscale(8.0, 0.707) / yarn_get_mscale(8.0, 0.707)
    config = {**BASE, "rope_parameters": {**rope, "attention_factor": implied}}
    assert hf_adapter.config_from_hf(config).rope_factor == 8.0
    with pytest.raises(ConfigError, match=r"attention_factor=1\.5 differs"):
        hf_adapter.config_from_hf({**BASE, "rope_parameters": {**rope, "attention_factor": 1.5}})
