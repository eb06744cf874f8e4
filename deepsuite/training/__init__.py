"""Training: the DeepSpeed trainer loop, optimizer and LR schedule, metrics logging."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Trainer": "deepsuite.training.trainer",
    "TrainResult": "deepsuite.training.trainer",
    "TrainingDivergedError": "deepsuite.training.trainer",
    "train": "deepsuite.training.trainer",
    "dry_run": "deepsuite.training.trainer",
    "build_optimizer": "deepsuite.training.optim",
    "build_scheduler": "deepsuite.training.optim",
    "lr_factor": "deepsuite.training.optim",
    "param_groups": "deepsuite.training.optim",
    "MetricsLogger": "deepsuite.training.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.training' has no attribute {name!r}")
