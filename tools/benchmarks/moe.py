"""MoE layer benchmark: deepsuite `DeepSeekMoE` vs transformers' `DeepseekV3MoE` on the same weights.

Forward + backward of one MoE layer (64 routed experts, top-6, 2 shared, 8 groups keep 4, d_model
1,024, moe_inter 512, 4,096 tokens, float32, CPU by default) for deepsuite and for transformers with
each of its experts implementations (``eager``: a Python loop over experts with one-hot masks;
``grouped_mm``: tokens sorted by expert and ``torch._grouped_mm``). Outputs and input gradients
are compared before timing. The fraction of a matmul peak (an n³ fp32 matmul timed in the same run)
is printed for each: model FLOPs (router + routed + shared experts, ×3 for forward + backward) per
second over that peak.

    python tools/benchmarks/moe.py [--quick] [--device cpu|cuda] [--json out.json]
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

from deepsuite.layers.moe import DeepSeekMoE

FULL = dict(tokens=4096, d_model=1024, moe_inter=512, experts=64, top_k=6, shared=2, groups=8, keep=4)
QUICK = dict(tokens=1024, d_model=256, moe_inter=128, experts=64, top_k=6, shared=2, groups=8, keep=4)


def build(cfg: dict[str, int], device: str) -> tuple[DeepSeekMoE, dict[str, torch.nn.Module]]:
    """deepsuite's layer and transformers' layers (one per experts implementation), same weights."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    ours = DeepSeekMoE(
        cfg["d_model"],
        cfg["experts"],
        cfg["shared"],
        cfg["top_k"],
        cfg["moe_inter"],
        n_expert_groups=cfg["groups"],
        n_limited_groups=cfg["keep"],
        route_scale=2.5,
    ).to(device)
    ours.init_weights(std=0.02)
    with torch.no_grad():
        ours.gate.weight.normal_(0.0, 0.1)  # spread routing
        ours.e_score_correction_bias.normal_(0.0, 0.01)
    refs: dict[str, torch.nn.Module] = {}
    for impl in ("eager", "grouped_mm"):
        config = transformers.DeepseekV3Config(
            hidden_size=cfg["d_model"],
            moe_intermediate_size=cfg["moe_inter"],
            n_routed_experts=cfg["experts"],
            num_experts_per_tok=cfg["top_k"],
            n_shared_experts=cfg["shared"],
            n_group=cfg["groups"],
            topk_group=cfg["keep"],
            routed_scaling_factor=2.5,
        )
        config._experts_implementation = impl
        ref = DeepseekV3MoE(config).to(device)
        with torch.no_grad():
            ref.gate.weight.copy_(ours.gate.weight)
            ref.gate.e_score_correction_bias.copy_(ours.e_score_correction_bias)
            ref.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            ref.experts.down_proj.copy_(ours.experts.down_proj)
            assert ours.shared_experts is not None
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(ref.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)
        refs[impl] = ref
    return ours, refs


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward + backward; returns (output, input gradient)."""
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    out = module(xi)
    out.backward(grad)
    assert xi.grad is not None
    return out.detach(), xi.grad


def model_flops(cfg: dict[str, int]) -> float:
    """Matmul FLOPs of forward + backward (backward = 2 × forward)."""
    n, d, i = cfg["tokens"], cfg["d_model"], cfg["moe_inter"]
    forward = 2 * n * d * cfg["experts"]  # router
    forward += 2 * n * cfg["top_k"] * 3 * d * i  # routed experts: gate, up, down
    forward += 2 * n * 3 * d * i * cfg["shared"]  # shared experts
    return 3.0 * forward


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Time deepsuite vs transformers (eager, grouped_mm); return results with ratios (medians)."""
    cfg = QUICK if quick else FULL
    ours, refs = build(cfg, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg["tokens"], cfg["d_model"], generator=g, device=device)
    grad = torch.randn(x.shape, generator=g, device=device)

    out, gx = step(ours, x, grad)
    checks = {}
    for impl, ref in refs.items():
        ref_out, ref_gx = step(ref, x, grad)
        checks[impl] = {
            "max_abs_diff_out": float((out - ref_out).abs().max()),
            "max_abs_diff_grad_x": float((gx - ref_gx).abs().max()),
        }
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gx, ref_gx, atol=1e-4, rtol=1e-4)

    iters = 3 if quick else 5
    peak = matmul_peak_flops(device, torch.float32, n=1024 if quick else 2048)
    flops = model_flops(cfg)
    modules: dict[str, torch.nn.Module] = {"deepsuite": ours}
    modules.update({f"transformers_{impl}": ref for impl, ref in refs.items()})
    # interleaved rounds: on a shared machine a neighbour's load then hits every implementation alike
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(iters):
        for name, module in modules.items():
            times[name].append(time_fn(lambda m=module: step(m, x, grad), device, warmup=0, iters=1))
    seconds = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    rows = []
    for name, s in seconds.items():
        rows.append(
            {
                "implementation": name,
                "ms_fwd_bwd": s * 1e3,
                "tokens_per_s": cfg["tokens"] / s,
                "fraction_of_matmul_peak": flops / s / peak,
                "deepsuite_speedup": s / seconds["deepsuite"],
            }
        )
    return {
        "benchmark": "moe",
        "config": {**cfg, "dtype": "float32", "device": device},
        "matmul_peak_gflops": peak / 1e9,
        "model_gflops_fwd_bwd": flops / 1e9,
        "rows": rows,
        # which expert kernel deepsuite's "auto" chose here (see GroupedExperts)
        "deepsuite_experts_kernel": ours.experts._kernel(x.view(-1, cfg["d_model"])),
        "speedup_vs_eager": seconds["transformers_eager"] / seconds["deepsuite"],
        "speedup_vs_grouped_mm": seconds["transformers_grouped_mm"] / seconds["deepsuite"],
        "goal": "speedup_vs_eager >= 4, speedup_vs_grouped_mm >= 1.2",
        "parity": checks,
        "env": env_info(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(quick=args.quick, device=args.device)
    print(
        f"matmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s; model: {result['model_gflops_fwd_bwd']:.1f} GFLOP"
    )
    print_table(result["rows"])
    print(f"deepsuite experts kernel: {result['deepsuite_experts_kernel']}")
    print(
        f"speed-up vs eager {result['speedup_vs_eager']:.2f}x, vs grouped_mm {result['speedup_vs_grouped_mm']:.2f}x "
        f"(goal {result['goal']}); parity {result['parity']}"
    )
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
