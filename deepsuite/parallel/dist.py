"""torch.distributed set-up: the process world, its layout, and the few collectives the trainer uses.

Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) describes
the world; without it `init_distributed` makes a world of one on a free local port, so that
`deepsuite train` runs through the same DeepSpeed engine on a laptop.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deepsuite.config.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Where this process sits in the world. With no tensor/pipeline parallelism every rank is a
    data-parallel rank; `ep_size` ranks share one copy of the routed experts."""

    world_size: int
    rank: int
    local_rank: int
    ep_size: int = 1

    @property
    def dp_size(self) -> int:
        """Ranks that each see a different slice of the global batch."""
        return self.world_size

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks."""
        return self.rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes shared files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device this rank computes on."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_backend(backend: str) -> str:
    """`auto` → nccl with CUDA, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    return backend


def world_from_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the launcher's environment; a world of one without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1, 0, 0
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    return world, rank, local


def init_distributed(backend: str = "auto", ep_size: int = 1, timeout_s: float = 1800.0) -> ParallelDims:
    """Join (or create) the process group and return this rank's `ParallelDims`.

    Idempotent: a second call in the same process reuses the group.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
            os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
            os.environ.setdefault("LOCAL_RANK", "0")
        world, rank, local = world_from_env()
        name = resolve_backend(backend)
        if name == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(name, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        # DeepSpeed keeps references to the groups for the life of the process, so the group is
        # destroyed at exit rather than after each run (runs in one process reuse it)
        atexit.register(destroy_distributed)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if ep_size < 1 or world % ep_size:
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide the world size {world}; "
            "choose an ep_size that divides the number of ranks"
        )
    return ParallelDims(world_size=world, rank=rank, local_rank=local, ep_size=ep_size)


def is_initialized() -> bool:
    """Whether a process group exists."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `t` in place over the world (no-op without a process group); returns `t`."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_mean(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Average `t` in place over the world; returns `t`."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t /= dist.get_world_size(group)
    return t


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Maximum of `t` in place over the world; returns `t`."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def amax_reduction_group() -> Any:
    """The process group over which FP8 delayed-scaling amaxes are reduced (every rank: data-parallel
    replicas must agree on their scales), or None in a world of one."""
    if is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def global_rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (pickled over the group: only for small trusted values)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled over the group: only for small trusted values)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_DEEPSPEED_GROUP_REGISTRIES = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_EXPERT_PARALLEL_GROUP_RANKS",
    "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
)


def restore_torch_linear() -> None:
    """Undo DeepSpeed ZeRO-3's process-wide ``torch.nn.functional.linear`` replacement (its
    memory-efficient linear, which adds the bias after rounding under autocast): after a run,
    code in the same process (evaluation, generation, a notebook) gets torch's own linear again."""
    partition = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    holder = getattr(partition, "InsertPostInitMethodToModuleSubClasses", None)
    original = getattr(holder, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def destroy_distributed() -> None:
    """Leave the process group (end of a run).

    DeepSpeed keeps the expert and expert-data parallel groups in module-level dicts, so their
    gloo groups outlived ``destroy_process_group`` and were torn down during interpreter exit:
    on 2 CPU ranks about one exit in six then aborted (SIGABRT, "terminate called without an
    active exception") after a successful run. Those registries are dropped and collected first.
    """
    restore_torch_linear()
    if not is_initialized():
        return
    ds_groups = sys.modules.get("deepspeed.utils.groups")
    for name in _DEEPSPEED_GROUP_REGISTRIES if ds_groups is not None else ():
        registry = getattr(ds_groups, name, None)
        if isinstance(registry, dict):
            registry.clear()
    gc.collect()
    dist.destroy_process_group()
