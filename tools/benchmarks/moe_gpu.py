"""One MoE layer on a GPU: deepsuite `DeepSeekMoE` (bf16, and FP8 experts) vs transformers'
`DeepseekV3MoE` with its ``grouped_mm`` experts, same weights, forward + backward.

Shape: DeepSeek-V2-Lite's MoE layer (d_model 2,048, 64 routed experts top-6, 2 shared, expert dim
1,408) with DeepSeek-V3's router (sigmoid, selection bias, one group), 16,384 tokens, bf16 weights.
Outputs and input gradients are compared before timing (bf16 tolerance). Each implementation is
timed with CUDA events (median of ``--iters`` steps after warm-up) and one more step is profiled:
its top kernels go into the JSON, the full table into ``--profile``.

    python tools/benchmarks/moe_gpu.py [--tokens 16384] [--iters 10] [--json out.json] [--profile out.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import env_info, matmul_peak_flops, print_table, time_fn, write_json
from mfu_gpu import profile_steps
from moe import step

from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import prepare_fp8
from deepsuite.layers.moe import DeepSeekMoE

V2_LITE = dict(d_model=2048, experts=64, top_k=6, shared=2, moe_inter=1408)


def build(cfg: dict[str, int], device: str) -> tuple[DeepSeekMoE, torch.nn.Module]:
    """deepsuite's layer and transformers' (grouped_mm experts), same bf16 weights, on ``device``."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    ours = DeepSeekMoE(cfg["d_model"], cfg["experts"], cfg["shared"], cfg["top_k"], cfg["moe_inter"])
    ours.init_weights(std=0.02)
    with torch.no_grad():
        ours.gate.weight.normal_(0.0, 0.1)  # spread routing
        ours.e_score_correction_bias.normal_(0.0, 0.01)
    ours = ours.to(device).bfloat16()
    config = transformers.DeepseekV3Config(
        hidden_size=cfg["d_model"],
        moe_intermediate_size=cfg["moe_inter"],
        n_routed_experts=cfg["experts"],
        num_experts_per_tok=cfg["top_k"],
        n_shared_experts=cfg["shared"],
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
    )
    config._experts_implementation = "grouped_mm"
    ref = DeepseekV3MoE(config).to(device).bfloat16()
    with torch.no_grad():
        ref.gate.weight.copy_(ours.gate.weight)
        ref.gate.e_score_correction_bias.copy_(ours.e_score_correction_bias)
        ref.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        ref.experts.down_proj.copy_(ours.experts.down_proj)
        assert ours.shared_experts is not None
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ref.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
    return ours, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _time(fn: Any, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` calls, CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        return time_fn(fn, "cpu", warmup=0, iters=iters)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def model_flops(cfg: dict[str, int], tokens: int) -> float:
    """Matmul FLOPs of forward + backward (backward = 2 × forward): router, routed, shared."""
    d, i = cfg["d_model"], cfg["moe_inter"]
    forward = 2 * tokens * d * cfg["experts"] + 2 * tokens * 3 * d * i * (cfg["top_k"] + cfg["shared"])
    return 3.0 * forward


def run(tokens: int, iters: int, profile: Path | None, device: str = "cuda") -> dict[str, Any]:
    """Parity, then tokens/s, peak memory and top kernels of each implementation."""
    cfg = V2_LITE if device == "cuda" else dict(d_model=128, experts=8, top_k=2, shared=1, moe_inter=64)
    ours, ref = build(cfg, device)
    fp8 = build(cfg, device)[0]
    ctx = prepare_fp8(fp8, FP8Config(enabled=True, backend="native", recipe="current"))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, tokens, cfg["d_model"], generator=g, device=device, dtype=torch.bfloat16)
    grad = torch.randn(x.shape, generator=g, device=device, dtype=torch.bfloat16)
    modules: dict[str, torch.nn.Module] = {
        "transformers_grouped_mm": ref,
        "deepsuite_bf16": ours,
        "deepsuite_fp8": fp8,
    }
    results: dict[str, Any] = {}
    ref_out, ref_gx = step(ref, x, grad)
    for name, module in modules.items():
        out, gx = step(module, x, grad)
        results[name] = {
            "rel_out_vs_transformers": _rel(out, ref_out),
            "rel_grad_x_vs_transformers": _rel(gx, ref_gx),
        }
    peak = matmul_peak_flops(device, torch.bfloat16)
    flops = model_flops(cfg, tokens)
    rows = []
    for name, module in modules.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _time(lambda m=module: step(m, x, grad), warmup=3, iters=iters)
        row = {
            "implementation": name,
            "ms_fwd_bwd": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "fraction_of_bf16_peak": flops / seconds / peak,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            **results[name],
        }
        if profile is not None:
            row["top_kernels"] = profile_steps(
                lambda m=module: step(m, x, grad), profile, f"moe {name}", steps=2
            )
        rows.append(row)
        print_table([{k: v for k, v in row.items() if k != "top_kernels"}])
    base = {r["implementation"]: r["tokens_per_s"] for r in rows}
    return {
        "benchmark": "moe_gpu",
        "config": {**cfg, "tokens": tokens, "dtype": "bfloat16", "router": "sigmoid, 1 group"},
        "fp8_summary": ctx.summary,
        "matmul_peak_bf16_tflops": peak / 1e12,
        "model_tflops_fwd_bwd": flops / 1e12,
        "rows": rows,
        "ratios": {
            "deepsuite_bf16 / transformers_grouped_mm tokens/s": base["deepsuite_bf16"]
            / base["transformers_grouped_mm"],
            "deepsuite_fp8 / deepsuite_bf16 tokens/s": base["deepsuite_fp8"] / base["deepsuite_bf16"],
        },
        "goal": "deepsuite_bf16 / transformers_grouped_mm >= 1.3",
        "env": env_info(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile", default=None, help="text file to append the kernel tables to")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny layer on CPU (checks the script only)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("skipped: needs CUDA (no GPU visible)")
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    result = run(args.tokens, args.iters, Path(args.profile) if args.profile else None, device)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3f}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
