"""DeepSeek-V3: MLA attention, DeepSeekMoE feed-forward, multi-token prediction (arXiv 2412.19437).

Reads like the report::

    x = embed(ids)
    for block in layers:                     # first `first_k_dense_replace` dense, then MoE
        x = x + attn(attn_norm(x))           # multi-head latent attention, RoPE on a 64-dim slice
        x = x + ffn(ffn_norm(x))             # SwiGLU or shared + routed experts
    h = norm(x); logits = lm_head(h)
    # training: + λ · mean_k CE(lm_head(mtp_k(h^{k-1}, embed(ids shifted by k)))) (+ balance loss)

Module names map one to one onto transformers' ``DeepseekV3ForCausalLM`` (see `hf_adapter`); on
the same weights the logits are equal (tests/unit/test_deepseek_hf_parity.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsuite.generation.generate import generate
from deepsuite.generation.latent_cache import LatentKVCache
from deepsuite.generation.speculative import speculative_generate
from deepsuite.heads.lm_head import LMHead
from deepsuite.layers.attention.mla import MultiHeadLatentAttention
from deepsuite.layers.attention.rope import RotaryPositionEmbedding
from deepsuite.layers.mlp import SwiGLU
from deepsuite.layers.moe import DeepSeekMoE
from deepsuite.layers.norm import RMSNorm
from deepsuite.loss import combine_mtp_losses
from deepsuite.models.deepseek_v3.config import DeepSeekV3Config
from deepsuite.models.deepseek_v3.mtp import MTPModule
from deepsuite.models.outputs import LMOutput


class Block(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``."""

    def __init__(self, args: DeepSeekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(args.d_model, eps=args.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(
            args.d_model,
            args.n_heads,
            args.q_lora_rank,
            args.kv_lora_rank,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
            args.v_head_dim,
            softmax_scale=args.softmax_scale(),
            rms_norm_eps=args.rms_norm_eps,
            layer_idx=layer_idx,
        )
        self.ffn_norm = RMSNorm(args.d_model, eps=args.rms_norm_eps)
        self.ffn: SwiGLU | DeepSeekMoE
        if args.is_moe_layer(layer_idx):
            self.ffn = DeepSeekMoE(
                args.d_model,
                args.n_routed_experts,
                args.n_shared_experts,
                args.n_activated_experts,
                args.moe_inter_dim,
                n_expert_groups=args.n_expert_groups,
                n_limited_groups=args.n_limited_groups,
                score_func=args.score_func,
                route_scale=args.route_scale,
                norm_topk_prob=args.norm_topk_prob,
                balance_loss_alpha=args.balance_loss_alpha,
            )
        else:
            self.ffn = SwiGLU(args.d_model, args.inter_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache=cache, start_pos=start_pos)
        return x + self.ffn(self.ffn_norm(x))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Normal(0, std) projections, unit norms, zero router bias."""
        self.attn_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attn.init_weights(std)
        self.ffn.init_weights(std)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 decoder with MTP modules.

    ``model(input_ids)`` returns logits ``(B, T, V)`` (MTP not run). ``model(input_ids,
    labels=labels)`` returns an `LMOutput`: main cross-entropy plus ``mtp_lambda`` · mean over the
    MTP depths (and the sequence-wise balance loss when ``balance_loss_alpha > 0``), metrics
    ``main_loss``, ``mtp_loss_1`` …, ``balance_loss``, ``total_loss``. ``loss_backend``,
    ``loss_chunk_size``, ``label_smoothing`` and ``mtp_lambda`` are plain attributes the trainer sets.
    """

    def __init__(self, args: DeepSeekV3Config) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.loss_backend: str = "auto"
        self.loss_chunk_size: int = 4096
        self.label_smoothing: float = 0.0
        self.mtp_lambda: float = 0.3
        self.last_generation_stats: dict[str, Any] = {}

        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.rope = RotaryPositionEmbedding(
            args.qk_rope_head_dim,
            args.max_seq_len,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            factor=args.rope_factor,
            original_max_seq_len=args.original_seq_len,
            beta_fast=args.beta_fast,
            beta_slow=args.beta_slow,
            mscale=args.mscale,
            mscale_all_dim=args.mscale_all_dim,
        )
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, eps=args.rms_norm_eps)
        self.lm_head = LMHead(args.d_model, args.vocab_size, bias=False, tie_weights=args.tie_embeddings)
        self.mtp = nn.ModuleList(
            MTPModule(args, Block(args, args.n_layers + k)) for k in range(args.mtp_depth)
        )
        self.tie_weights()

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model accepts."""
        return self.args.max_seq_len

    def tie_weights(self) -> None:
        """Share the embedding with the head when ``args.tie_embeddings``."""
        if self.args.tie_embeddings:
            self.lm_head.tie_embedding_weights(self.embed)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> DeepSeekV3:
        """`nn.Module.to_empty`, then re-tie (materialising gives each module its own tensor)."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every weight (transformers' DeepseekV3 init), unit norms, zero
        router biases and counts, recomputed RoPE tables."""
        self.tie_weights()
        std = self.args.init_std
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        self.rope.init_weights()
        for block in self.layers:
            assert isinstance(block, Block)
            block.init_weights(std)
        self.norm.init_weights()
        self.lm_head.init_weights()
        if not self.args.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for module in self.mtp:
            assert isinstance(module, MTPModule) and isinstance(module.block, Block)
            module.init_weights(std)
            module.block.init_weights(std)

    def moe_layers(self) -> list[tuple[str, DeepSeekMoE]]:
        """``(qualified name, module)`` of every MoE layer, MTP blocks included."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, DeepSeekMoE)]

    # ------------------------------------------------------------------ forward

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LatentKVCache:
        """An empty `LatentKVCache` for the main layers and the MTP blocks (used when drafting)."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(
                f"cache length {max_seq_len} exceeds the model's max_seq_len={self.args.max_seq_len}"
            )
        return LatentKVCache(
            self.args.n_layers + self.args.mtp_depth,
            batch_size,
            max_seq_len,
            self.args.kv_lora_rank,
            self.args.qk_rope_head_dim,
            device=device,
            dtype=dtype,
        )

    def hidden_states(
        self, input_ids: torch.Tensor, cache: LatentKVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, C)`` of ``input_ids`` ``(B, T)`` at positions ``start_pos + t``."""
        rope = self.rope.cos_sin(start_pos, input_ids.shape[1])  # (T, R/2) each
        x = self.embed(input_ids)  # (B, T, C)
        for block in self.layers:
            x = block(x, rope, cache=cache, start_pos=start_pos)
        return self.norm(x)

    def mtp_hidden_states(
        self,
        depth: int,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """MTP module ``depth`` (1-based) on ``h_prev`` ``(B, T, C)`` of positions ``start_pos + t`` and
        the ids ``(B, T)`` of the tokens ``depth`` positions later; returns ``h^depth`` ``(B, T, C)``.

        Positions are those of ``h_prev`` (RoPE is relative, so the choice of offset is free)."""
        rope = self.rope.cos_sin(start_pos, next_ids.shape[1])
        module = self.mtp[depth - 1]
        return module(h_prev, self.embed(next_ids), rope, cache=cache, start_pos=start_pos)  # type: ignore[no-any-return]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor | LMOutput:
        """Logits ``(B, T, V)`` without ``labels``; with aligned ``labels`` ``(B, T)`` an `LMOutput`."""
        h = self.hidden_states(input_ids, cache=cache, start_pos=start_pos)  # (B, T, C)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        return self._loss(input_ids, h, labels)

    def _ce(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm_head.loss(
            h,
            labels,
            backend=self.loss_backend,
            chunk_size=self.loss_chunk_size,
            label_smoothing=self.label_smoothing,
        )

    def _loss(self, input_ids: torch.Tensor, h: torch.Tensor, labels: torch.Tensor) -> LMOutput:
        main_loss = self._ce(h, labels)
        # MTP depth k at position i: h^{k-1}_i and Emb(t_{i+k}) predict t_{i+k+1} = labels[:, i+k].
        # Positions i < T - k have both inside the window (DeepSeek's definition, eq. 21-25).
        mtp_losses = []
        h_prev = h
        seq_len = input_ids.shape[1]
        for k in range(1, self.args.mtp_depth + 1):
            n = seq_len - k
            if n <= 0:
                break
            h_prev = self.mtp_hidden_states(k, h_prev[:, :n], input_ids[:, k:])  # (B, T-k, C)
            mtp_losses.append(self._ce(h_prev, labels[:, k:]))
        total, metrics = combine_mtp_losses(main_loss, mtp_losses, self.mtp_lambda)
        if self.args.balance_loss_alpha > 0 and self.training:
            aux = [m.aux_loss for _, m in self.moe_layers() if m.aux_loss is not None]
            if aux:
                balance = torch.stack(aux).sum()
                total = total + balance
                metrics["balance_loss"] = balance.detach()
                metrics["total_loss"] = total.detach()
            for _, m in self.moe_layers():
                m.aux_loss = None
        return LMOutput(loss=total, metrics=metrics)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        speculative: bool = False,
    ) -> torch.Tensor:
        """Sample a continuation with the latent cache (`deepsuite.generation.generate.generate`).

        ``speculative=True`` (greedy only: ``temperature=0``, batch 1) drafts one token per step with
        the first MTP module and verifies it with the main model: the tokens equal plain greedy
        decoding; ``self.last_generation_stats`` then holds the acceptance rate.
        """
        if speculative:
            if temperature != 0:
                raise ValueError("speculative=True decodes greedily; pass temperature=0")
            out, stats = speculative_generate(self, input_ids, max_new_tokens, eos_token_id=eos_token_id)
            self.last_generation_stats = stats
            return out
        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            generator=generator,
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the main model and the MTP modules (a tied weight counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
