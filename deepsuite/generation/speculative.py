"""Greedy self-speculative decoding with DeepSeek-V3's first MTP module as the drafter.

Each step the MTP module, given the main model's final hidden state ``h_p`` and the embedding of
token ``t_{p+1}``, drafts ``t_{p+2}``; the main model then runs on ``[t_{p+1}, draft]`` at once. Its
first prediction is the true greedy token; if it equals the draft, the draft is accepted and the
second prediction comes for free (two tokens for one main-model pass), otherwise the first
prediction replaces the draft. The output therefore equals plain greedy decoding token for token.

Caches: the main layers' latent cache only ever advances over confirmed tokens (a rejected draft's
position is overwritten by the next pass before anything reads it); the MTP block has its own layer
in the same `LatentKVCache` and is fed only confirmed positions.

The model must provide ``new_cache``, ``hidden_states(ids, cache, start_pos)``,
``mtp_hidden_states(depth, h, next_ids, cache, start_pos)``, ``lm_head`` and ``args.mtp_depth``
(`deepsuite.models.deepseek_v3.DeepSeekV3` does).
"""

from __future__ import annotations

from typing import Any

import torch

from deepsuite.generation.generate import _param_dtype, model_max_seq_len


def speculative_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Greedy continuation of ``input_ids`` ``(1, T)`` drafted by MTP and verified by the main model.

    Returns ``(tokens (1, T + n), stats)`` with ``stats`` = ``drafted``, ``accepted``,
    ``acceptance_rate``, ``main_passes`` (main-model forward passes after the prompt) and
    ``new_tokens``.
    """
    if getattr(model.args, "mtp_depth", 0) < 1:
        raise ValueError("speculative decoding drafts with the MTP module; this model has mtp_depth=0")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding runs one sequence at a time, got batch size {input_ids.shape[0]}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    prompt_len = input_ids.shape[1]
    limit = model_max_seq_len(model)
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len={limit}"
        )
    stats: dict[str, Any] = {
        "drafted": 0,
        "accepted": 0,
        "acceptance_rate": 0.0,
        "main_passes": 0,
        "new_tokens": 0,
    }
    if max_new_tokens == 0:
        return input_ids.clone(), stats

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # one extra position: the verify pass may write the draft one past the last kept token
            cache_len = min(prompt_len + max_new_tokens + 1, limit)
            cache = model.new_cache(1, cache_len, input_ids.device, _param_dtype(model))
            h = model.hidden_states(input_ids, cache=cache, start_pos=0)  # (1, T, C)
            seq = input_ids[0].tolist()
            seq.append(int(model.lm_head(h[:, -1]).argmax(-1)))
            pending_h, pending_start = h, 0  # main hidden states not yet seen by the MTP module
            total = prompt_len + max_new_tokens
            while len(seq) < total and not (eos_token_id is not None and seq[-1] == eos_token_id):
                n = pending_h.shape[1]
                next_ids = torch.tensor(
                    [seq[pending_start + 1 : pending_start + 1 + n]], device=input_ids.device
                )
                h_mtp = model.mtp_hidden_states(1, pending_h, next_ids, cache=cache, start_pos=pending_start)
                draft = int(model.lm_head(h_mtp[:, -1]).argmax(-1))
                pos = len(seq) - 1  # position of the last confirmed token, not yet run by the main model
                if pos + 2 > cache_len:  # no room to verify a draft: one plain step
                    h = model.hidden_states(torch.tensor([[seq[-1]]], device=input_ids.device), cache, pos)
                    stats["main_passes"] += 1
                    seq.append(int(model.lm_head(h[:, -1]).argmax(-1)))
                    pending_h, pending_start = h, pos
                    continue
                step = torch.tensor([[seq[-1], draft]], device=input_ids.device)
                h = model.hidden_states(step, cache=cache, start_pos=pos)  # (1, 2, C)
                greedy = model.lm_head(h).argmax(-1)[0].tolist()  # predictions for pos+1, pos+2
                stats["main_passes"] += 1
                stats["drafted"] += 1
                if greedy[0] == draft:
                    stats["accepted"] += 1
                    seq.append(draft)
                    if draft != eos_token_id:
                        seq.append(greedy[1])
                    pending_h, pending_start = h, pos
                else:
                    seq.append(greedy[0])
                    pending_h, pending_start = h[:, :1], pos
            seq = seq[:total]
            if eos_token_id is not None and eos_token_id in seq[prompt_len:]:
                seq = seq[: seq.index(eos_token_id, prompt_len) + 1]
            out = torch.tensor([seq], dtype=input_ids.dtype, device=input_ids.device)
    finally:
        model.train(was_training)
    stats["new_tokens"] = out.shape[1] - prompt_len
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return out.clone(), stats
