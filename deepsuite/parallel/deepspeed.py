"""The DeepSpeed engine: our config → a DeepSpeed config dict, engine creation, safe checkpoint loading.

DeepSpeed is imported lazily (and only here and in the rest of `deepsuite.parallel`). On machines
without CUDA the CPU accelerator is selected (`DS_ACCELERATOR=cpu` unless the user set it).
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsuite.config.errors import ConfigError
from deepsuite.config.loader import check_deepspeed_passthrough
from deepsuite.config.schema import Config, TrainingConfig
from deepsuite.parallel.dist import ParallelDims

# What DeepSpeed pickles into its checkpoint files besides tensors and plain containers (found by
# saving ZeRO 0-3, fp32 and bf16 checkpoints of deepspeed 0.19). Loading allows these and nothing
# else: see `safe_globals`.
_DS_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is split: `global = micro × accumulation × data-parallel ranks`."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    dp_size: int


def resolve_batch(t: TrainingConfig, dp_size: int) -> BatchLayout:
    """Derive (or check) gradient accumulation so that global = micro × accumulation × dp."""
    per_pass = t.micro_batch_size * dp_size
    if t.gradient_accumulation_steps == 0:
        if t.global_batch_size % per_pass:
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size × "
                f"data-parallel ranks = {t.micro_batch_size} × {dp_size} = {per_pass}; "
                f"make it a multiple of {per_pass}"
            )
        gas = t.global_batch_size // per_pass
    else:
        gas = t.gradient_accumulation_steps
        if t.global_batch_size != per_pass * gas:
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} is not micro_batch_size × "
                f"gradient_accumulation_steps × data-parallel ranks = {t.micro_batch_size} × {gas} × {dp_size} "
                f"= {per_pass * gas}; fix one of them (or set gradient_accumulation_steps=0 to derive it)"
            )
    return BatchLayout(t.global_batch_size, t.micro_batch_size, gas, dp_size)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(cfg: Config, dims: ParallelDims) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `dims` (raw `parallel.deepspeed` keys merged last).

    Raw keys of the batch layout (`train_batch_size`, `train_micro_batch_size_per_gpu`,
    `gradient_accumulation_steps`) raise a `ConfigError`: they come from `training.*` only.
    """
    layout = resolve_batch(cfg.training, dims.dp_size)
    p = cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update(reduce_bucket_size=p.reduce_bucket_size, overlap_comm=p.overlap_comm)
        if p.zero_stage in (1, 2):
            zero.update(allgather_bucket_size=p.allgather_bucket_size, contiguous_gradients=True)
        if p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.training.dtype == "bf16"},
        "gradient_clipping": cfg.training.grad_clip,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        # a torch optimizer (AdamW) under ZeRO: deepsuite tests this combination itself
        "zero_allow_untested_optimizer": True,
    }
    # the batch layout drives our sampler, loop and schedule: raw overrides of it are refused
    check_deepspeed_passthrough(p.deepspeed)
    return _merge(ds, p.deepspeed)


def import_deepspeed() -> Any:
    """Import DeepSpeed with the right accelerator for this machine."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce used only by its inference
        # path; skipping it saves ~30 s of C++ build per fresh machine and the need for a compiler.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO-3 calls torch's old collective names every step; torch's FutureWarning about them is
    # DeepSpeed's to act on and would otherwise fill every log line of the progress bar.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        category=FutureWarning,
    )
    return deepspeed


def initialize_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """`deepspeed.initialize` with our optimizer and scheduler; returns the engine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


def _resolve(path: str) -> Any:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@contextmanager
def safe_globals() -> Any:
    """Allow torch's weights-only unpickler the few DeepSpeed classes its checkpoints contain."""
    allowed = []
    for path in _DS_SAFE_GLOBALS:
        try:
            allowed.append(_resolve(path))
        except (ImportError, AttributeError):
            continue
    with torch.serialization.safe_globals(allowed):
        yield


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)`: tensors, containers and the allowlisted DeepSpeed classes only."""
    with safe_globals():
        return torch.load(path, map_location=map_location, weights_only=True)


def make_checkpoint_loading_safe(engine: Any) -> None:
    """Make the engine's checkpoint reads go through the weights-only unpickler.

    DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, which runs
    any code a pickle names; here its `load` is replaced, so a planted payload raises instead.
    """
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        return

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    ckpt_engine.load = load


def engine_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's files of one checkpoint tag folder."""
    return sorted(p for p in tag_dir.rglob("*.pt") if p.is_file())
