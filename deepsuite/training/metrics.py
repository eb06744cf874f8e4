"""Metrics: `metrics.jsonl` in the run folder (one JSON object per line) and wandb when enabled.

The wandb run id is kept in `run_dir/wandb_run_id`; a resumed run passes it to `wandb.init` with
`resume="allow"`, so its metrics continue the same wandb run instead of starting a new one.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from deepsuite.config.loader import config_to_dict
from deepsuite.config.schema import Config, LoggingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
"""File in `logging.run_dir` holding the wandb run id, so that a resumed run continues the same wandb run."""


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
            self.wandb = _init_wandb(cfg.logging, cfg, resume=resume_step is not None)

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


def wandb_run_id(run_dir: str | os.PathLike[str], resume: bool) -> str:
    """The wandb run id of `run_dir`: the stored one when resuming, else a new one (stored).

    A fresh run (or a resumed one whose folder holds no id yet) draws a new id and writes it to
    `run_dir/wandb_run_id`; a resumed run reads it back, so wandb continues the same run.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if resume and path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    run_id = uuid.uuid4().hex[:12]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return run_id


def _init_wandb(log_cfg: LoggingConfig, cfg: Config, resume: bool = False) -> Any:
    try:  # imported only when asked for: wandb takes seconds to import
        import wandb
    except ImportError:
        raise NotImplementedError("logging.wandb=true needs the `wandb` package: pip install wandb") from None
    return wandb.init(
        project=log_cfg.wandb_project,
        name=log_cfg.wandb_run_name or None,
        mode=log_cfg.wandb_mode,
        dir=log_cfg.run_dir,
        config=config_to_dict(cfg),
        id=wandb_run_id(log_cfg.run_dir, resume),
        resume="allow",
    )
