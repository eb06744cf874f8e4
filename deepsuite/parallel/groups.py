"""Data-, expert- and expert-data-parallel process groups, shared with DeepSpeed.

Layout (DeepSpeed's "E + D" layout, ``deepspeed.utils.groups._create_expert_and_data_parallel``)::

    world = 8, ep_size = 4
    data parallel         [0 1 2 3 4 5 6 7]   dense params: grads averaged over everyone
    expert parallel       [0 1 2 3] [4 5 6 7] all-to-all of tokens; rank r holds experts
                                              [ep_rank·E/ep, (ep_rank+1)·E/ep)
    expert data parallel  [0 4] [1 5] [2 6] [3 7]  replicas of the same experts: expert grads
                                              are reduced here only

We do not build our own groups: we ask DeepSpeed to create them under its name ``ep_size_{ep}``
and use the very same group objects, so the all-to-all in `expert_parallel` and DeepSpeed's
ZeRO-1/2 expert-gradient reduction agree on who holds which expert.

DeepSpeed treats a parameter as an expert parameter when ``param.allreduce is False`` and reads
``param.group_name`` to find its expert-data-parallel group (`deepspeed.moe.utils.is_moe_param`).
The engine only switches that machinery on (``has_moe_layers``) when the model contains a
``deepspeed.moe.layer.MoE`` instance; `DeepSpeedExpertRegistration` is such an instance (it holds
no parameters and never runs) that `expert_parallel.apply_expert_parallel` attaches to each MoE
layer. See `expert_parallel` for why this is the honest way to get EP × ZeRO-1/2 right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepsuite.config.errors import ConfigError


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert groups of size ``ep_size`` (``param.group_name``)."""
    return f"ep_size_{ep_size}"


@dataclass(frozen=True)
class ExpertLayout:
    """Rank arithmetic of the data × expert layout (no communication, usable for planning)."""

    world_size: int
    ep_size: int = 1
    rank: int = 0

    def validate(self, n_routed_experts: int | None = None) -> None:
        """Raise `ConfigError` unless ``ep_size`` divides the world and the number of routed experts."""
        validate_ep_size(self.world_size, self.ep_size, n_routed_experts)

    @property
    def dp_size(self) -> int:
        """Ranks that replicate the dense parameters (all of them: no tensor/pipeline parallelism)."""
        return self.world_size

    @property
    def edp_size(self) -> int:
        """Replicas of each expert shard (the expert-data-parallel group size)."""
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """Position inside the expert-parallel group = index of the expert shard this rank holds."""
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        """Position inside the expert-data-parallel group."""
        return self.rank // self.ep_size

    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's expert-parallel group (consecutive)."""
        start = self.rank - self.ep_rank
        return list(range(start, start + self.ep_size))

    def edp_ranks(self) -> list[int]:
        """Global ranks of this rank's expert-data-parallel group (strided by ep_size)."""
        return list(range(self.ep_rank, self.world_size, self.ep_size))

    def local_expert_range(self, n_routed_experts: int) -> tuple[int, int]:
        """``[start, end)`` of the global expert ids held by this rank."""
        per_rank = n_routed_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def validate_ep_size(world_size: int, ep_size: int, n_routed_experts: int | None = None) -> None:
    """Raise one `ConfigError` naming the key and the fix when ``ep_size`` does not fit."""
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size={ep_size} must be >= 1 (1 = experts replicated on every rank)")
    if world_size % ep_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide the world size {world_size}; "
            f"choose one of {divisors} or change the number of ranks"
        )
    if n_routed_experts is not None and n_routed_experts % ep_size:
        raise ConfigError(
            f"parallel.ep_size={ep_size} does not divide model.n_routed_experts={n_routed_experts}; "
            "choose an ep_size that divides both the world size and the number of routed experts"
        )


def validate_parallel_layout(
    world_size: int, zero_stage: int, ep_size: int, n_routed_experts: int | None = None
) -> None:
    """Raise one `ConfigError` for a data × expert × ZeRO layout deepsuite does not run correctly.

    ``n_routed_experts``: the model's routed experts per MoE layer (0 = no MoE layer, None = unknown).

    Expert parallelism runs under ZeRO-1, 2 or 3. ZeRO-1/2 reduce and partition expert gradients
    and optimizer states over the expert-data-parallel group (DeepSpeed's MoE groups). ZeRO-3
    partitions every parameter it sees over the whole world and refuses native MoE layers, so there
    the routed experts are held outside the engine, whole on each EP rank and replicated over its
    expert-data-parallel group (`expert_parallel.HeldExperts`). The parity tests prove all three
    against one process (2 and 4 ranks, 1e-7 relative). Stage 0 is refused because DeepSpeed's
    non-ZeRO path does not match the single-process reference with expert parameters (2.6e-4
    relative loss drift over 20 steps in the same test); ZeRO-1 costs the same communication and
    less memory.
    """
    if ep_size > 1 and n_routed_experts == 0:
        raise ConfigError(
            f"parallel.ep_size={ep_size} needs a model with routed experts (a DeepSeek-V3 flavor with "
            "model.n_routed_experts > 0); set parallel.ep_size=1"
        )
    validate_ep_size(world_size, ep_size, n_routed_experts)
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={zero_stage} must be 0, 1, 2 or 3")
    if ep_size > 1 and zero_stage == 0:
        raise ConfigError(
            f"parallel.zero_stage=0 with parallel.ep_size={ep_size} is not supported: expert parallelism runs "
            "under ZeRO-1, 2 or 3 (experts are then reduced over their expert-data-parallel replicas only); "
            "set parallel.zero_stage=1, 2 or 3, or parallel.ep_size=1"
        )


@dataclass
class ParallelGroups:
    """The process groups of one run (``None`` groups mean "no communication needed")."""

    layout: ExpertLayout
    ep_group: Any  # ProcessGroup | None
    edp_group: Any  # ProcessGroup | None

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for the expert groups (``param.group_name`` of expert parameters)."""
        return expert_group_name(self.layout.ep_size)


def init_parallel_groups(ep_size: int = 1, n_routed_experts: int | None = None) -> ParallelGroups:
    """Validate ``ep_size`` and create (through DeepSpeed) the expert and expert-data groups.

    Needs an initialised default process group (``deepspeed.init_distributed()`` or
    ``torch.distributed.init_process_group``). With ``ep_size == 1`` no group is created: experts are
    plain replicated parameters and DeepSpeed reduces them like any dense parameter. Every rank
    must call this (``new_group`` is collective).
    """
    if not dist.is_initialized():
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
    layout = ExpertLayout(world_size=world, ep_size=ep_size, rank=rank)
    layout.validate(n_routed_experts)
    if ep_size == 1:
        return ParallelGroups(layout=layout, ep_group=None, edp_group=None)

    from deepsuite.parallel.deepspeed import import_deepspeed

    import_deepspeed()  # first: on CPU it keeps DeepSpeed's shared-memory all-reduce op out (see there)
    import deepspeed.comm as ds_dist
    from deepspeed.utils import groups as ds_groups

    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    name = expert_group_name(ep_size)
    if name not in ds_groups._get_expert_parallel_group_dict():
        # E + D layout: consecutive ranks form an expert-parallel group (cheap all-to-all inside a node).
        ds_groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=False)
    ep_ranks = list(ds_groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(ds_groups._get_expert_data_parallel_group_ranks(name))
    if ep_ranks != layout.ep_ranks() or edp_ranks != layout.edp_ranks():
        raise RuntimeError(
            f"DeepSpeed built expert groups {ep_ranks}/{edp_ranks} for rank {rank}, expected "
            f"{layout.ep_ranks()}/{layout.edp_ranks()} (was use_data_before_expert_parallel set?)"
        )
    return ParallelGroups(
        layout=layout,
        ep_group=ds_groups._get_expert_parallel_group(name),
        edp_group=ds_groups._get_expert_data_parallel_group(name),
    )


def mark_expert_params(module: nn.Module, group_name: str) -> int:
    """Tag every parameter of ``module`` as an expert parameter for DeepSpeed; returns how many.

    ``allreduce=False`` makes `deepspeed.moe.utils.is_moe_param` true; ``group_name`` selects the
    expert-data-parallel group that ZeRO-1/2 (and the non-ZeRO engine) reduce its gradient over.
    """
    count = 0
    for param in module.parameters():
        param.allreduce = False  # type: ignore[attr-defined]
        param.group_name = group_name  # type: ignore[attr-defined]
        count += 1
    return count


def is_expert_param(param: torch.Tensor) -> bool:
    """True for parameters tagged by `mark_expert_params` (DeepSpeed's own test)."""
    return getattr(param, "allreduce", True) is False


def optimizer_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split optimizer param groups so that expert parameters sit in DeepSpeed "moe" groups.

    Each input group needs a unique ``"name"``. Groups without expert parameters are returned
    unchanged; with expert parameters this is DeepSpeed's own
    ``split_params_into_different_moe_groups_for_optimizer`` (one extra group per input group and
    expert group name, flagged ``moe=True``), which ZeRO-1/2 partition over the expert-data-parallel
    group instead of the whole world.
    """
    if not any(is_expert_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def _deepspeed_moe_base() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    return MoE


def make_deepspeed_registration(n_routed_experts: int, ep_size: int) -> nn.Module:
    """A parameter-free ``deepspeed.moe.layer.MoE`` instance that tells the engine "this model has MoE".

    `DeepSpeedEngine` decides ``has_moe_layers`` with ``isinstance(module, MoE)``; only then do the
    ZeRO-1/2 optimizer, the non-ZeRO gradient all-reduce, gradient-norm clipping and the initial
    parameter broadcast handle ``allreduce=False`` parameters per expert-data-parallel group. We
    subclass instead of building a real ``MoE`` (whose TopKGate and Experts we do not use); the
    subclass owns no parameters, so it adds nothing to the state dict, and it reports zero local
    experts so DeepSpeed's per-expert checkpoint files (written from a native layer's own state
    dict) are neither written nor expected: our expert shards stay in the model state and ZeRO
    optimizer files (see `deepsuite.checkpoint.consolidate`).
    """
    moe_cls = _deepspeed_moe_base()

    class DeepSpeedExpertRegistration(moe_cls):  # type: ignore[misc, valid-type]
        """Registers one deepsuite MoE layer with DeepSpeed's expert-parallel machinery."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts = n_routed_experts
            self.ep_size = ep_size
            self.expert_group_name = expert_group_name(ep_size)
            # Zero: DeepSpeed's checkpoint code loops over native experts; ours live elsewhere.
            self.num_local_experts = 0
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by the engine; our groups already exist (`init_parallel_groups`)."""
            if use_data_before_expert_parallel_:
                raise ConfigError(
                    "parallel.deepspeed.use_data_before_expert_parallel=true is not supported: deepsuite "
                    "uses the E + D layout (consecutive ranks share experts); remove the key"
                )
            from deepspeed.utils import groups as ds_groups

            if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
                raise RuntimeError(
                    f"expert groups {self.expert_group_name} do not exist; call "
                    "deepsuite.parallel.groups.init_parallel_groups before deepspeed.initialize"
                )

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("DeepSpeedExpertRegistration is a marker for DeepSpeed and is never called")

        def extra_repr(self) -> str:
            return f"num_experts={self.num_experts}, ep_size={self.ep_size}"

    return DeepSpeedExpertRegistration()
