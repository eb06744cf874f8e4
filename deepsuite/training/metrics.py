"""Metrics: `metrics.jsonl` in the run folder (one JSON object per line) and wandb when enabled."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from deepsuite.config.schema import Config, LoggingConfig

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends records to `run_dir/metrics.jsonl` (rank 0 only) and mirrors them to wandb."""

    def __init__(self, cfg: Config, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(cfg.logging.run_dir) / METRICS_FILE
        self.wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")  # a fresh run starts a fresh file
        else:
            self._truncate_after(resume_step)
        if cfg.logging.wandb:
            self.wandb = _init_wandb(cfg.logging, cfg)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (logged by a run that was stopped before its next checkpoint)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold `step`)."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            step = clean.pop("step")
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        """Finish the wandb run."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _init_wandb(log_cfg: LoggingConfig, cfg: Config) -> Any:
    try:
        import wandb
    except ImportError:
        raise NotImplementedError("logging.wandb=true needs the `wandb` package: pip install wandb") from None
    from deepsuite.config.loader import config_to_dict

    return wandb.init(
        project=log_cfg.wandb_project,
        name=log_cfg.wandb_run_name or None,
        mode=log_cfg.wandb_mode,
        dir=log_cfg.run_dir,
        config=config_to_dict(cfg),
    )
