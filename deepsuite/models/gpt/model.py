"""GPT-2/3: learned absolute positions, pre-LayerNorm blocks, tanh-GELU MLP, optionally tied LM head.

Reads like nanoGPT: ``x = wte(ids) + wpe(pos)``; per block ``x = x + attn(ln_1(x))`` then
``x = x + mlp(ln_2(x))``; ``logits = lm_head(ln_f(x))``. Module names follow transformers'
``GPT2LMHeadModel`` (``h`` is called ``layers`` here) so the HF adapter only renames and transposes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepsuite.generation.generate import generate
from deepsuite.generation.kv_cache import KVCache
from deepsuite.heads.lm_head import LMHead
from deepsuite.layers.attention.mha import MultiHeadAttention
from deepsuite.layers.embedding import init_embedding, position_ids
from deepsuite.layers.mlp import GELUMLP
from deepsuite.layers.norm import init_layer_norm
from deepsuite.models.gpt.config import GPTConfig
from deepsuite.models.outputs import LMOutput


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, args: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.d_model, eps=args.layer_norm_eps, bias=args.bias)
        self.attn = MultiHeadAttention(
            args.d_model, args.n_heads, bias=args.bias, dropout=args.dropout, layer_idx=layer_idx
        )
        self.ln_2 = nn.LayerNorm(args.d_model, eps=args.layer_norm_eps, bias=args.bias)
        self.mlp = GELUMLP(args.d_model, args.ffn_dim, bias=args.bias, dropout=args.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, start_pos=start_pos)
        x = x + self.mlp(self.ln_2(x))
        return x

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """LayerNorms 1/0, projections normal(0, std), residual projections normal(0, out_std)."""
        init_layer_norm(self.ln_1)
        init_layer_norm(self.ln_2)
        self.attn.init_weights(std, out_std)
        self.mlp.init_weights(std, out_std)


class GPT(nn.Module):
    """GPT-2/3 decoder-only language model.

    ``model(input_ids)`` returns logits ``(B, T, V)``; ``model(input_ids, labels=labels)`` returns an
    `LMOutput` whose loss comes from fused linear cross-entropy on the final hidden states (the
    full logits are never materialised). ``loss_backend``, ``loss_chunk_size`` and
    ``label_smoothing`` are plain attributes the trainer sets.
    """

    def __init__(self, args: GPTConfig) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.loss_backend: str = "auto"
        self.loss_chunk_size: int = 4096
        self.label_smoothing: float = 0.0

        self.wte = nn.Embedding(args.vocab_size, args.d_model)
        self.wpe = nn.Embedding(args.max_seq_len, args.d_model)
        self.drop = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.ln_f = nn.LayerNorm(args.d_model, eps=args.layer_norm_eps, bias=args.bias)
        self.lm_head = LMHead(args.d_model, args.vocab_size, bias=False, tie_weights=args.tie_embeddings)
        self.tie_weights()

    @property
    def max_seq_len(self) -> int:
        """Number of learned positions: the longest sequence the model accepts."""
        return self.args.max_seq_len

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter of ``wte.weight`` when ``args.tie_embeddings``."""
        if self.args.tie_embeddings:
            self.lm_head.tie_embedding_weights(self.wte)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> GPT:
        """`nn.Module.to_empty`, then re-tie: materialising from meta gives each module its own tensor."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation: normal(0, init_std); residual projections (``c_proj``) use
        ``init_std / sqrt(2 · n_layers)``; biases 0; LayerNorm weight 1, bias 0."""
        self.tie_weights()
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        init_embedding(self.wte, std)
        init_embedding(self.wpe, std)
        for module in self.layers.modules():  # also finds blocks inside checkpoint/compile wrappers
            if isinstance(module, Block):
                module.init_weights(std, out_std)
        init_layer_norm(self.ln_f)
        self.lm_head.init_weights()  # re-shares the tied weight; zero bias
        if not self.args.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    def new_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """An empty `KVCache` for ``batch_size`` sequences of up to ``max_seq_len`` positions."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(
                f"cache length {max_seq_len} exceeds the model's max_seq_len={self.args.max_seq_len}"
            )
        return KVCache(
            self.args.n_layers,
            batch_size,
            self.args.n_heads,
            max_seq_len,
            self.args.head_dim,
            device=device,
            dtype=dtype,
        )

    def hidden_states(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states ``(B, T, C)`` of ``input_ids`` ``(B, T)`` at positions ``start_pos + t``."""
        _, seq_len = input_ids.shape
        pos = position_ids(start_pos, seq_len, self.args.max_seq_len, input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        for block in self.layers:
            x = block(x, cache=cache, start_pos=start_pos)
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor | LMOutput:
        """Logits ``(B, T, V)`` without ``labels``; with ``labels`` ``(B, T)`` (aligned targets, -100
        ignored) an `LMOutput` with the mean cross-entropy."""
        h = self.hidden_states(input_ids, cache=cache, start_pos=start_pos)  # (B, T, C)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        loss = self.lm_head.loss(
            h,
            labels,
            backend=self.loss_backend,
            chunk_size=self.loss_chunk_size,
            label_smoothing=self.label_smoothing,
        )
        detached = loss.detach()
        return LMOutput(loss=loss, metrics={"main_loss": detached, "total_loss": detached})

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
    ) -> torch.Tensor:
        """Sample a continuation with a KV cache; see `deepsuite.generation.generate.generate`."""
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
        """Number of parameters (a tied weight counted once); ``exclude_embeddings`` leaves out the
        token and position tables (Kaplan et al.'s non-embedding count; an untied head still counts)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n
