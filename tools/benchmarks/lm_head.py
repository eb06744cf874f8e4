"""LM-head loss benchmark: chunked `linear_cross_entropy` vs materialised logits + ``F.cross_entropy``.

Forward + backward of the loss of ``hidden (N, D) @ weight (V, D).T`` against random labels, at
DeepSeek-V3's vocabulary (V = 129,280), N = 8,192 tokens, D = 1,024, float32 on CPU by default.

Peak memory: each variant runs in its own fresh Python process; the figure is the growth of the
process's peak RSS (``ru_maxrss``) over a baseline taken after the inputs are allocated and filled.
Both variants return the same gradients (``grad_weight`` (V, D) and ``grad_hidden``), so the
difference is what the loss itself needs: the materialised logits and their softmax/gradient copies
for the reference, one chunk of logits for the chunked version. On CUDA the figure is
``torch.cuda.max_memory_allocated`` over the same baseline.

    python tools/benchmarks/lm_head.py [--quick] [--device cpu|cuda] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import env_info, max_rss_mb, print_table, run_isolated, sync, write_json

from deepsuite.loss import linear_cross_entropy
from deepsuite.loss.linear_cross_entropy import chunk_rows

FULL = {"vocab": 129_280, "tokens": 8_192, "d_model": 1_024}
QUICK = {"vocab": 32_000, "tokens": 1_024, "d_model": 256}
VARIANTS = ("naive", "chunked")


def _loss(variant: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if variant == "naive":
        return F.cross_entropy(hidden @ weight.T, labels)  # (N, V) logits materialised
    return linear_cross_entropy(hidden, weight, labels)


def worker(args: dict[str, Any]) -> dict[str, Any]:
    """One variant in this (fresh) process: time and peak memory of ``repeats`` forward+backward."""
    device = torch.device(args["device"])
    n, v, d = args["tokens"], args["vocab"], args["d_model"]
    g = torch.Generator(device=device).manual_seed(0)
    # Filled in place: a temporary freed here would raise the baseline peak (ru_maxrss) and hide
    # part of what the variants need.
    hidden = torch.empty(n, d, device=device).normal_(generator=g).requires_grad_()
    weight = torch.empty(v, d, device=device).normal_(std=0.02, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = max_rss_mb()

    times = []
    loss_value = float("nan")
    for _ in range(args["repeats"]):
        hidden.grad = weight.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = _loss(args["variant"], hidden, weight, labels)
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        loss_value = loss.item()
        del loss
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max_rss_mb()
    return {
        "variant": args["variant"],
        "time_s": min(times),
        "times_s": times,
        "peak_mb": peak - baseline,
        "loss": loss_value,
        "grad_weight_norm": weight.grad.norm().item() if weight.grad is not None else None,
    }


def run(quick: bool = False, device: str = "cpu", repeats: int | None = None) -> dict[str, Any]:
    """Both variants, each in a fresh process; ratios are chunked / naive from this run."""
    size = QUICK if quick else FULL
    repeats = repeats or (3 if quick else 2)
    load_before = os.getloadavg()
    rows = []
    for variant in VARIANTS:
        rows.append(
            run_isolated(__file__, {"variant": variant, "device": device, "repeats": repeats, **size})
        )
    naive, chunked = rows
    logits_mb = size["tokens"] * size["vocab"] * 4 / 2**20
    weight_grad_mb = size["vocab"] * size["d_model"] * 4 / 2**20
    for row in rows:
        # ru_maxrss growth below what the weight gradient alone needs: the process reused memory
        # freed before its baseline (the allocator's pages), so the figure is not a measurement
        row["peak_mb_trusted"] = row["peak_mb"] >= weight_grad_mb
    if not all(row["peak_mb_trusted"] for row in rows):
        print(
            f"warning: a peak below the {weight_grad_mb:.0f} MiB weight gradient was measured "
            f"({[round(r['peak_mb']) for r in rows]} MiB): memory ratio unreliable; run lm_head alone",
            file=sys.stderr,
        )
    return {
        "benchmark": "lm_head",
        "config": {**size, "dtype": "float32", "device": device, "repeats": repeats},
        "chunk_tokens": chunk_rows(4096, size["vocab"]),
        "logits_mb": logits_mb,
        "rows": rows,
        "memory_ratio": chunked["peak_mb"] / naive["peak_mb"],
        "time_ratio": chunked["time_s"] / naive["time_s"],
        "ratios": {
            "chunked/naive peak memory": chunked["peak_mb"] / naive["peak_mb"],
            "chunked/naive time": chunked["time_s"] / naive["time_s"],
        },
        "loss_abs_diff": abs(chunked["loss"] - naive["loss"]),
        "grad_weight_norm_rel_diff": abs(chunked["grad_weight_norm"] - naive["grad_weight_norm"])
        / naive["grad_weight_norm"],
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "env": env_info(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"small size {QUICK} instead of {FULL}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed iterations per variant (min is reported)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results dict here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    result = run(quick=args.quick, device=args.device, repeats=args.repeats)
    cfg = result["config"]
    print(
        f"LM head loss, fwd+bwd: V={cfg['vocab']} N={cfg['tokens']} D={cfg['d_model']} float32 on {cfg['device']}, "
        f"{result['env']['torch_threads']} threads; full logits {result['logits_mb']:.0f} MiB, "
        f"chunk {result['chunk_tokens']} tokens"
    )
    print_table(
        [{k: r[k] for k in ("variant", "time_s", "peak_mb", "loss")} for r in result["rows"]],
        ["variant", "time_s", "peak_mb", "loss"],
    )
    print(
        f"chunked/naive: memory {result['memory_ratio']:.3f}x, time {result['time_ratio']:.3f}x "
        f"(|loss diff| {result['loss_abs_diff']:.2e}, load average {result['load_average_before_after']})"
    )
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
