"""Training-step throughput and peak memory: deepsuite's GPT vs transformers' GPT2LMHeadModel.

Same config (gpt2-small shape with 4 layers, sequence 512), same batch, same torch AdamW, in fp32
and in bf16 autocast, measured in one run; each (model, dtype) in a fresh process so the CPU
peak (ru_maxrss) is its own. ``--rounds`` rounds per dtype alternate the order (A B, B A, …) so
that a shared machine's changing load hits both models alike; tokens/s comes from the median of
all timed steps of all rounds, peak memory is the largest of the rounds. MFU = (6 · N + 12 · L · T · d) ·
tokens/s / matmul peak, N the matmul parameters (the tied embedding counted once as the LM head,
positions left out), the peak measured on a square matmul of the same dtype and device by each
worker right after its timed steps (so under the same load), median over the rounds.

    python tools/benchmarks/train_step.py [--quick] [--device cuda] [--rounds 2] [--json PATH]

Goals (issue 8): ≥ 1.2× tokens/s, ≤ 0.7× peak memory, MFU ≥ 50 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import (
    cuda_peak_memory_mb,
    env_info,
    matmul_peak_flops,
    max_rss_mb,
    print_table,
    reset_peak_memory,
    run_isolated,
    sync,
    write_json,
)

SHAPE = dict(vocab_size=50257, max_seq_len=1024, d_model=768, n_layers=4, n_heads=12, dropout=0.0)


def _build(impl: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if impl == "deepsuite":
        from deepsuite.models import build_model

        return build_model(name="gpt", flavor="gpt2-small", device=device, **SHAPE)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=SHAPE["vocab_size"],
        n_positions=SHAPE["max_seq_len"],
        n_embd=SHAPE["d_model"],
        n_layer=SHAPE["n_layers"],
        n_head=SHAPE["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg).to(device)


def _matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all, minus position embeddings (the tied token
    embedding counts once, as the LM head)."""
    n = sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():
        if name.endswith("wpe.weight"):
            n -= p.numel()
    return n


def worker(impl: str, dtype: str, device: str, batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Build one model, train ``steps`` timed steps after one warm-up; tokens/s (median step) and peak memory."""
    torch.manual_seed(0)
    rss_before = max_rss_mb()
    model = _build(impl, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq_len), device=device)
    # deepsuite takes aligned targets; transformers shifts `labels` itself
    labels = ids.roll(-1, dims=1) if impl == "deepsuite" else ids
    device_type = torch.device(device).type

    def step() -> float:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(ids, labels=labels)
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    reset_peak_memory(device)
    step()  # warm-up (allocates optimizer state)
    sync(device)
    times = []
    for _ in range(steps):  # the median step: robust to bursts from other processes on a shared CPU
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    peak = cuda_peak_memory_mb() if device_type == "cuda" else max_rss_mb() - rss_before
    matmul_peak = matmul_peak_flops(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
    return {
        "impl": impl,
        "dtype": dtype,
        "tokens_per_s": batch * seq_len / seconds,
        "step_s": seconds,
        "step_times": times,
        "peak_mem_mb": peak,
        "matmul_peak_gflops": matmul_peak / 1e9,
        "matmul_params": _matmul_params(model),
        "loss": loss,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _combine_rounds(rounds: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """One row from the rounds of one (model, dtype): median over all timed steps, largest peak."""
    times = sorted(t for r in rounds for t in r["step_times"])
    seconds = times[len(times) // 2]
    row = dict(rounds[-1])
    row.pop("step_times")
    row.update(
        tokens_per_s=tokens_per_step / seconds,
        step_s=seconds,
        peak_mem_mb=max(r["peak_mem_mb"] for r in rounds),
        matmul_peak_gflops=_median([r["matmul_peak_gflops"] for r in rounds]),
        round_tokens_per_s=[r["tokens_per_s"] for r in rounds],
    )
    return row


def run(quick: bool = False, device: str = "cpu", rounds: int = 2) -> dict[str, Any]:
    """deepsuite vs transformers, fp32 and bf16: rows, ratios and MFU."""
    batch, seq_len, steps = (2, 512, 3) if quick else (4, 512, 5)
    script = Path(__file__).resolve()
    result: dict[str, Any] = {
        "env": env_info(device),
        "config": {
            **SHAPE,
            "batch": batch,
            "seq_len": seq_len,
            "timed_steps": steps,
            "rounds": rounds,
            "optimizer": "torch AdamW",
        },
        "peak_memory_measure": "CUDA max_memory_allocated"
        if device.startswith("cuda")
        else "ru_maxrss growth of a fresh process over its post-import baseline",
    }
    rows: list[dict[str, Any]] = []
    impls = ("deepsuite", "transformers")
    for dtype in ("fp32", "bf16"):
        done: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        errors: dict[str, str] = {}
        for r in range(rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                if impl in errors:
                    continue
                args = dict(impl=impl, dtype=dtype, device=device, batch=batch, seq_len=seq_len, steps=steps)
                try:
                    done[impl].append(run_isolated(script, args))
                except Exception as err:  # one failing configuration is reported, the others still run
                    errors[impl] = str(err)[-500:]
        for impl in impls:
            if impl in errors:
                rows.append({"impl": impl, "dtype": dtype, "error": errors[impl]})
                continue
            row = _combine_rounds(done[impl], batch * seq_len)
            d, L, T = SHAPE["d_model"], SHAPE["n_layers"], seq_len
            flops_per_token = 6 * row["matmul_params"] + 12 * L * T * d
            row["mfu"] = flops_per_token * row["tokens_per_s"] / (row["matmul_peak_gflops"] * 1e9)
            rows.append(row)
        peaks = [r["matmul_peak_gflops"] for impl in impls for r in done[impl]]
        if peaks:
            result[f"matmul_peak_{dtype}_gflops"] = _median(peaks)
    result["rows"] = rows
    ratios: dict[str, float] = {}
    for dtype in ("fp32", "bf16"):
        ours = next(
            (r for r in rows if r["impl"] == "deepsuite" and r["dtype"] == dtype and "error" not in r), None
        )
        ref = next(
            (r for r in rows if r["impl"] == "transformers" and r["dtype"] == dtype and "error" not in r),
            None,
        )
        if ours and ref:
            ratios[f"{dtype} tokens/s deepsuite/transformers"] = ours["tokens_per_s"] / ref["tokens_per_s"]
            ratios[f"{dtype} peak memory deepsuite/transformers"] = ours["peak_mem_mb"] / ref["peak_mem_mb"]
            ratios[f"{dtype} MFU deepsuite"] = ours["mfu"]
    result["ratios"] = ratios
    result["goals"] = {"tokens_per_s_ratio": ">= 1.2", "peak_memory_ratio": "<= 0.7", "mfu": ">= 0.5"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 2, 3 timed steps")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per dtype, order alternating")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    result = run(quick=args.quick, device=args.device, rounds=args.rounds)
    print_table(
        result["rows"], ["impl", "dtype", "tokens_per_s", "step_s", "peak_mem_mb", "mfu", "loss", "error"]
    )
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3f}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
