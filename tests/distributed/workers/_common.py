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
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--cases", default="", help="comma-separated case names (worker-specific)")
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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_bytes(engine: Any) -> int:
    """Bytes of this rank's parameter storage (ZeRO-3: its partition)."""
    return sum(
        _nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _nbytes(p) for p in engine.module.parameters()
    )


def grad_bytes(engine: Any) -> int:
    """Bytes of this rank's gradients right after ``engine.backward`` (before ``step``)."""
    opt = engine.optimizer
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:  # ZeRO-3: one flat partition
        return _nbytes(opt.grad_partitions_flat_buffer)
    total = sum(_nbytes(p.grad) for p in engine.module.parameters() if p.grad is not None)
    for value in (getattr(opt, "averaged_gradients", None) or {}).values():  # ZeRO-1/2 partitions
        total += sum(_nbytes(t) for t in (value if isinstance(value, list) else [value]))
    return total


def optimizer_bytes(engine: Any) -> int:
    """Bytes of the AdamW moments plus ZeRO's fp32 master partitions (after a ``step``)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    total = sum(
        _nbytes(v) for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0
    )
    total += sum(_nbytes(t) for t in getattr(opt, "single_partition_of_fp32_groups", []))
    total += sum(_nbytes(t) for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    return total
