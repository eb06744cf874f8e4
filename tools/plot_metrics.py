"""Plot `metrics.jsonl` files (one or several runs) into one PNG: loss (train and validation), learning
rate, throughput, and expert load when the runs logged it.

    python tools/plot_metrics.py runs/default/metrics.jsonl [runs/other/metrics.jsonl …] --out metrics.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_runs(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Records per run (named by the run folder), the last record of a step winning."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        name = path.parent.name if len(paths) == 1 or path.parent.name else str(path)
        runs[name if name not in runs else str(path)] = rows
    return runs


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, one value per step (the last logged)."""
    by_step: dict[int, float] = {}
    for r in rows:
        if key in r and isinstance(r[key], int | float):
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """Write the figure to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    expert = any(k.startswith("expert_load/max") for rows in runs.values() for r in rows for k in r)
    panels = ["loss", "lr", "tokens_per_s"] + (["expert_load/max_over_mean"] if expert else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name, rows in runs.items():
            if key == "loss":
                # the next-token loss when the run logged it apart from MTP (comparable with the
                # validation loss, which is the next-token loss), else the optimised loss
                main = "main_loss" if any("main_loss" in r for r in rows) else "loss"
                steps, values = series(rows, main)
                line = ax.plot(steps, values, label=f"{name} train")[0] if steps else None
                vsteps, vvalues = series(rows, "val_loss")
                if vsteps:
                    color = line.get_color() if line is not None else None
                    ax.plot(vsteps, vvalues, "o--", color=color, label=f"{name} val")
                msteps, mvalues = series(rows, "mtp_loss_1")
                if msteps:
                    color = line.get_color() if line is not None else None
                    ax.plot(msteps, mvalues, ":", color=color, alpha=0.6, label=f"{name} train MTP depth 1")
                continue
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, label=name)
        ax.set_title(
            {"loss": "loss", "lr": "learning rate", "tokens_per_s": "tokens / s"}.get(
                key, "expert load max/mean"
            )
        )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot deepsuite metrics.jsonl files into a PNG.")
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl file(s), one per run")
    parser.add_argument(
        "--out", type=Path, default=Path("metrics.png"), help="PNG to write (default metrics.png)"
    )
    args = parser.parse_args(argv)
    plot(read_runs(args.metrics), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
