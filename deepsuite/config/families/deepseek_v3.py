"""DeepSeek-V3 model arguments, named flavors and parameter counting. Torch-free.

Field names follow DeepSeek's official inference code (``ModelArgs`` in ``inference/model.py``) where
it has one and spell the concept out otherwise; `hf_adapter` maps them to transformers'
``DeepseekV3Config`` names (``hidden_size``, ``n_group``, ``topk_group``, ``routed_scaling_factor``…).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deepsuite.config.errors import ConfigError


@dataclass
class DeepSeekV3Config:
    """Sizes and options of a DeepSeek-V3 decoder (MLA attention, DeepSeekMoE, multi-token prediction)."""

    vocab_size: int = 129280
    """Vocabulary size (DeepSeek-V3: 129280)."""

    d_model: int = 7168
    """Hidden size (HF `hidden_size`)."""

    n_layers: int = 61
    """Transformer blocks of the main model, MTP modules not included (HF `num_hidden_layers`)."""

    n_heads: int = 128
    """Attention heads (HF `num_attention_heads`)."""

    inter_dim: int = 18432
    """Hidden size of the dense SwiGLU FFN of the first `first_k_dense_replace` layers (HF `intermediate_size`)."""

    moe_inter_dim: int = 2048
    """Hidden size of one routed expert; a shared expert block has n_shared_experts × this (HF `moe_intermediate_size`)."""

    q_lora_rank: int = 1536
    """Rank of the query compression (wq_a → RMSNorm → wq_b); 0 = one uncompressed query projection (HF null)."""

    kv_lora_rank: int = 512
    """Rank of the joint key/value compression: the latent that the inference cache holds."""

    qk_nope_head_dim: int = 128
    """Per-head query/key dimension without rotary embedding."""

    qk_rope_head_dim: int = 64
    """Per-head query dimension (and the single shared key slice) that carries the rotary embedding."""

    v_head_dim: int = 128
    """Per-head value dimension."""

    n_routed_experts: int = 256
    """Routed experts per MoE layer."""

    n_shared_experts: int = 1
    """Shared experts per MoE layer (always active; one SwiGLU of n_shared_experts × moe_inter_dim)."""

    n_activated_experts: int = 8
    """Routed experts chosen per token, top-k (HF `num_experts_per_tok`)."""

    n_expert_groups: int = 8
    """Expert groups for group-limited routing (HF `n_group`); 1 = plain top-k."""

    n_limited_groups: int = 4
    """Groups a token may route to (HF `topk_group`); a group scores the sum of its top-2 experts."""

    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router scoring: `sigmoid` (DeepSeek-V3) or `softmax` (DeepSeek-V2)."""

    route_scale: float = 2.5
    """Factor on the routing weights after normalisation (HF `routed_scaling_factor`)."""

    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (DeepSeek-V3: true)."""

    first_k_dense_replace: int = 3
    """Number of leading layers with a dense SwiGLU instead of MoE."""

    mtp_depth: int = 1
    """Multi-token-prediction modules D (HF `num_nextn_predict_layers`); 0 = none."""

    max_seq_len: int = 163840
    """Longest sequence the model accepts (HF `max_position_embeddings`); sizes the RoPE tables."""

    rope_theta: float = 10000.0
    """RoPE base."""

    rope_scaling: Literal["none", "yarn"] = "yarn"
    """Rotary scaling: `none` or `yarn` (DeepSeek-V3: yarn)."""

    rope_factor: float = 40.0
    """YaRN scaling factor (context extension over `original_seq_len`)."""

    original_seq_len: int = 4096
    """YaRN: context length of pre-training (HF `original_max_position_embeddings`)."""

    beta_fast: float = 32.0
    """YaRN: rotations below which dimensions are interpolated fully (extrapolation boundary)."""

    beta_slow: float = 1.0
    """YaRN: rotations above which dimensions are left alone (interpolation boundary)."""

    mscale: float = 1.0
    """YaRN: `mscale` of the cos/sin attention factor (HF rope_parameters.mscale)."""

    mscale_all_dim: float = 1.0
    """YaRN: `mscale_all_dim`; the softmax scale is multiplied by (0.1·mscale_all_dim·ln(factor) + 1)²."""

    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    tie_embeddings: bool = False
    """Share the token embedding with the LM head (DeepSeek-V3: false)."""

    balance_loss_alpha: float = 0.0
    """α of the sequence-wise balance loss (V3 report eq. 17–20; DeepSeek-V3: 1e-4); 0 = off."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation (HF `initializer_range`)."""

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key dimension: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        """Main-model layers with an MoE FFN."""
        return max(self.n_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (MTP blocks continue the numbering) has an MoE FFN."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def softmax_scale(self) -> float:
        """Attention softmax scale: qk_head_dim^-0.5, times mscale² under YaRN (as transformers)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent field."""
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_seq_len",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        non_negative = (
            "q_lora_rank",
            "n_routed_experts",
            "n_shared_experts",
            "first_k_dense_replace",
            "mtp_depth",
            "inter_dim",
            "moe_inter_dim",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)"
            )
        if self.first_k_dense_replace > 0 and self.inter_dim <= 0:
            raise ConfigError(
                f"model.inter_dim={self.inter_dim} must be > 0 when model.first_k_dense_replace="
                f"{self.first_k_dense_replace} layers are dense"
            )
        if self.rope_scaling not in ("none", "yarn"):
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} must be 'none' or 'yarn'")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"model.score_func={self.score_func!r} must be 'sigmoid' or 'softmax'")
        if self.rope_scaling == "yarn":
            if self.rope_factor < 1.0:
                raise ConfigError(f"model.rope_factor={self.rope_factor} must be >= 1 with yarn")
            if self.original_seq_len <= 0:
                raise ConfigError(f"model.original_seq_len={self.original_seq_len} must be > 0 with yarn")
            # YaRN takes log(original_seq_len / (2π·beta)) and divides by yarn_mscale(...)
            for name in ("beta_fast", "beta_slow"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0 with yarn")
            for name in ("mscale", "mscale_all_dim"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0 with yarn, e.g. 1.0")
        if self.balance_loss_alpha < 0:
            raise ConfigError(f"model.balance_loss_alpha={self.balance_loss_alpha} must be >= 0")
        # torch refuses a negative std when it initialises; a negative epsilon makes RMSNorm NaN
        if self.init_std < 0:
            raise ConfigError(
                f"model.init_std={self.init_std} must be >= 0 (a standard deviation), e.g. 0.02"
            )
        if self.rms_norm_eps < 0:
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps} must be >= 0, e.g. 1e-06")
        if self.rope_theta <= 1:
            raise ConfigError(f"model.rope_theta={self.rope_theta} must be > 1 (the RoPE base), e.g. 10000.0")
        if self.n_routed_experts == 0 or self.first_k_dense_replace >= self.n_layers + self.mtp_depth:
            return  # no MoE layer: the routing fields are unused
        if self.moe_inter_dim <= 0:
            raise ConfigError(f"model.moe_inter_dim={self.moe_inter_dim} must be > 0 with routed experts")
        if self.route_scale <= 0:
            raise ConfigError(
                f"model.route_scale={self.route_scale} must be > 0 (it scales the routing weights), e.g. 1.0"
            )
        if self.n_expert_groups <= 0:
            raise ConfigError(f"model.n_expert_groups={self.n_expert_groups} must be >= 1")
        if self.n_routed_experts % self.n_expert_groups:
            raise ConfigError(
                f"model.n_expert_groups={self.n_expert_groups} does not divide "
                f"model.n_routed_experts={self.n_routed_experts}"
            )
        if not 1 <= self.n_limited_groups <= self.n_expert_groups:
            raise ConfigError(
                f"model.n_limited_groups={self.n_limited_groups} must be in [1, model.n_expert_groups="
                f"{self.n_expert_groups}]"
            )
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and self.score_func == "sigmoid" and per_group < 2:
            raise ConfigError(
                f"model.n_expert_groups={self.n_expert_groups} leaves {per_group} expert per group; a group "
                "scores the sum of its top-2 experts, so each group needs >= 2 (use fewer groups)"
            )
        reachable = per_group * self.n_limited_groups
        if not 1 <= self.n_activated_experts <= reachable:
            raise ConfigError(
                f"model.n_activated_experts={self.n_activated_experts} must be in [1, {reachable}] "
                f"(the experts in model.n_limited_groups={self.n_limited_groups} groups of {per_group})"
            )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1·mscale·ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def count_parameters(args: DeepSeekV3Config) -> dict[str, int]:
    """Parameter counts of `DeepSeekV3(args)` from the sizes alone (no torch, no allocation).

    Returns ``total`` (main model, MTP modules excluded, as DeepSeek reports 671B), ``activated``
    (per token: everything but the unchosen routed experts, embedding included), ``mtp`` (the MTP
    modules without the shared embedding/head), ``embedding``, ``head`` (0 when tied),
    ``routed_experts`` and ``total_with_mtp``. `tests/unit/test_deepseek_model.py` checks it
    equals the parameter count of the model built on the meta device.
    """
    d = args.d_model
    if args.q_lora_rank:
        q = d * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * args.n_heads * args.qk_head_dim
    else:
        q = d * args.n_heads * args.qk_head_dim
    kv = (
        d * (args.kv_lora_rank + args.qk_rope_head_dim)
        + args.kv_lora_rank
        + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)
    )
    attn = q + kv + args.n_heads * args.v_head_dim * d
    norms = 2 * d
    dense_ffn = 3 * d * args.inter_dim
    expert = 3 * d * args.moe_inter_dim
    shared = args.n_shared_experts * expert
    router = args.n_routed_experts * d  # the bias is a buffer
    moe_total = args.n_routed_experts * expert + shared + router
    moe_active = args.n_activated_experts * expert + shared + router

    def block(layer_idx: int) -> tuple[int, int, int]:
        if args.is_moe_layer(layer_idx):
            return attn + norms + moe_total, attn + norms + moe_active, args.n_routed_experts * expert
        return attn + norms + dense_ffn, attn + norms + dense_ffn, 0

    embedding = args.vocab_size * d
    head = 0 if args.tie_embeddings else args.vocab_size * d
    total = embedding + head + d  # + final norm
    activated = total
    routed = 0
    for i in range(args.n_layers):
        t, a, r = block(i)
        total, activated, routed = total + t, activated + a, routed + r
    mtp = 0
    for k in range(args.mtp_depth):
        t, _, _ = block(args.n_layers + k)
        mtp += t + 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, shared_head norm
    return {
        "total": total,
        "activated": activated,
        "mtp": mtp,
        "total_with_mtp": total + mtp,
        "embedding": embedding,
        "head": head,
        "routed_experts": routed,
    }


_NO_YARN = dict(rope_scaling="none")

FLAVORS: dict[str, DeepSeekV3Config] = {
    # Tiny but complete (MLA with q compression, dense first layer, grouped routing, shared expert,
    # MTP): `make train` trains it on CPU in minutes.
    "deepseek-v3-debug": DeepSeekV3Config(
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        inter_dim=384,
        moe_inter_dim=64,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        route_scale=1.0,
        first_k_dense_replace=1,
        mtp_depth=1,
        max_seq_len=512,
        **_NO_YARN,  # type: ignore[arg-type]
    ),
    # Seed-004 sizes (d_model, n_layers, n_heads); the rest scaled from V3's ratios (nope = rope · 2,
    # kv_lora = 4 · head, 16 experts of d/2, top-2 of 4 groups keep 2). Counts in the report.
    "deepseek-v3-small": DeepSeekV3Config(
        vocab_size=32000,
        d_model=512,
        n_layers=6,
        n_heads=8,
        inter_dim=1536,
        moe_inter_dim=256,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        first_k_dense_replace=1,
        mtp_depth=1,
        max_seq_len=2048,
        **_NO_YARN,  # type: ignore[arg-type]
    ),
    "deepseek-v3-base": DeepSeekV3Config(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        inter_dim=2048,
        moe_inter_dim=384,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        first_k_dense_replace=1,
        mtp_depth=1,
        max_seq_len=2048,
        **_NO_YARN,  # type: ignore[arg-type]
    ),
    "deepseek-v3-large": DeepSeekV3Config(
        vocab_size=32000,
        d_model=1024,
        n_layers=24,
        n_heads=16,
        inter_dim=2816,
        moe_inter_dim=512,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        first_k_dense_replace=1,
        mtp_depth=1,
        max_seq_len=4096,
        **_NO_YARN,  # type: ignore[arg-type]
    ),
    "deepseek-v3-xl": DeepSeekV3Config(
        vocab_size=32000,
        d_model=2048,
        n_layers=24,
        n_heads=32,
        inter_dim=5632,
        moe_inter_dim=768,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=8,
        n_limited_groups=4,
        route_scale=2.5,
        first_k_dense_replace=1,
        mtp_depth=1,
        max_seq_len=4096,
        **_NO_YARN,  # type: ignore[arg-type]
    ),
    # deepseek-ai/DeepSeek-V2-Lite config.json (15.7B total, 2.4B activated): softmax routing, no
    # q compression, one group, no MTP.
    "deepseek-v2-lite": DeepSeekV3Config(
        vocab_size=102400,
        d_model=2048,
        n_layers=27,
        n_heads=16,
        inter_dim=10944,
        moe_inter_dim=1408,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=1,
        n_limited_groups=1,
        score_func="softmax",
        route_scale=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=1,
        mtp_depth=0,
        max_seq_len=163840,
        rope_scaling="yarn",
        rope_factor=40.0,
        original_seq_len=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
    # deepseek-ai/DeepSeek-V3 config.json (arXiv 2412.19437): 671B total, 37B activated, + 1 MTP module.
    "deepseek-v3-671b": DeepSeekV3Config(),
}
