"""Expert parallelism applied from outside the model: local expert shards + all-to-all token exchange.

`apply_expert_parallel(model, groups)` walks the model, and for every `DeepSeekMoE` module

1. keeps only its local experts: rank with expert-parallel rank ``r`` holds the stacked expert
   weights ``[r·E/ep, (r+1)·E/ep)`` (sliced from the full ``[E, …]`` tensors, same parameter names),
2. swaps its ``dispatcher`` for `AllToAllDispatcher`, which sends every (token, expert)
   pair to the rank that holds the expert with ``all_to_all_single`` (uneven splits), runs the
   local experts on contiguous per-expert slices, and brings the results back with the reverse
   all-to-all before the routing-weighted combine,
3. under ZeRO-1/2: tags the local expert parameters for DeepSpeed (``allreduce=False``,
   ``group_name``) and attaches a parameter-free ``deepspeed.moe.layer.MoE`` registration, so the
   DeepSpeed engine reduces expert gradients over the expert-data-parallel group only (see `groups`);
   under ZeRO-3: holds the local experts out of the engine (`HeldExperts`): whole on each EP rank,
   replicated over its expert-data-parallel group, stepped by their own AdamW.

The router, its bias and the shared experts stay replicated (plain data parallel). The model code
never sees any of this: it calls ``dispatcher.dispatch``, its (now local) experts and
``dispatcher.combine`` exactly as on one device.

Why not DeepSpeed's AutoEP: it rejects the aux-loss-free router bias (``load_balance_coeff``) that
DeepSeek-V3 trains with, and it replaces our MoE module with its own, so the EP=2 vs EP=1 parity
that the tests prove here would be a parity of a different layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepsuite.parallel.groups import (
    ExpertLayout,
    ParallelGroups,
    expert_group_name,
    init_parallel_groups,
    is_expert_param,
    make_deepspeed_registration,
    mark_expert_params,
    validate_parallel_layout,
)


class _AllToAllSingle(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: Any
    ) -> Tensor:
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(
            out,
            x.contiguous(),
            output_split_sizes=output_splits,
            input_split_sizes=input_splits,
            group=group,
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(
            out,
            grad.contiguous(),
            output_split_sizes=ctx.input_splits,
            input_split_sizes=ctx.output_splits,
            group=ctx.group,
        )
        return out, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: Any = None) -> Tensor:
    """Differentiable uneven all-to-all along dim 0.

    Rows ``x[sum(input_splits[:j]) : sum(input_splits[:j+1])]`` go to rank ``j`` of ``group``; the
    result holds, in rank order, the ``output_splits[j]`` rows received from rank ``j``.
    """
    return _AllToAllSingle.apply(x, output_splits, input_splits, group)


def exchange_counts(counts: Tensor, group: Any = None) -> Tensor:
    """All-to-all of per-expert token counts: ``counts`` [E] int64 -> received [ep · L].

    ``received[s · L + l]`` is how many tokens rank ``s`` sends to my local expert ``l``.
    """
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


class AllToAllDispatcher(nn.Module):
    """`DeepSeekMoE`'s dispatcher across an expert-parallel group (same protocol as `TokenDispatcher`).

    ``dispatch``: sort the ``N·k`` token copies by global expert id (= by destination rank) →
    exchange per-expert counts → uneven all-to-all of the rows → regroup the received rows
    (grouped [source rank][local expert]) by local expert. ``combine``: undo the regroup → reverse
    all-to-all → unsort and sum with the routing weights (``index_add`` over tokens). Both
    all-to-alls are differentiable (`all_to_all`).

    An ``nn.Module`` only so that its `DeepSpeedExpertRegistration` child (no parameters) is part of
    the model, where the DeepSpeed engine looks for MoE layers.
    """

    def __init__(self, n_routed_experts: int, groups: ParallelGroups, register: bool = True) -> None:
        super().__init__()
        self.n_experts = n_routed_experts
        self.ep_size = groups.layout.ep_size
        self.n_local_experts = n_routed_experts // self.ep_size
        self.ep_rank = groups.layout.ep_rank
        self.layout = groups.layout
        self._ep_group = groups.ep_group  # a process group is not module state
        if register:  # ZeRO-1/2 only: ZeRO-3 refuses native MoE layers (see `HeldExperts`)
            self.deepspeed_moe_registration = make_deepspeed_registration(n_routed_experts, self.ep_size)

    def dispatch(self, x: Tensor, indices: Tensor) -> tuple[Tensor, list[int], Any]:
        """``x`` (N, D), global expert ``indices`` (N, k) -> rows for my local experts, grouped by expert."""
        ep, n_local = self.ep_size, self.n_local_experts
        top_k = indices.shape[1]
        flat = indices.flatten()  # (N·k,)
        order = flat.argsort(stable=True)  # copies grouped by expert = by destination rank
        token_ids = order // top_k  # (N·k,)
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        received_counts = exchange_counts(counts, self._ep_group)  # (ep·L,) [source][local expert]
        input_splits = counts.view(ep, n_local).sum(1).tolist()
        output_splits = received_counts.view(ep, n_local).sum(1).tolist()
        received = all_to_all(x[token_ids], output_splits, input_splits, self._ep_group)  # (S, D)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(ep * n_local, device=x.device) % n_local, received_counts
        )
        regroup = local_expert_of_row.argsort(stable=True)  # [source][expert] -> [expert][source]
        local_counts = received_counts.view(ep, n_local).sum(0).tolist()  # (L,)
        return received[regroup], local_counts, (order, token_ids, regroup, input_splits, output_splits)

    def combine(self, y_sorted: Tensor, weights: Tensor, state: Any) -> Tensor:
        """Expert outputs back to their tokens: ``out[t] = Σ_j weights[t, j] · y(copy j of t)`` (N, D)."""
        order, token_ids, regroup, input_splits, output_splits = state
        received_order = y_sorted.new_empty(y_sorted.shape).index_copy(0, regroup, y_sorted)  # undo regroup
        returned = all_to_all(received_order, input_splits, output_splits, self._ep_group)  # (N·k, D)
        w = weights.flatten()[order].to(returned.dtype)  # (N·k,)
        out = returned.new_zeros(weights.shape[0], returned.shape[-1])
        return out.index_add(0, token_ids, returned * w[:, None])

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, ep_size={self.ep_size}, local={self.n_local_experts}"


def shard_stacked_experts(experts: nn.Module, ep_rank: int, ep_size: int) -> int:
    """Keep rows ``[ep_rank·E/ep, (ep_rank+1)·E/ep)`` of every stacked ``[E, …]`` parameter in place.

    Parameter names stay the same (so state-dict keys do not change); only their first dimension
    shrinks. Returns the new number of local experts.
    """
    n_local = None
    for name, param in list(experts.named_parameters(recurse=False)):
        n_total = param.shape[0]
        if n_total % ep_size:
            raise ValueError(f"{name}: {n_total} experts are not divisible by ep_size={ep_size}")
        n_local = n_total // ep_size
        local = param.detach()[ep_rank * n_local : (ep_rank + 1) * n_local].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=param.requires_grad))
    if n_local is None:
        raise ValueError(f"{type(experts).__name__} has no stacked expert parameters to shard")
    return n_local


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every MoE layer that expert parallelism applies to.

    A layer qualifies when it follows the dispatch-hook contract of `deepsuite.layers.moe.DeepSeekMoE`:
    stacked ``[E, …]`` experts in ``.experts``, ``.n_routed_experts`` and a swappable ``.dispatcher``.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "dispatcher") and hasattr(m, "experts") and hasattr(m, "n_routed_experts")
    ]


def apply_expert_parallel(model: nn.Module, groups: ParallelGroups, zero_stage: int = 1) -> nn.Module:
    """Shard the routed experts of every `DeepSeekMoE` over the EP group and route tokens by all-to-all.

    Call before ``deepspeed.initialize`` (the engine must see the registration modules and the
    ``allreduce=False`` tags, or, under ZeRO-3, must no longer see the experts) and after the weights
    are initialised or loaded: each rank slices its shard out of the full expert tensors, so every
    rank must start from the same full weights (same seed, or loaded from the same checkpoint).
    No-op when ``ep_size == 1``.
    """
    if groups.layout.ep_size == 1:
        return model
    ep_size, ep_rank = groups.layout.ep_size, groups.layout.ep_rank
    layers = expert_parallel_modules(model)
    if not layers:
        raise ValueError(
            f"parallel.ep_size={ep_size} but {type(model).__name__} has no DeepSeekMoE layer; set parallel.ep_size=1"
        )
    held: dict[str, nn.Parameter] = {}
    for name, moe in layers:
        n_experts = int(moe.n_routed_experts)  # type: ignore[arg-type]
        experts: nn.Module = moe.experts  # type: ignore[assignment]
        experts.n_experts = shard_stacked_experts(experts, ep_rank, ep_size)  # type: ignore[assignment]
        mark_expert_params(experts, expert_group_name(ep_size))
        # nn.Module: registered as a child
        moe.dispatcher = AllToAllDispatcher(n_experts, groups, register=zero_stage != 3)
        if zero_stage == 3:
            held.update(_hold_out_of_module_tree(experts, f"{name}.experts" if name else "experts"))
    if held:
        setattr(model, HELD_EXPERTS_ATTR, HeldExperts(held, groups))
    return model


def _hold_out_of_module_tree(experts: nn.Module, prefix: str) -> dict[str, nn.Parameter]:
    """Unregister the parameters of ``experts`` but keep them as plain attributes (the forward reads
    ``self.gate_up_proj`` as before; ``parameters()``, ``state_dict()`` and ZeRO-3 no longer see them)."""
    held = {}
    for name in list(experts._parameters):
        param = experts._parameters.pop(name)
        if param is None:
            continue
        experts.__dict__[name] = param  # found by attribute lookup before nn.Module.__getattr__
        held[f"{prefix}.{name}"] = param
    return held


# --- ZeRO-3 × EP: experts held outside the engine --------------------------------------------------
#
# DeepSpeed 0.19's ZeRO-3 partitions every parameter it sees over the whole data-parallel group and
# refuses native MoE layers; its expert-aware placement (``ds_zero_placement_family="autoep_expert"``)
# is tied to AutoEP's own layer, whose checkpoint code reads AutoEP's metadata and which rejects the
# aux-loss-free router bias. So under ZeRO-3 the routed experts stay out of the engine: each EP rank
# keeps its ``E/ep`` experts whole, replicated over its expert-data-parallel group, and `HeldExperts`
# does for them what ZeRO does for the dense parameters, with the same arithmetic.

HELD_EXPERTS_ATTR = "held_experts"
"""Attribute of the model holding its `HeldExperts` (a plain Python attribute, not module state)."""


class HeldExperts:
    """The routed-expert shards of a ZeRO-3 × EP run, outside the DeepSpeed engine.

    Per optimizer step (the trainer calls these in order):

    1. `reduce_gradients` (after the last micro-batch's backward, before ``engine.step``): sum the
       expert gradients over the expert-data-parallel group and divide by the world size, as DeepSpeed
       averages dense gradients (every token of the world reached these experts through the EP
       all-to-all of some replica; ``engine.backward`` already divided by the accumulation steps).
    2. ``engine.step``: the hook installed by `attach` adds the experts' norm to the norm groups of
       DeepSpeed's ZeRO-3 optimizer, so it clips the dense partitions by the joint norm and reports it.
    3. `step`: clip the expert gradients by the same joint norm (DeepSpeed's formula), then their own
       AdamW (same hyper-parameters, the learning rate the engine's scheduler used for this step).

    Under bf16 the held parameters are bf16 (as DeepSpeed casts the dense ones) and the optimizer
    steps fp32 masters; under fp32 the parameters are their own masters.
    """

    def __init__(self, params: dict[str, nn.Parameter], groups: ParallelGroups) -> None:
        self.params = params
        self.masters = params
        self.layout = groups.layout
        self._ep_group = groups.ep_group
        self._edp_group = groups.edp_group
        self.optimizer: torch.optim.Optimizer | None = None

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Hold the parameters in ``dtype`` (the engine's) with fp32 masters for the optimizer."""
        if dtype == torch.float32:
            return
        self.masters = {n: nn.Parameter(p.detach().float().clone()) for n, p in self.params.items()}
        for p in self.params.values():
            p.data = p.data.to(dtype)

    def attach(self, engine: Any) -> None:
        """Make the engine's ZeRO-3 optimizer count the experts in its gradient norm (and clipping)."""
        ds_optimizer = engine.optimizer
        norm_groups = getattr(ds_optimizer, "_get_norm_groups", None)
        if norm_groups is None:
            raise RuntimeError(
                f"{type(ds_optimizer).__name__} has no _get_norm_groups: ZeRO-3 × expert parallelism needs "
                "the ZeRO-3 optimizer of DeepSpeed 0.19"
            )

        def with_experts() -> list[Tensor]:
            groups = list(norm_groups())
            scale = float(getattr(ds_optimizer, "loss_scale", 1.0))
            return [*groups, self.grad_norm().to(groups[0].device) * scale]

        ds_optimizer._get_norm_groups = with_experts

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the expert gradients like DeepSpeed's dense ones (see the class docstring)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        flat = torch.cat([g.reshape(-1).float() for g in grads])  # one collective for all layers
        if self.layout.edp_size > 1:
            dist.all_reduce(flat, group=self._edp_group)
        flat /= self.layout.world_size
        offset = 0
        for param, master in zip(self.params.values(), self.masters.values(), strict=True):
            param.grad = None
            master.grad = flat[offset : offset + master.numel()].view_as(master).clone()
            offset += master.numel()

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """L2 norm of every expert gradient of the world (each expert counted once: summed over EP)."""
        squares = torch.zeros((), dtype=torch.float32, device=next(iter(self.masters.values())).device)
        for master in self.masters.values():
            if master.grad is not None:
                squares += master.grad.float().pow(2).sum()
        if self.layout.ep_size > 1:
            dist.all_reduce(squares, group=self._ep_group)
        return squares.sqrt()

    @torch.no_grad()
    def step(self, lr: float, clip: float, total_norm: float | None) -> None:
        """Clip by the joint ``total_norm`` (as DeepSpeed's ZeRO-3 does) and step the experts' AdamW."""
        if self.optimizer is None:
            raise RuntimeError("HeldExperts.step before an optimizer was set")
        if clip > 0 and total_norm is not None:
            norm = torch.tensor(float(total_norm), dtype=torch.float32)
            scale = 1.0 / torch.clamp((norm + 1e-6) / clip, min=1.0)
            for master in self.masters.values():
                if master.grad is not None:
                    master.grad.mul_(scale.to(master.grad.device))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for param, master in zip(self.params.values(), self.masters.values(), strict=True):
            master.grad = None
            if param is not master:
                param.copy_(master)

    def numel(self) -> int:
        """Expert elements held on this rank."""
        return sum(p.numel() for p in self.params.values())

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": fp32 masters, "optimizer": {name: AdamW state}}`` (tensors only: weights-only loadable)."""
        optimizer: dict[str, dict[str, Tensor]] = {}
        if self.optimizer is not None:
            for name, master in self.masters.items():
                state = self.optimizer.state.get(master)
                if state:
                    optimizer[name] = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in state.items()}
        tensors = {n: m.detach().float().cpu().clone() for n, m in self.masters.items()}
        return {"tensors": tensors, "optimizer": optimizer}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, Any], source: str) -> None:
        """Restore the masters, parameters and AdamW state written by `state_dict`."""
        tensors, optimizer = saved.get("tensors", {}), saved.get("optimizer")
        if set(tensors) != set(self.masters) or optimizer is None:
            raise ValueError(
                f"{source}: holds experts {sorted(tensors)} "
                f"{'without' if optimizer is None else 'with'} optimizer state; this run holds "
                f"{sorted(self.masters)} outside ZeRO-3 and needs both"
            )
        for name, master in self.masters.items():
            master.copy_(tensors[name].to(master.device, master.dtype))
            param = self.params[name]
            if param is not master:
                param.copy_(master)
            if self.optimizer is not None and name in optimizer:
                self.optimizer.state[master] = {
                    k: v.to(master.device) if k != "step" else v for k, v in optimizer[name].items()
                }


def held_experts(model: nn.Module) -> HeldExperts | None:
    """The `HeldExperts` of ``model`` (a DeepSpeed engine or the model): ZeRO-3 × EP only."""
    module = getattr(model, "module", model)
    held = module.__dict__.get(HELD_EXPERTS_ATTR)
    return held if isinstance(held, HeldExperts) else None


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert (EP-sharded) parameters, held out of the module tree under ZeRO-3 or not."""
    held = held_experts(model)
    if held is not None:
        return list(held.params)
    return [n for n, p in model.named_parameters() if is_expert_param(p)]


# --- Checkpoints -------------------------------------------------------------------------------------
#
# DeepSpeed writes the module state (``mp_rank_00_model_states.pt``) from data-parallel rank 0 only,
# and its per-expert files only for its native MoE layer. Our expert shards differ per EP rank, so
# each EP rank's first replica (expert-data-parallel rank 0) writes its own shard next to them; on
# resume every rank copies its shard back into the live parameters after `engine.load_checkpoint`
# (ZeRO-1/2 restore their fp32 master partitions themselves, per rank, from the optimizer files).

EXPERT_SHARD_PATTERN = "expert_shard_ep{ep_rank:03d}_of{ep_size:03d}.pt"
EXPERT_SHARD_GLOB = "expert_shard_ep*_of*.pt"


def expert_layout(model: nn.Module) -> ExpertLayout | None:
    """The expert-parallel layout applied to ``model`` (a DeepSpeed engine or the model), if any."""
    module = getattr(model, "module", model)
    for m in module.modules():
        if isinstance(m, AllToAllDispatcher):
            return m.layout
    return None


def expert_shard_path(tag_dir: str | Path, ep_rank: int, ep_size: int) -> Path:
    """The file holding EP rank ``ep_rank``'s expert parameters in a checkpoint tag folder."""
    return Path(tag_dir) / EXPERT_SHARD_PATTERN.format(ep_rank=ep_rank, ep_size=ep_size)


def save_expert_shards(model: nn.Module, tag_dir: str | Path) -> Path | None:
    """Write this EP rank's expert parameters (one writer per EP rank); returns the path written.

    Call on every rank after ``engine.save_checkpoint(dir, tag)`` with ``tag_dir = dir/tag``; a no-op
    without expert parallelism (the experts are then complete in DeepSpeed's own files).
    """
    layout = expert_layout(model)
    if layout is None or layout.edp_rank != 0:
        return None
    module = getattr(model, "module", model)  # a DeepSpeed engine or the model
    held = held_experts(module)
    if held is not None:  # ZeRO-3: fp32 masters and their AdamW state live only here
        payload = held.state_dict()
    else:
        payload = {
            "tensors": {
                n: p.detach().cpu().clone() for n, p in module.named_parameters() if is_expert_param(p)
            }
        }
    path = expert_shard_path(tag_dir, layout.ep_rank, layout.ep_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"ep_rank": layout.ep_rank, "ep_size": layout.ep_size, **payload}, tmp)
    tmp.replace(path)
    return path


@torch.no_grad()
def load_expert_shards(model: nn.Module, tag_dir: str | Path) -> int:
    """Copy this EP rank's saved expert parameters into the live model; returns how many tensors.

    Call on every rank right after ``engine.load_checkpoint``. Refuses a checkpoint written with a
    different ``ep_size`` (the shards would not line up).
    """
    layout = expert_layout(model)
    if layout is None:
        if any(Path(tag_dir).glob(EXPERT_SHARD_GLOB)):
            raise ValueError(
                f"{tag_dir} holds expert-parallel shards but this run has parallel.ep_size=1; resume with the "
                "checkpoint's ep_size, or start a new run from its weights with checkpoint.init_from=<that run>"
            )
        return 0
    path = expert_shard_path(tag_dir, layout.ep_rank, layout.ep_size)
    if not path.exists():
        others = sorted(p.name for p in Path(tag_dir).glob("expert_shard_ep*.pt"))
        raise FileNotFoundError(
            f"{path} is missing (found {others or 'no expert shards'}): this checkpoint is incomplete; resume "
            "from another step_N folder of the run, or start a new run from its weights with checkpoint.init_from"
        )
    payload = torch.load(path, map_location="cpu", weights_only=True)
    module = getattr(model, "module", model)
    held = held_experts(module)
    if held is not None:
        held.load_state_dict(payload, str(path))
        return len(held.params)
    saved = payload["tensors"]
    params = {n: p for n, p in module.named_parameters() if is_expert_param(p)}
    if set(saved) != set(params):
        raise ValueError(
            f"{path}: expert parameters {sorted(saved)} do not match the model's {sorted(params)}"
        )
    for name, param in params.items():
        param.copy_(saved[name].to(param.device, param.dtype))
    return len(params)


def full_experts_from_shards(tag_dir: str | Path, ep_size: int) -> dict[str, Tensor]:
    """ZeRO-3 × EP: the full ``[E, …]`` fp32 experts, EP ranks' shards concatenated in rank order
    (rank ``e`` holds experts ``[e·E/ep, (e+1)·E/ep)``); the dense weights are in ZeRO's files."""
    pieces: dict[str, list[Tensor]] = {}
    for ep_rank in range(ep_size):
        path = expert_shard_path(tag_dir, ep_rank, ep_size)
        saved = torch.load(path, map_location="cpu", weights_only=True)["tensors"]
        for name, tensor in saved.items():
            pieces.setdefault(name, []).append(tensor.float())
    return {name: torch.cat(parts, dim=0) for name, parts in pieces.items()}


def parallelize_experts(model: nn.Module, world_size: int, zero_stage: int, ep_size: int) -> nn.Module:
    """The trainer's entry point: validate the layout, create the groups, shard the experts.

    ``parallelize_model`` calls this with ``(model, dims.world_size, cfg.parallel.zero_stage,
    cfg.parallel.ep_size)`` after the weights are initialised and before the optimizer is built.
    Collective when ``ep_size > 1`` (every rank must call it).
    """
    layers = expert_parallel_modules(model)
    n_experts = int(layers[0][1].n_routed_experts) if layers else 0  # type: ignore[arg-type]
    validate_parallel_layout(world_size, zero_stage, ep_size, n_experts)
    if ep_size == 1:
        return model
    return apply_expert_parallel(model, init_parallel_groups(ep_size, n_experts), zero_stage)
