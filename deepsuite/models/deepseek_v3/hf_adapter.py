"""transformers ``DeepseekV3ForCausalLM`` checkpoints <-> deepsuite `DeepSeekV3` (pure functions).

On disk (DeepSeek's release, and what transformers 5 writes) routed experts are per-expert keys
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``; transformers' in-memory layout
(``experts.gate_up_proj`` ``[E, 2I, D]``, ``experts.down_proj`` ``[E, D, I]``) is read as well.
The MTP modules live at layer indices ``num_hidden_layers + k`` as in DeepSeek's checkpoints
(``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, the block's usual keys, plus
``embed_tokens`` / ``shared_head.head`` copies of the shared embedding and head); transformers'
``DeepseekV3ForCausalLM`` ignores them, its ``MtpModel`` reads them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deepsuite.config.errors import ConfigError
from deepsuite.layers.attention.rope import yarn_get_mscale
from deepsuite.models.deepseek_v3.config import DeepSeekV3Config

# deepsuite name inside a block -> HF name inside `model.layers.{i}`
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK.items()}
_MTP = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
_MTP_FROM_HF = {v: k for k, v in _MTP.items()}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def config_to_hf(args: DeepSeekV3Config) -> dict[str, Any]:
    """transformers ``DeepseekV3Config`` fields (config.json) for ``args``."""
    if args.score_func != "sigmoid":
        raise ConfigError(
            "model.score_func='softmax' (DeepSeek-V2 routing) has no DeepseekV3 equivalent in transformers; "
            "export a sigmoid-routed model"
        )
    rope: dict[str, Any] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.rope_scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=args.rope_factor,
            original_max_position_embeddings=args.original_seq_len,
            beta_fast=args.beta_fast,
            beta_slow=args.beta_slow,
            mscale=args.mscale,
            mscale_all_dim=args.mscale_all_dim,
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts,
        "n_routed_experts": args.n_routed_experts,
        "routed_scaling_factor": args.route_scale,
        "kv_lora_rank": args.kv_lora_rank,
        "q_lora_rank": args.q_lora_rank or None,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "v_head_dim": args.v_head_dim,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "num_experts_per_tok": args.n_activated_experts,
        "first_k_dense_replace": args.first_k_dense_replace,
        "norm_topk_prob": args.norm_topk_prob,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.rms_norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": args.mtp_depth,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    }


def _yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The cos/sin factor deepsuite's YaRN RoPE applies (`RotaryPositionEmbedding.attention_factor`)."""
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def config_from_hf(config: dict[str, Any]) -> DeepSeekV3Config:
    """`DeepSeekV3Config` from a transformers / DeepSeek config.json dict."""
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={config['hidden_act']!r} is not supported (DeepSeek-V3 uses silu)")
    if config.get("attention_bias"):
        raise ConfigError("attention_bias=true is not supported (DeepSeek-V3 has no attention biases)")
    if config.get("rope_interleave") is False:
        raise ConfigError(
            "rope_interleave=false is not supported (deepsuite uses DeepSeek's interleaved RoPE)"
        )
    heads = config.get("num_attention_heads", 128)
    if config.get("num_key_value_heads") not in (None, heads):
        raise ConfigError("num_key_value_heads != num_attention_heads is not an MLA layout")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope_type={rope_type!r} is not supported (default or yarn)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    max_pos = config.get("max_position_embeddings", 4096)
    yarn: dict[str, Any] = {"rope_scaling": "none"}
    if rope_type == "yarn":
        original = rope.get("original_max_position_embeddings", 4096)
        factor = rope.get("factor") or max_pos / original
        yarn = dict(
            rope_scaling="yarn",
            rope_factor=float(factor),
            original_seq_len=int(original),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0.0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
        explicit = rope.get("attention_factor")
        if explicit is not None:
            implied = _yarn_attention_factor(
                float(factor),
                yarn["mscale"],
                yarn["mscale_all_dim"],  # type: ignore[arg-type]
            )
            if abs(float(explicit) - implied) > 1e-6 * max(1.0, implied):
                raise ConfigError(
                    f"rope_parameters.attention_factor={explicit} differs from the factor mscale/mscale_all_dim "
                    f"imply ({implied:.6g}); deepsuite derives it from mscale as DeepSeek-V3 does: remove the key "
                    "or set mscale/mscale_all_dim to match"
                )
    mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0))
    args = DeepSeekV3Config(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        inter_dim=config["intermediate_size"],
        moe_inter_dim=config["moe_intermediate_size"],
        q_lora_rank=config.get("q_lora_rank") or 0,
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
        n_routed_experts=config["n_routed_experts"],
        n_shared_experts=config.get("n_shared_experts") or 0,
        n_activated_experts=config["num_experts_per_tok"],
        n_expert_groups=config.get("n_group") or 1,
        n_limited_groups=config.get("topk_group") or 1,
        score_func=config.get("scoring_func", "sigmoid"),
        route_scale=float(config.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        first_k_dense_replace=config.get("first_k_dense_replace") or 0,
        mtp_depth=int(mtp or 0),
        max_seq_len=max_pos,
        rope_theta=float(theta),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
        **yarn,
    )
    args.validate()
    return args


def has_mtp_weights(sd: dict[str, torch.Tensor], args: DeepSeekV3Config) -> bool:
    """Whether ``sd`` (HF names) holds the MTP modules (transformers' own saves do not)."""
    prefix = f"model.layers.{args.n_layers}."
    return any(k.startswith(prefix) for k in sd)


def _block_to_hf(
    sub: str, t: torch.Tensor, args: DeepSeekV3Config, out: dict[str, torch.Tensor], prefix: str
) -> None:
    inter = args.moe_inter_dim
    if sub == "ffn.experts.gate_up_proj":
        for e in range(t.shape[0]):
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
    elif sub == "ffn.experts.down_proj":
        for e in range(t.shape[0]):
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e].clone()
    elif sub in _BLOCK:
        out[prefix + _BLOCK[sub]] = t
    else:
        raise KeyError(f"no HF name for block parameter {sub!r}")


def state_dict_to_hf(sd: dict[str, torch.Tensor], args: DeepSeekV3Config) -> dict[str, torch.Tensor]:
    """deepsuite state dict -> HF/DeepSeek on-disk names (per-expert keys, MTP at layer n_layers + k)."""
    out: dict[str, torch.Tensor] = {}
    n = args.n_layers
    for key, t in sd.items():
        if key == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "norm.weight":
            out["model.norm.weight"] = t
        elif key == "lm_head.weight":
            if not args.tie_embeddings:
                out["lm_head.weight"] = t
        elif m := re.match(r"^layers\.(\d+)\.(.+)$", key):
            _block_to_hf(m.group(2), t, args, out, f"model.layers.{m.group(1)}.")
        elif m := re.match(r"^mtp\.(\d+)\.(.+)$", key):
            prefix = f"model.layers.{n + int(m.group(1))}."
            sub = m.group(2)
            if sub.startswith("block."):
                _block_to_hf(sub.removeprefix("block."), t, args, out, prefix)
            elif sub in _MTP:
                out[prefix + _MTP[sub]] = t
            else:
                raise KeyError(f"no HF name for MTP parameter {key!r}")
        else:
            raise KeyError(f"no HF name for parameter {key!r}")
    # DeepSeek's checkpoints repeat the shared embedding and head inside each MTP layer. They are
    # copies with storage of their own, so that the writer stores them as real tensors (readers other
    # than deepsuite, e.g. vLLM, look them up by name); `state_dict_from_hf` skips them again, the
    # MTP modules use the model's one embedding and head.
    embed = sd["embed.weight"]
    head = sd["embed.weight"] if args.tie_embeddings else sd["lm_head.weight"]
    for k in sorted({int(key.split(".")[1]) for key in sd if key.startswith("mtp.")}):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = embed.detach().clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = head.detach().clone()
    return out


def _block_from_hf(
    sub: str,
    t: torch.Tensor,
    out: dict[str, torch.Tensor],
    experts: dict[str, dict[int, dict[str, torch.Tensor]]],
    prefix: str,
) -> None:
    if m := _EXPERT.match(sub):
        experts.setdefault(prefix, {}).setdefault(int(m.group(1)), {})[m.group(2)] = t
    elif sub == "mlp.experts.gate_up_proj":
        out[prefix + "ffn.experts.gate_up_proj"] = t
    elif sub == "mlp.experts.down_proj":
        out[prefix + "ffn.experts.down_proj"] = t
    elif sub in _BLOCK_FROM_HF:
        out[prefix + _BLOCK_FROM_HF[sub]] = t
    else:
        raise KeyError(f"unknown DeepSeek-V3 weight {sub!r} (under {prefix!r})")


def mtp_layers_present(sd: dict[str, torch.Tensor], args: DeepSeekV3Config) -> int:
    """How many MTP modules ``sd`` (HF names) holds: consecutive layer indices from ``n_layers``."""
    present = {int(m.group(1)) for k in sd if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
    depth = 0
    while args.n_layers + depth in present:
        depth += 1
    return depth


def state_dict_from_hf(sd: dict[str, torch.Tensor], args: DeepSeekV3Config) -> dict[str, torch.Tensor]:
    """HF/DeepSeek names (per-expert or stacked experts) -> deepsuite state dict.

    transformers' own ``save_pretrained`` writes ``num_nextn_predict_layers: 1`` but no MTP weights;
    when ``sd`` holds fewer MTP modules than ``args.mtp_depth`` asks for, ``args.mtp_depth`` is
    lowered in place to what is there (``load_hf`` builds the model from ``args`` afterwards), so
    such folders load as models without MTP instead of failing on missing keys.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    n = args.n_layers
    args.mtp_depth = min(args.mtp_depth, mtp_layers_present(sd, args))
    for key, t in sd.items():
        if key == "model.embed_tokens.weight":
            out["embed.weight"] = t
        elif key == "model.norm.weight":
            out["norm.weight"] = t
        elif key == "lm_head.weight":
            if not args.tie_embeddings:
                out["lm_head.weight"] = t
        elif m := re.match(r"^model\.layers\.(\d+)\.(.+)$", key):
            idx, sub = int(m.group(1)), m.group(2)
            if idx < n:
                _block_from_hf(sub, t, out, experts, f"layers.{idx}.")
            elif idx < n + args.mtp_depth:
                prefix = f"mtp.{idx - n}."
                if sub in ("embed_tokens.weight", "shared_head.head.weight"):
                    continue  # copies of the shared embedding / head
                if sub in _MTP_FROM_HF:
                    out[prefix + _MTP_FROM_HF[sub]] = t
                else:
                    _block_from_hf(sub, t, out, experts, prefix + "block.")
            # layers beyond the MTP depth the config asks for are dropped (as transformers does)
        elif key.endswith("weight_scale_inv"):
            raise ConfigError(
                f"{key}: FP8 block-quantised checkpoints must be dequantised to bf16 first "
                "(DeepSeek's inference/fp8_cast_bf16.py)"
            )
        else:
            raise KeyError(f"unknown DeepSeek-V3 weight {key!r}")
    for prefix, per_expert in experts.items():
        if sorted(per_expert) != list(range(args.n_routed_experts)):
            raise KeyError(
                f"{prefix}: expected experts 0..{args.n_routed_experts - 1}, found {sorted(per_expert)}"
            )
        gate_up = [
            torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]], 0) for e in sorted(per_expert)
        ]
        out[prefix + "ffn.experts.gate_up_proj"] = torch.stack(gate_up)
        out[prefix + "ffn.experts.down_proj"] = torch.stack(
            [per_expert[e]["down_proj"] for e in sorted(per_expert)]
        )
    return out
