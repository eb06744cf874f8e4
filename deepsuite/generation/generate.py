"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step.

A model takes part by implementing ``new_cache(batch_size, max_seq_len, device, dtype)`` and
``forward(input_ids, cache=cache, start_pos=int)`` returning logits ``(B, T, V)`` for the given
positions while writing their keys/values into the cache. The context is never slid: a prompt plus
``max_new_tokens`` longer than the model's ``max_seq_len`` is refused with a ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsuite.generation.sampling import _check, sample_next_token


def model_max_seq_len(model: nn.Module) -> int:
    """The longest sequence ``model`` accepts (``model.max_seq_len`` or ``model.args.max_seq_len``)."""
    limit = getattr(model, "max_seq_len", None)
    if limit is None:
        limit = getattr(getattr(model, "args", None), "max_seq_len", None)
    if limit is None:
        raise ValueError(
            f"{type(model).__name__} exposes no max_seq_len (model.max_seq_len or model.args.max_seq_len)"
        )
    return int(limit)


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens; returns (B, T + n_generated).

    Runs under ``torch.inference_mode`` with the model in eval mode (its previous mode is restored).
    Rows that produced ``eos_token_id`` keep producing it (padding); generation stops early once
    every row is done. ``temperature == 0`` is greedy decoding.

    Every row is a whole prompt of the same length: there is no attention mask, so a left-padded
    batch would attend to its pad tokens. Generate prompts of different lengths one call each.
    """
    _check(temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty (B, T) tensor of token ids, got shape {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    limit = model_max_seq_len(model)
    if total > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
            f"max_seq_len={limit}; shorten the prompt or ask for fewer tokens"
        )
    if max_new_tokens == 0:
        return input_ids.clone()

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(batch, total, input_ids.device, _param_dtype(model))
            logits = model(input_ids, cache=cache, start_pos=0)[:, -1]  # (B, V)
            done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            new_tokens: list[torch.Tensor] = []
            pos = prompt_len
            for step in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_token_id is not None:
                    token = token.masked_fill(done, eos_token_id)
                    done = done | (token == eos_token_id)
                new_tokens.append(token)
                if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                    break
                logits = model(token[:, None], cache=cache, start_pos=pos)[:, -1]  # (B, V)
                pos += 1
            out = torch.cat([input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)], dim=1)
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor, usable outside inference mode
