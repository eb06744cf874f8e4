"""Shared setup for the torchrun workers (imported by path: the workers run as scripts)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def init(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--out`` (and friends), join the gloo world, make math deterministic."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return args


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Rank 0 writes the JSON result the pytest side reads."""
    if dist.get_rank() == 0 and args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    dist.barrier()
