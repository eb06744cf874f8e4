"""Text in, text out: encode a prompt, check it fits the model, sample a continuation, decode.

Used by `deepsuite generate` and the sample at the end of training. The tokenizer is passed in
(anything with ``encode(text) -> list[int]``, ``decode(ids) -> str`` and ``eos_id``), so model-side
code needs no data package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsuite.generation.generate import model_max_seq_len


class GenerationError(ValueError):
    """A request the model cannot serve (prompt too long, ids outside its vocabulary, no MTP module
    to draft with); the message says what to change."""


def encode_prompt(
    model: nn.Module, tok: Any, prompt: str, max_new_tokens: int, *, speculative: bool = False
) -> tuple[list[int], int]:
    """The prompt's token ids and how many of ``max_new_tokens`` fit after them under the model's
    ``max_seq_len`` (a longer request is shortened to what fits). An empty prompt starts from EOS,
    the token every training document follows."""
    if speculative and getattr(getattr(model, "args", None), "mtp_depth", 0) < 1:
        raise GenerationError(
            f"speculative decoding drafts with the MTP module, but this {type(model).__name__} has none; "
            "generate without it"
        )
    ids = tok.encode(prompt) or [tok.eos_id]
    limit = model_max_seq_len(model)
    if len(ids) + min(max_new_tokens, 1) > limit:
        raise GenerationError(
            f"the prompt is {len(ids)} tokens and the model's max_seq_len is {limit}: no room to generate; "
            f"shorten the prompt to fewer than {limit} tokens"
        )
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        raise GenerationError(
            f"the prompt holds token id {max(ids)} but the model's vocab_size is {vocab}: the tokenizer does "
            "not belong to this model"
        )
    return ids, max(0, min(max_new_tokens, limit - len(ids)))


def generate_text(
    model: nn.Module,
    tok: Any,
    prompt: str,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
    speculative: bool = False,
    stop_at_eos: bool = True,
) -> str:
    """Decode `prompt` + up to `max_new_tokens` sampled tokens (greedy MTP-drafted with ``speculative``).

    With ``stop_at_eos`` (default) generation ends at the tokenizer's end-of-document id, which the
    training data puts after every document: what follows it would be an unrelated next document.
    Raises `GenerationError` for a request the model cannot serve (see `encode_prompt`).
    """
    ids, max_new_tokens = encode_prompt(model, tok, prompt, max_new_tokens, speculative=speculative)
    eos = int(tok.eos_id) if stop_at_eos else None
    prompt_ids = torch.tensor([ids], device=device)
    if speculative:
        out = model.generate(  # type: ignore[operator]
            prompt_ids, max_new_tokens, temperature=0, speculative=True, eos_token_id=eos
        )
    else:
        out = model.generate(  # type: ignore[operator]
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
    new = out[0, len(ids) :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return str(tok.decode(ids + new))
