"""MTP speculative decoding benchmark: acceptance rate and decode speed-up over plain greedy.

Loads a trained DeepSeek-V3 (a training checkpoint folder, a deepsuite model folder or an HF
folder with MTP weights), takes prompts from a prepared data folder's validation split (or random
token ids), and decodes each prompt greedily twice in the same run: plain
(`deepsuite.generation.generate`, one main-model pass per token) and speculative (the MTP module
drafts one token, the main model verifies two at once). The tokens are checked equal; the
acceptance rate and the wall-clock speed-up are reported. Without ``--checkpoint`` a random tiny
model is used (a smoke run: an untrained drafter is rarely accepted).

    python tools/benchmarks/speculative.py --checkpoint runs/default/checkpoints --data data/shakespeare [--json out.json]
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

from common import env_info, print_table, sync, write_json

from deepsuite.models.deepseek_v3.config import FLAVORS
from deepsuite.models.deepseek_v3.model import DeepSeekV3


def load(checkpoint: str | None) -> tuple[DeepSeekV3, str]:
    """The model of ``checkpoint`` (training checkpoint, deepsuite folder or HF folder), or a random debug model."""
    if checkpoint is None:
        torch.manual_seed(0)
        model = DeepSeekV3(FLAVORS["deepseek-v3-debug"])
        model.init_weights()
        return model.eval(), "random deepseek-v3-debug (untrained)"
    path = Path(checkpoint)
    model: Any
    if (path / "config.json").is_file():
        from deepsuite.models import load_hf

        model = load_hf(path)
    elif (path / "model.yaml").is_file():
        from deepsuite.checkpoint.hf_io import load_model

        model = load_model(path)
    else:
        from deepsuite.checkpoint.consolidate import load_model_from_checkpoint

        model, _, _ = load_model_from_checkpoint(path)
    if not isinstance(model, DeepSeekV3):
        raise SystemExit(f"{checkpoint} holds a {type(model).__name__}, not a DeepSeekV3")
    return model.eval(), str(checkpoint)


def prompts(data: str | None, vocab_size: int, n: int, length: int) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens from ``data``'s validation split (evenly spaced), or random ids."""
    if data is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, length), generator=g) for _ in range(n)]
    from deepsuite.data.shards import TokenShards

    shards = TokenShards(data, "val")
    tokens = torch.from_numpy(shards.arrays[0][: max(len(shards.arrays[0]), 1)].astype("int64"))
    step = max((len(tokens) - length) // n, 1)
    return [tokens[i * step : i * step + length][None] for i in range(n)]


@torch.inference_mode()
def pass_costs(model: DeepSeekV3, context: int, repeats: int = 200) -> dict[str, float]:
    """Milliseconds of one decode pass at ``context`` cached tokens: main model on 1 token, on 2
    tokens (a verify pass), and the MTP module on 1 token — what bounds the speculative speed-up."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.args.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    cache = model.new_cache(1, context + 4, ids.device, next(model.parameters()).dtype)
    h = model.hidden_states(ids, cache=cache, start_pos=0)
    one, two = ids[:, -1:], ids[:, -2:]

    def ms(fn: Any) -> float:
        for _ in range(repeats // 10):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / repeats * 1e3

    return {
        "main_1_token_ms": ms(lambda: model.hidden_states(one, cache=cache, start_pos=context)),
        "main_2_tokens_ms": ms(lambda: model.hidden_states(two, cache=cache, start_pos=context)),
        "mtp_1_token_ms": ms(
            lambda: model.mtp_hidden_states(1, h[:, -1:], one, cache=cache, start_pos=context - 1)
        ),
    }


def run(
    quick: bool = False,
    checkpoint: str | None = None,
    data: str | None = None,
    n_prompts: int = 8,
    prompt_len: int = 32,
    new_tokens: int = 128,
    device: str = "cpu",
) -> dict[str, Any]:
    """Acceptance rate and speed-up of speculative over plain greedy decoding on the same prompts."""
    if quick:
        n_prompts, new_tokens = 2, 16
    model, source = load(checkpoint)
    model.to(device)
    new_tokens = min(new_tokens, model.max_seq_len - prompt_len - 1)
    batch = [p.to(device) for p in prompts(data, model.args.vocab_size, n_prompts, prompt_len)]
    plain_s = spec_s = 0.0
    drafted = accepted = 0
    same = True
    # warm-up at full length: CPU kernels are prepared per new shape (every cache length), and the
    # first pass over each is an order of magnitude slower than the timed ones
    model.generate(batch[0], new_tokens, temperature=0)
    model.generate(batch[0], new_tokens, temperature=0, speculative=True)
    for ids in batch:
        sync(device)
        t0 = time.perf_counter()
        plain = model.generate(ids, new_tokens, temperature=0)
        sync(device)
        t1 = time.perf_counter()
        spec = model.generate(ids, new_tokens, temperature=0, speculative=True)
        sync(device)
        t2 = time.perf_counter()
        plain_s += t1 - t0
        spec_s += t2 - t1
        same = same and torch.equal(plain, spec)
        drafted += model.last_generation_stats["drafted"]
        accepted += model.last_generation_stats["accepted"]
    tokens = n_prompts * new_tokens
    costs = pass_costs(model, prompt_len + new_tokens // 2, repeats=20 if quick else 200)
    rate = accepted / drafted if drafted else 0.0
    spec_pass = costs["main_2_tokens_ms"] + costs["mtp_1_token_ms"]
    return {
        "benchmark": "speculative",
        "model": source,
        "prompts": n_prompts,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "same_tokens_as_greedy": same,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "plain_tokens_per_s": tokens / plain_s,
        "speculative_tokens_per_s": tokens / spec_s,
        "speedup": plain_s / spec_s,
        "pass_costs": costs,
        # tokens per verify pass (1 + acceptance) × plain pass time / verify-plus-draft pass time:
        # the speed-up with zero bookkeeping overhead
        "speedup_bound_at_measured_acceptance": (1 + rate) * costs["main_1_token_ms"] / spec_pass,
        "speedup_bound_at_full_acceptance": 2 * costs["main_1_token_ms"] / spec_pass,
        "ratios": {
            "acceptance": accepted / drafted if drafted else 0.0,
            "speculative/plain tokens/s": plain_s / spec_s,
        },
        "goal": "acceptance >= 0.7 and speed-up >= 1.4x on the trained default model",
        "env": env_info(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", default=None, help="training checkpoint, deepsuite folder or HF folder"
    )
    parser.add_argument("--data", default=None, help="prepared data folder (prompts from its val split)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 16 new tokens")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(
        args.quick, args.checkpoint, args.data, args.prompts, args.prompt_len, args.new_tokens, args.device
    )
    print_table(
        [
            {"decoding": "plain greedy", "tokens/s": result["plain_tokens_per_s"]},
            {"decoding": "MTP speculative", "tokens/s": result["speculative_tokens_per_s"]},
        ]
    )
    print(
        f"acceptance {result['acceptance_rate']:.1%}, speed-up {result['speedup']:.2f}x, "
        f"same tokens as greedy: {result['same_tokens_as_greedy']} ({result['model']})"
    )
    c = result["pass_costs"]
    print(
        f"decode pass: main 1 token {c['main_1_token_ms']:.2f} ms, 2 tokens {c['main_2_tokens_ms']:.2f} ms, "
        f"MTP {c['mtp_1_token_ms']:.2f} ms -> speed-up bound {result['speedup_bound_at_measured_acceptance']:.2f}x "
        f"at this acceptance, {result['speedup_bound_at_full_acceptance']:.2f}x at 100 %"
    )
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
