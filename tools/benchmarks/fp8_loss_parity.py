"""FP8 vs bf16 training loss: the same model, initial weights and batches, trained twice.

    python tools/benchmarks/fp8_loss_parity.py [--model deepseek-v3-xl] [--steps 300] [--batch B]
        [--seq-len T] [--lr LR] [--n-layers N] [--device cuda|cpu] [--data data/shakespeare]
        [--json PATH] [--plot PNG]

Both runs: the model built with ``torch.manual_seed`` (so both start from the same weights), bf16
autocast over fp32 master weights, torch AdamW, linear warm-up then cosine decay, gradient clipping
at 1.0; the second run with native FP8 (``prepare_fp8``, recipe ``current``). Data: windows of
the prepared token shards in ``--data`` (``deepsuite prepare-data --config configs/default.yaml``;
ids < 4096 fit every model's vocabulary), or, without that folder, a learnable synthetic task (a
random first-order Markov chain with peaked transitions). Reports the final loss (mean main
cross-entropy of the last 20 steps) of each run, the relative gap |FP8 − bf16| / bf16 against
issue 17's goal (≤ 0.005) and steps/s of each. The JSON is rewritten as steps finish, so a run
cut short by a timeout keeps its curves. On CPU ``torch._scaled_mm`` is an emulation: the loss
gap means something there, the speed does not.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import REPO_ROOT, cuda_peak_memory_mb, env_info, write_json

from deepsuite.config.families import MODEL_FAMILIES
from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import prepare_fp8
from deepsuite.models import build_model

GOAL_GAP = 0.005  # issue 17: FP8 loss within 0.5 % of bf16 after 300 steps
TAIL = 20  # final loss = mean of the last TAIL steps (one batch is noisy)
FLUSH_EVERY = 25  # steps between loss read-backs (a host sync) and JSON rewrites


def family_of(flavor: str) -> str:
    """The model family that defines ``flavor``."""
    for name, family in MODEL_FAMILIES.items():
        if flavor in family.flavors:
            return name
    known = sorted(f for family in MODEL_FAMILIES.values() for f in family.flavors)
    raise SystemExit(f"unknown --model {flavor!r}; choose from {', '.join(known)}")


def load_tokens(data_dir: Path, vocab_size: int) -> tuple[np.ndarray, str]:
    """The train split of a prepared data folder as int64 ids, or a synthetic Markov chain when the
    folder is missing or its ids do not fit the model's vocabulary."""
    if (data_dir / "meta.json").is_file():
        from deepsuite.data import TokenShards

        shards = TokenShards(data_dir, "train")
        if shards.vocab_size <= vocab_size:
            return shards.read(0, len(shards)), f"{data_dir} ({len(shards):,} train tokens)"
        print(f"{data_dir}: vocabulary {shards.vocab_size} > model's {vocab_size}; using synthetic data")
    return markov_tokens(min(vocab_size, 512), 1 << 18), "synthetic Markov chain (no prepared data)"


def markov_tokens(vocab: int, n_tokens: int, chains: int = 256, seed: int = 0) -> np.ndarray:
    """``n_tokens`` ids from ``chains`` parallel walks of one random first-order Markov chain whose
    transition rows are peaked (a few likely successors per token): learnable, not memorisable."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 3.0, dim=-1)
    length = -(-n_tokens // chains)
    out = torch.empty(chains, length, dtype=torch.long)
    state = torch.randint(0, vocab, (chains,), generator=gen)
    for t in range(length):
        out[:, t] = state
        state = torch.multinomial(probs[state], 1, generator=gen).squeeze(1)
    return out.reshape(-1)[:n_tokens].numpy()


def batch_starts(n_tokens: int, steps: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """(steps, batch) window starts, fixed by ``seed``: both runs see the same batches."""
    if n_tokens < seq_len + 2:
        raise SystemExit(f"the data has {n_tokens} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    return np.random.default_rng(seed).integers(0, n_tokens - seq_len - 1, size=(steps, batch))


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    mode: str,
    name: str,
    flavor: str,
    overrides: dict[str, Any],
    tokens: np.ndarray,
    starts: np.ndarray,
    args: argparse.Namespace,
    report: Any,
) -> dict[str, Any]:
    """Train one run (``mode`` bf16 or native) and return its row; ``report(row)`` after every
    flush so the caller can write partial results."""
    device = torch.device(args.device)
    seq_len = args.seq_len
    torch.manual_seed(args.seed)
    model: nn.Module = build_model(name=name, flavor=flavor, device=device, **overrides)
    row: dict[str, Any] = {"mode": mode, "losses": [], "total_losses": []}
    fp8_ctx = None
    if mode == "native":
        fp8_ctx = prepare_fp8(model, FP8Config(enabled=True, backend="native", recipe="current"))
        row["fp8"] = fp8_ctx.summary.splitlines()[0]
        row["fp8_converted_modules"] = len(fp8_ctx.converted)
        if fp8_ctx.backend != "native":
            row["skipped"] = f"native FP8 does not run on {device}: {'; '.join(fp8_ctx.notes)}"
            return row
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, args.warmup))
    data = torch.from_numpy(tokens)
    offsets = torch.arange(seq_len + 1)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed_from = min(3, args.steps - 1)  # the first steps warm up allocator and kernels
    t_start = time.perf_counter()

    def flush() -> None:
        for main, total in pending:
            row["losses"].append(float(main))
            row["total_losses"].append(float(total))
        pending.clear()
        done = len(row["losses"])
        if done > timed_from:
            row["steps_per_s"] = (done - timed_from) / (time.perf_counter() - t_start)
            row["tokens_per_s"] = row["steps_per_s"] * args.batch * seq_len
        row["steps_done"] = done
        row["final_loss"] = float(np.mean(row["losses"][-TAIL:]))
        if device.type == "cuda":
            row["peak_mem_GiB"] = cuda_peak_memory_mb() / 1024
        report(row)

    for step in range(args.steps):
        if step == timed_from:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        windows = data[torch.from_numpy(starts[step])[:, None] + offsets].to(device, non_blocking=True)
        ids, labels = windows[:, :-1], windows[:, 1:]
        autocast = fp8_ctx.autocast() if fp8_ctx is not None else torch.autocast(device.type, enabled=False)
        with autocast, torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        main = out.metrics.get("main_loss", out.loss) if getattr(out, "metrics", None) else out.loss
        pending.append((torch.as_tensor(main).detach(), out.loss.detach()))
        if (step + 1) % FLUSH_EVERY == 0 or step + 1 == args.steps:
            flush()
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Final losses and their relative gap over the steps both runs finished."""
    bf16, fp8 = rows.get("bf16", {}), rows.get("native", {})
    n = min(len(bf16.get("losses", [])), len(fp8.get("losses", [])))
    if n == 0:
        return {}
    final_bf16 = float(np.mean(bf16["losses"][:n][-TAIL:]))
    final_fp8 = float(np.mean(fp8["losses"][:n][-TAIL:]))
    gap = abs(final_fp8 - final_bf16) / final_bf16
    out: dict[str, Any] = {
        "compared_steps": n,
        "final_loss_bf16": final_bf16,
        "final_loss_fp8": final_fp8,
        "relative_gap": gap,
        "goal": f"<= {GOAL_GAP}",
        "met": gap <= GOAL_GAP,
    }
    if "steps_per_s" in bf16 and "steps_per_s" in fp8:
        out["fp8_over_bf16_steps_per_s"] = fp8["steps_per_s"] / bf16["steps_per_s"]
    return out


def plot(rows: dict[str, dict[str, Any]], title: str, path: Path) -> str:
    """PNG of both loss curves at ``path``; a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, label in (("bf16", "bf16"), ("native", "FP8 (native, current scaling)")):
        if rows.get(mode, {}).get("losses"):
            ax.plot(rows[mode]["losses"], label=label, lw=1, alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (main cross-entropy)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deepseek-v3-xl", help="model flavor (default deepseek-v3-xl)")
    parser.add_argument("--n-layers", type=int, default=None, help="override the flavor's layer count")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default 512 on CUDA, 64 on CPU)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps // 10)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch order")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--data", default="data/shakespeare", help="prepared token shards folder")
    parser.add_argument("--modes", default="bf16,native", help="comma-separated, from bf16,native")
    parser.add_argument("--json", default=None, help="write results (rewritten as steps finish)")
    parser.add_argument("--plot", default=None, help="PNG of both loss curves (needs matplotlib)")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: --device cuda needs CUDA (no GPU visible)")
        return
    if args.seq_len is None:  # CPU bf16 autocast and FP8 emulation are slow: keep a CPU check short
        args.seq_len = 64 if args.device == "cpu" else 512
    if args.steps < 1 or args.batch < 1 or args.seq_len < 1:
        parser.error("--steps, --batch and --seq-len must be >= 1")
    args.warmup = max(1, args.steps // 10) if args.warmup is None else max(1, args.warmup)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("bf16", "native") for m in modes):
        parser.error(f"--modes takes bf16,native; got {args.modes}")

    name = family_of(args.model)
    overrides: dict[str, Any] = {}
    if args.n_layers is not None:
        overrides["n_layers"] = args.n_layers
    vocab = build_model(name=name, flavor=args.model, device="meta", **overrides).args.vocab_size  # type: ignore[union-attr]
    data_dir = Path(args.data) if Path(args.data).is_absolute() else Path.cwd() / args.data
    if not data_dir.exists() and (REPO_ROOT / args.data).exists():
        data_dir = REPO_ROOT / args.data
    tokens, source = load_tokens(data_dir, vocab)
    starts = batch_starts(len(tokens), args.steps, args.batch, args.seq_len, args.seed)
    label = f"{name}/{args.model}" + (f" n_layers={args.n_layers}" if args.n_layers else "")
    result: dict[str, Any] = {
        "env": env_info(args.device),
        "model": label,
        "data": source,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup": args.warmup,
        "final_loss": f"mean main cross-entropy of the last {TAIL} steps",
    }
    if args.device == "cpu":
        result["note"] = "CPU torch._scaled_mm is an emulation: the loss gap is meaningful, speed is not"
    rows: dict[str, dict[str, Any]] = {}
    print(f"{label} on {args.device}: {args.steps} steps of {args.batch}×{args.seq_len} tokens, {source}")

    def report(row: dict[str, Any]) -> None:
        rows[row["mode"]] = row
        result["runs"] = rows
        result["parity"] = compare(rows)
        if args.json:
            write_json({**result, "partial": True}, args.json)
        print(
            f"  {row['mode']:6s} step {row['steps_done']:4d}/{args.steps}  loss {row['losses'][-1]:.4f}"
            f"  steps/s {row.get('steps_per_s', float('nan')):.2f}",
            flush=True,
        )

    for mode in modes:
        row = train(mode, name, args.model, overrides, tokens, starts, args, report)
        rows[mode] = row
        if "skipped" in row:
            print(f"  {mode}: skipped: {row['skipped']}")
    result["runs"] = rows
    result["parity"] = compare(rows)
    if args.plot:
        result["plot"] = plot(rows, f"{label}, {source}, {args.device}", Path(args.plot))
    if args.json:
        write_json(result, args.json)

    for mode, row in rows.items():
        if "final_loss" in row:
            print(
                f"{mode:6s}: final loss {row['final_loss']:.4f}  steps/s {row.get('steps_per_s', float('nan')):.2f}"
                f"  tokens/s {row.get('tokens_per_s', float('nan')):.0f}"
                + (f"  peak {row['peak_mem_GiB']:.1f} GiB" if "peak_mem_GiB" in row else "")
            )
    p = result["parity"]
    if p:
        print(
            f"relative gap |fp8 - bf16| / bf16 = {p['relative_gap']:.4f} over {p['compared_steps']} steps "
            f"(goal {p['goal']}: {'met' if p['met'] else 'NOT met'})"
            + (
                f"; FP8 / bf16 steps/s {p['fp8_over_bf16_steps_per_s']:.2f}"
                if "fp8_over_bf16_steps_per_s" in p
                else ""
            )
        )
    if "plot" in result:
        print("plot:", result["plot"])


if __name__ == "__main__":
    main()
