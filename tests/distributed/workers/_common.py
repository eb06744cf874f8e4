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


# --- the trainer workers (zero_matrix.py, reshard.py): the same tiny models and batch on every layout

MODELS: dict[str, dict[str, Any]] = {
    "gpt_tied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": True},
    "gpt_untied": {"name": "gpt", "flavor": "gpt2-debug", "tie_embeddings": False},
    "dsv3": {"name": "deepseek_v3", "flavor": "deepseek-v3-debug", "n_layers": 2, "d_model": 64},
}
"""GPT tied and untied, and the default DeepSeek-V3 (one MTP module) shrunk to 2 layers of d 64."""


def training_settings(steps: int, dtype: str = "fp32", **extra: Any) -> dict[str, Any]:
    """The ``training`` section of every case: 8 windows of 32 tokens per step in micro-batches of 2,
    router bias updates and gradient clipping on, no evaluation, samples or MTP acceptance report
    (speculative decoding at the end: 20 s of a 30 s DeepSeek-V3 case under ZeRO-3, where every
    decoded token gathers the parameters)."""
    return {
        "steps": steps,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "eval_every": 1000,
        "eval_batches": 1,
        "sample_tokens": 0,
        "router_bias_update_rate": 0.01,
        "grad_clip": 1.0,
        "dtype": dtype,
        "report_mtp_acceptance": False,
        **extra,
    }


class RouterBiases:
    """Remembers every MoE layer that takes a router-bias step (by wrapping ``DeepSeekMoE.update_bias``)
    so that a worker can read their biases once a run is over. Create after `init`."""

    def __init__(self) -> None:
        # imported here, not at the top: `init` picks DeepSpeed's accelerator before deepsuite loads it
        from deepsuite.layers.moe import DeepSeekMoE

        layers: dict[int, Any] = {}
        original = DeepSeekMoE.update_bias

        def recording(moe: Any, global_load: torch.Tensor, rate: float) -> None:
            layers[id(moe)] = moe
            original(moe, global_load, rate)

        DeepSeekMoE.update_bias = recording  # type: ignore[method-assign]
        self.layers = layers

    def clear(self) -> None:
        """Forget the layers of the previous run."""
        self.layers.clear()

    def gathered(self) -> tuple[torch.Tensor, bool]:
        """The router biases of the last run (flat) and whether every rank holds the very same."""
        biases = [m.gate.e_score_correction_bias.detach().clone() for m in self.layers.values()]
        flat = torch.cat(biases) if biases else torch.zeros(0)
        every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        return flat, all(torch.equal(g, flat) for g in every)
