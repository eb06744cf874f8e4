"""Model-FLOPs utilisation on CUDA: a ~1B GPT and a small DeepSeek-V3, bf16 vs FP8, in one run.

    python tools/benchmarks/mfu_gpu.py [--quick] [--no-compile] [--models gpt-1b,dsv3-small]
        [--modes bf16,native] [--loss-chunk N] [--profile FILE] [--json PATH]

For each model: tokens/s of full training steps (forward, backward, torch AdamW) with bf16
autocast over fp32 master weights, then the same with FP8 (native `Float8Linear`; Transformer
Engine too when installed), eager and with ``torch.compile`` of every block (the compiled FP8
path fuses the quantisation kernels). MFU = model FLOPs per token × tokens/s / the bf16 matmul
peak measured in this run (8192³ bf16 GEMM); model FLOPs = 6 · N_active + attention (6 · T ·
H · (d_qk + d_v) per layer and token, PaLM's convention, causal not halved). Without CUDA it
reports that and exits. About 3–5 minutes on an H100. ``--profile FILE`` also records two steps
of each configuration with the torch profiler: the kernels that took the most GPU time go to
``FILE`` (appended, one section per configuration) and their shares into the row (``top_kernels``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import RESULTS_DIR, cuda_peak_memory_mb, env_info, matmul_peak_flops, print_table, write_json

# ~1.0B parameters: 12 · 18 · 2048² = 906M in blocks + 103M tied embedding (GPT-2 vocab padded to 64).
GPT_1B = dict(vocab_size=50304, max_seq_len=2048, d_model=2048, n_layers=18, n_heads=16, dropout=0.0)

# d 4096 GPT, 32 heads, d_ffn 4·d: the layer shape of an 8B model, 4 layers
GPT_D4096 = dict(vocab_size=50304, max_seq_len=2048, d_model=4096, n_layers=4, n_heads=32, dropout=0.0)

# name -> (family, flavor, overrides, batch, sequence length, torch.compile of blocks allowed)
MODELS: dict[str, tuple[str, str, dict[str, Any], int, int, bool]] = {
    "gpt-1b": ("gpt", "gpt2-xl", GPT_1B, 16, 2048, True),  # batch 16: 69 % MFU bf16 on an H200
    # compiled blocks run the routed experts eagerly (DeepSeekMoE._routed): no per-routing recompiles
    "dsv3-small": ("deepseek_v3", "deepseek-v3-small", {}, 16, 2048, True),
    "dsv3-large": ("deepseek_v3", "deepseek-v3-large", {}, 8, 2048, True),
    # issue 17's shapes: d 2048 with 64 experts top-6 (16k tokens a step), and 4 layers of an 8B GPT.
    # 12 of deepseek-v3-xl's 24 layers: fp32 masters + grads + Adam moments of all 7.9B parameters
    # (127 GB) leave no room for activations on one GPU; MFU per token is a per-layer figure
    "dsv3-xl": ("deepseek_v3", "deepseek-v3-xl", {"n_layers": 12}, 8, 2048, True),
    "gpt-d4096": ("gpt", "gpt2-xl", GPT_D4096, 8, 2048, True),
}


def _flops_per_token(model: nn.Module, name: str, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, active matmul parameters)."""
    a = model.args  # type: ignore[attr-defined]
    if name == "gpt":
        n_active = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()  # type: ignore[union-attr]
        attn = a.n_layers * 6 * seq_len * a.n_heads * 2 * a.head_dim
        return 6.0 * n_active + attn, n_active
    total = sum(p.numel() for p in model.parameters())
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    routed = sum(
        p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}" and "shared" not in n
    )
    active_routed = routed * a.n_activated_experts / a.n_routed_experts
    head = a.vocab_size * a.d_model * a.mtp_depth  # the shared head runs once more per MTP module
    n_active = int(total - embed - routed + active_routed + head)
    d_qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    n_attn_layers = a.n_layers + a.mtp_depth
    attn = n_attn_layers * 6 * seq_len * a.n_heads * (d_qk + a.v_head_dim)
    return 6.0 * n_active + attn, n_active


def _build(name: str, flavor: str, overrides: dict[str, Any]) -> nn.Module:
    from deepsuite.models import build_model

    torch.manual_seed(0)
    return build_model(name=name, flavor=flavor, device="cuda", **overrides)


def _compile_blocks(model: nn.Module) -> None:
    blocks = model.layers  # type: ignore[union-attr]
    for i in range(len(blocks)):
        blocks[i] = torch.compile(blocks[i])


def measure(
    name: str,
    flavor: str,
    overrides: dict[str, Any],
    mode: str,
    compile_blocks: bool,
    batch: int,
    seq_len: int,
    steps: int,
    peak: float,
    loss_chunk: int | None = None,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    """Tokens/s, MFU and peak memory of ``steps`` timed training steps (after 3 warm-up steps);
    with ``profile_path`` the GPU kernels of two more steps, profiled."""
    from deepsuite.config.schema import FP8Config
    from deepsuite.fp8 import prepare_fp8

    model = _build(name, flavor, overrides)
    flops_per_token, n_active = _flops_per_token(model, name, seq_len)
    fp8_note = ""
    ctx = None
    if mode != "bf16":
        ctx = prepare_fp8(model, FP8Config(enabled=True, backend=mode, recipe="current"))
        fp8_note = ctx.summary.splitlines()[0]
        if ctx.backend != mode:
            return {"model": f"{name}/{flavor}", "mode": mode, "skipped": ctx.summary}
    if loss_chunk is not None and hasattr(model, "loss_chunk_size"):
        model.loss_chunk_size = loss_chunk
    if compile_blocks:
        _compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.args.vocab_size  # type: ignore[attr-defined]
    ids = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    labels = torch.randint(0, vocab, (batch, seq_len), device="cuda")

    def step() -> float:
        autocast = ctx.autocast() if ctx is not None else torch.autocast("cuda", enabled=False)
        with autocast, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    tokens_per_s = batch * seq_len / seconds
    row = {
        "model": f"{name}/{flavor}",
        "mode": mode + ("+compile" if compile_blocks else ""),
        "params_active_M": n_active / 1e6,
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak,
        "peak_mem_GiB": cuda_peak_memory_mb() / 1024,
        "step_ms": seconds * 1e3,
        "batch": batch,
        "seq_len": seq_len,
        "warmup_s": warmup_s,
        "loss": float(loss.detach()),
        "fp8": fp8_note,
    }
    if loss_chunk is not None:
        row["loss_chunk"] = loss_chunk
    if profile_path is not None:
        label = f"{name}/{flavor} {row['mode']}" + (f" loss_chunk={loss_chunk}" if loss_chunk else "")
        row["top_kernels"] = profile_steps(step, profile_path, label)
    return row


def profile_steps(step: Any, path: Path, label: str, steps: int = 2, top: int = 12) -> list[dict[str, Any]]:
    """Profile ``steps`` calls of ``step``; append the kernel table to ``path``; return the ``top``
    kernels by GPU time with their share of all GPU kernel time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()

    def gpu_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    # kernel events only (an aten op's device time repeats its kernels')
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and gpu_us(e) > 0]
    total = sum(gpu_us(e) for e in kernels) or 1.0
    kernels.sort(key=gpu_us, reverse=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    sort_key = (
        "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    )
    with path.open("a") as f:
        f.write(f"\n## {label}: GPU kernel time over {steps} steps: {total / 1e3:.1f} ms\n")
        f.write(events.table(sort_by=sort_key, row_limit=40, max_name_column_width=110) + "\n")
    return [
        {"kernel": e.key[:110], "ms_per_step": gpu_us(e) / 1e3 / steps, "share": gpu_us(e) / total}
        for e in kernels[:top]
    ]


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def run(
    quick: bool = False,
    compile_blocks: bool = True,
    models: list[str] | None = None,
    modes: list[str] | None = None,
    loss_chunk: int | None = None,
    profile_path: Path | None = None,
    batch: int | None = None,
    compile_only: bool = False,
    json_path: Path | None = None,
) -> dict[str, Any]:
    """MFU rows for every (model, mode) and FP8/bf16 tokens/s ratios."""
    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA (no GPU visible)", "env": env_info("cpu")}
    from deepsuite.fp8.te import te_unavailable_reason

    peak_bf16 = matmul_peak_flops("cuda", torch.bfloat16)
    result: dict[str, Any] = {"env": env_info("cuda"), "matmul_peak_bf16_tflops": peak_bf16 / 1e12}
    te_reason = te_unavailable_reason()
    if modes is None:
        modes = ["bf16", "native"] + (["te"] if te_reason is None else [])
    elif "te" in modes and te_reason is not None:
        result["te_skipped"] = te_reason
        modes = [m for m in modes if m != "te"]
    steps = 5 if quick else 10
    compile_options = [True] if compile_only else [False, True] if compile_blocks else [False]
    rows = []
    for key in models or ["gpt-1b", "dsv3-small"]:
        name, flavor, overrides, default_batch, seq, compilable = MODELS[key]
        for use_compile in compile_options:
            if use_compile and not compilable:
                continue
            for mode in modes:
                try:
                    rows.append(
                        measure(
                            name,
                            flavor,
                            overrides,
                            mode,
                            use_compile,
                            batch or default_batch,
                            seq,
                            steps,
                            peak_bf16,
                            loss_chunk=loss_chunk,
                            profile_path=profile_path,
                        )
                    )
                except Exception as err:  # report and go on with the next configuration
                    rows.append(
                        {
                            "model": f"{name}/{flavor}",
                            "mode": mode + ("+compile" if use_compile else ""),
                            "error": f"{type(err).__name__}: {str(err)[:300]}",
                        }
                    )
                _free_cuda()
                if json_path is not None:  # what is done survives a timeout
                    write_json({**result, "rows": rows, "partial": True}, json_path)
                print_table([rows[-1]], ["model", "mode", "tokens_per_s", "mfu", "peak_mem_GiB", "step_ms"])
    result["rows"] = rows
    ratios: dict[str, float] = {}
    by_key = {(r["model"], r["mode"]): r for r in rows if "tokens_per_s" in r}
    for (model, mode), r in by_key.items():
        base_mode = "bf16+compile" if mode.endswith("+compile") else "bf16"
        base = by_key.get((model, base_mode))
        if base and mode != base_mode:
            ratios[f"{model} {mode} / {base_mode} tokens/s"] = r["tokens_per_s"] / base["tokens_per_s"]
    result["ratios"] = ratios
    result["goals"] = {"mfu_bf16_dense": ">= 0.45", "fp8_over_bf16_tokens_per_s": ">= 1.3"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 timed steps instead of 10")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--models", default="gpt-1b,dsv3-small", help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument("--modes", default=None, help="comma-separated: bf16,native,te (default all usable)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default per model)")
    parser.add_argument("--compile-only", action="store_true", help="only the torch.compile rows")
    parser.add_argument("--loss-chunk", type=int, default=None, help="rows per fused linear-CE chunk")
    parser.add_argument("--profile", default=None, help="text file to append kernel tables to")
    parser.add_argument(
        "--json", default=None, help="results JSON (default tools/benchmarks/results/mfu_<gpu>.json)"
    )
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {', '.join(MODELS)}")
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    if modes and any(m not in ("bf16", "native", "te") for m in modes):
        parser.error(f"--modes takes bf16, native, te; got {args.modes}")
    json_path = Path(args.json) if args.json else None
    result = run(
        quick=args.quick,
        compile_blocks=not args.no_compile,
        models=models,
        modes=modes,
        loss_chunk=args.loss_chunk,
        profile_path=Path(args.profile) if args.profile else None,
        batch=args.batch,
        compile_only=args.compile_only,
        json_path=json_path,
    )
    if "skipped" in result:
        print("skipped:", result["skipped"])
        return
    print(f"\nbf16 matmul peak measured: {result['matmul_peak_bf16_tflops']:.1f} TFLOP/s")
    print_table(
        result["rows"], ["model", "mode", "tokens_per_s", "mfu", "peak_mem_GiB", "step_ms", "warmup_s"]
    )
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3f}")
    gpu = result["env"]["device_name"].replace(" ", "_")
    write_json(result, args.json or RESULTS_DIR / f"mfu_{gpu}.json")


if __name__ == "__main__":
    main()
