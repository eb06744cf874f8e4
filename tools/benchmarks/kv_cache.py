"""MLA inference cache benchmark: deepsuite's latent cache vs transformers' DeepseekV3 cache.

1. **Cache bytes per token per layer**, measured by reading the cache tensors after a prefill, for
   the DeepSeek-V3 671B head layout (128 heads, kv_lora 512, rope 64, nope 128, v 128) on a
   one-layer model: deepsuite's `LatentKVCache` against the ``DynamicCache`` that transformers'
   ``DeepseekV3ForCausalLM`` fills, and against a full per-head K/V cache (theory, 71× for V3).
2. **Decode tokens/s at 2,048 context**: greedy decoding of new tokens after a 2,048-token prompt,
   both models on the same tiny weights, each driven by the same hand-written loop (prefill, then
   one token per forward with the cache). deepsuite attends over the latent with ``wkv_b``
   absorbed; transformers re-expands keys and values of every cached position at each step.
   The generated tokens are checked equal.

    python tools/benchmarks/kv_cache.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import env_info, print_table, write_json

from deepsuite.models.deepseek_v3 import hf_adapter
from deepsuite.models.deepseek_v3.model import DeepSeekV3

V3_HEADS = dict(
    num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128
)
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=16,
    kv_lora_rank=128,
    q_lora_rank=96,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
)


def hf_and_ours(overrides: dict[str, Any], seed: int = 0) -> tuple[Any, DeepSeekV3]:
    """A random transformers DeepseekV3ForCausalLM and deepsuite's model with the same weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**TINY, **overrides, "num_key_value_heads": None})
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    args = hf_adapter.config_from_hf(config.to_dict())
    args.mtp_depth = 0
    with torch.device("meta"):
        ours = DeepSeekV3(args)
    ours = ours.to_empty(device="cpu")
    ours.init_weights()
    ours.load_state_dict(hf_adapter.state_dict_from_hf(hf.state_dict(), args), strict=True)
    return hf, ours.eval()


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(v) for v in vars(obj).values())
    return 0


@torch.no_grad()
def cache_bytes(prompt_len: int = 32) -> dict[str, Any]:
    """Bytes per token per layer (bf16) of each cache, read from the tensors after a prefill."""
    hf, ours = hf_and_ours(
        {**V3_HEADS, "num_hidden_layers": 1, "first_k_dense_replace": 1, "q_lora_rank": None}
    )
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (1, prompt_len))
    past = hf(ids, use_cache=True).past_key_values
    hf_bytes = _tensor_bytes(past.layers) / prompt_len
    cache = ours.new_cache(1, prompt_len, dtype=torch.bfloat16)
    ours(ids, cache=cache, start_pos=0)
    ours_bytes = cache.nbytes() / prompt_len
    h = V3_HEADS["num_attention_heads"]
    full = h * (V3_HEADS["qk_nope_head_dim"] + V3_HEADS["qk_rope_head_dim"] + V3_HEADS["v_head_dim"]) * 2
    return {
        "deepsuite_bytes_per_token_layer": ours_bytes,
        "transformers_bytes_per_token_layer": hf_bytes,
        "full_kv_bytes_per_token_layer": full,
        "ratio_transformers_over_deepsuite": hf_bytes / ours_bytes,
        "ratio_full_kv_over_deepsuite": full / ours_bytes,
        "deepseek_v3_671b_deepsuite_kib_per_token": ours_bytes * 61 / 1024,
    }


@torch.no_grad()
def decode_speed(context: int, new_tokens: int) -> dict[str, Any]:
    """Greedy decode ``new_tokens`` after a ``context``-token prompt; tokens/s of each."""
    hf, ours = hf_and_ours({})
    ids = torch.randint(0, TINY["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))

    def run_hf() -> tuple[list[int], float]:
        out = hf(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return tokens, time.perf_counter() - start

    def run_ours() -> tuple[list[int], float]:
        cache = ours.new_cache(1, context + new_tokens)
        token = ours(ids, cache=cache, start_pos=0)[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            token = ours(token, cache=cache, start_pos=context + step)[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        return tokens, time.perf_counter() - start

    hf_tokens, hf_s = run_hf()
    our_tokens, our_s = run_ours()
    steps = new_tokens - 1
    return {
        "context": context,
        "decode_steps": steps,
        "same_tokens": hf_tokens == our_tokens,
        "deepsuite_tokens_per_s": steps / our_s,
        "transformers_tokens_per_s": steps / hf_s,
        "speedup": hf_s / our_s,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Cache size and decode speed, deepsuite vs transformers, in one run."""
    sizes = cache_bytes()
    speed = decode_speed(context=512 if quick else 2048, new_tokens=8 if quick else 32)
    return {
        "benchmark": "kv_cache",
        "cache": sizes,
        "decode": speed,
        "ratios": {
            "decode tokens/s deepsuite/transformers": speed["speedup"],
            "cache transformers/deepsuite": sizes["ratio_transformers_over_deepsuite"],
            "cache full K/V/deepsuite": sizes["ratio_full_kv_over_deepsuite"],
        },
        "goal": "cache <= 1/20 of transformers' (671B head layout) and decode >= 1.5x tokens/s",
        "env": env_info("cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512-token context, 8 new tokens")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(quick=args.quick)
    c, d = result["cache"], result["decode"]
    print_table(
        [
            {
                "cache": "deepsuite LatentKVCache",
                "bytes/token/layer (bf16)": c["deepsuite_bytes_per_token_layer"],
            },
            {
                "cache": "transformers DeepseekV3",
                "bytes/token/layer (bf16)": c["transformers_bytes_per_token_layer"],
            },
            {
                "cache": "full per-head K/V (theory)",
                "bytes/token/layer (bf16)": c["full_kv_bytes_per_token_layer"],
            },
        ]
    )
    print(
        f"transformers / deepsuite = {c['ratio_transformers_over_deepsuite']:.2f}x, "
        f"full K/V / deepsuite = {c['ratio_full_kv_over_deepsuite']:.1f}x"
    )
    print_table(
        [
            {"model": "deepsuite", "decode tok/s": d["deepsuite_tokens_per_s"]},
            {"model": "transformers", "decode tok/s": d["transformers_tokens_per_s"]},
        ]
    )
    print(f"decode speed-up at {d['context']} context: {d['speedup']:.2f}x (same tokens: {d['same_tokens']})")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
