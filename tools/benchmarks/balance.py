"""Aux-loss-free balancing benchmark: expert load max/mean with the router-bias update on vs off.

Trains the same DeepSeek-V3 config twice from the same seed — once with its
``training.router_bias_update_rate`` (on) and once with the rate set to 0 (off: the biases never
move) — and reports, per run, the final max/mean expert load (worst MoE layer, tokens of the last
logged step counted over the whole world) and its mean over the last 10 % of the logged steps,
with the final validation losses. Both runs' curves go into one PNG (`tools/plot_metrics.py`).
``--from-runs ON OFF`` reads two finished runs instead of training.

    python tools/benchmarks/balance.py --config configs/default.yaml [--json out.json] [--png out.png]
    python tools/benchmarks/balance.py --from-runs runs/default runs/default-nobias
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import env_info, print_table, write_json  # noqa: E402

GOAL = 1.3
KEY = "expert_load/max_over_mean"


def summarize(run_dir: Path) -> dict[str, Any]:
    """Final and tail-mean worst-layer max/mean load, per-layer final loads and final validation loss."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (train the run first, or check the folder)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    loads = [r for r in rows if KEY in r]
    if not loads:
        raise SystemExit(f"error: {path} has no {KEY} records: is it a DeepSeek-V3 (MoE) run?")
    tail = loads[-max(1, len(loads) // 10) :]
    vals = [r for r in rows if "val_loss" in r]
    last = loads[-1]
    rate = None
    if (run_dir / "config.yaml").is_file():
        import yaml

        resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        rate = resolved.get("training", {}).get("router_bias_update_rate")
    return {
        "run": str(run_dir),
        "router_bias_update_rate": rate,
        "steps": int(last["step"]),
        "final_max_over_mean": float(last[KEY]),
        "tail_mean_max_over_mean": sum(float(r[KEY]) for r in tail) / len(tail),
        "final_per_layer": {
            k.split("/", 1)[1]: float(v) for k, v in last.items() if k.startswith("expert_load/")
        },
        "final_val_loss": float(vals[-1]["val_loss"]) if vals else None,
    }


def train_pair(config: str, out_root: Path, overrides: list[str]) -> tuple[Path, Path, float]:
    """Train ``config`` with the bias update on and off into ``out_root/{on,off}``; return the dirs and the rate."""
    from deepsuite.config import load_config
    from deepsuite.data.prepare import prepare_data

    cfg = load_config(config, overrides)
    rate = cfg.training.router_bias_update_rate
    if rate <= 0:
        raise SystemExit(f"error: {config} has training.router_bias_update_rate={rate}: nothing to compare")
    prepare_data(cfg.data, log=lambda _: None)
    dirs = []
    for name, value in (("on", rate), ("off", 0.0)):
        run_dir = out_root / name
        args = [
            *overrides,
            f"training.router_bias_update_rate={value}",
            f"checkpoint.dir={run_dir}",
            f"logging.run_dir={run_dir}",
            "checkpoint.resume=never",
            "checkpoint.every=0",
            "checkpoint.save_final=false",
            "logging.progress=false",
            "training.sample_tokens=0",
            "training.report_mtp_acceptance=false",
        ]
        print(f"training {config} with router_bias_update_rate={value} into {run_dir}", flush=True)
        # a child process per run: each starts from a fresh interpreter, seed and DeepSpeed world
        proc = subprocess.run(
            [sys.executable, "-m", "deepsuite", "train", "--config", config, *args], cwd=ROOT, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"error: training with rate {value} failed (exit {proc.returncode})")
        dirs.append(run_dir)
    return dirs[0], dirs[1], rate


def run(
    quick: bool = False,
    config: str = "configs/default.yaml",
    out_root: str | None = None,
    from_runs: tuple[str, str] | None = None,
    png: str | None = None,
) -> dict[str, Any]:
    """Balance on vs off: final max/mean expert load of both runs (goal ≤ 1.3 with the update on)."""
    rate: float | None = None
    if from_runs is not None:
        on_dir, off_dir = Path(from_runs[0]), Path(from_runs[1])
    else:
        overrides = ["training.steps=30", "training.eval_every=0", "schedule.warmup_steps=5"] if quick else []
        root = Path(out_root) if out_root else Path(tempfile.mkdtemp(prefix="balance-"))
        on_dir, off_dir, rate = train_pair(config, root, overrides)
    on, off = summarize(on_dir), summarize(off_dir)
    if png:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "plot_metrics.py"),
                str(on_dir / "metrics.jsonl"),
                str(off_dir / "metrics.jsonl"),
                "--out",
                png,
            ],
            check=True,
        )
    return {
        "benchmark": "balance",
        "config": config if from_runs is None else None,
        "router_bias_update_rate": rate,
        "quick": quick,
        "on": on,
        "off": off,
        "ratios": {
            "load max/mean on": on["final_max_over_mean"],
            "load max/mean off": off["final_max_over_mean"],
        },
        "goal": f"final max/mean expert load <= {GOAL} with the bias update on",
        "goal_met": on["final_max_over_mean"] <= GOAL,
        "env": env_info("cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/default.yaml", help="DeepSeek-V3 run config to train twice"
    )
    parser.add_argument(
        "--out-root", default=None, help="folder for the two runs (default: a temporary folder)"
    )
    parser.add_argument(
        "--from-runs", nargs=2, metavar=("ON", "OFF"), default=None, help="read two finished runs instead"
    )
    parser.add_argument("--quick", action="store_true", help="30 steps each (a smoke run)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="plot both runs' curves (loss, expert load) here")
    args = parser.parse_args()
    result = run(
        args.quick, args.config, args.out_root, tuple(args.from_runs) if args.from_runs else None, args.png
    )
    print_table(
        [
            {
                "bias update": name,
                "final max/mean": result[name]["final_max_over_mean"],
                "last-10% mean": result[name]["tail_mean_max_over_mean"],
                "val loss": result[name]["final_val_loss"],
            }
            for name in ("on", "off")
        ]
    )
    print(f"goal: {result['goal']} -> {'met' if result['goal_met'] else 'NOT met'}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
