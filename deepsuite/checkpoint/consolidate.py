"""Consolidation: the full fp32 weights of a DeepSpeed checkpoint (ZeRO 0-3, with or without expert
parallelism) in the plain model's state-dict layout, and a model loaded with them.

Each layout keeps the fp32 master weights somewhere else:

* ZeRO-0: everything is in ``mp_rank_00_model_states.pt``. In fp32 ``module`` is the model itself.
  With ``training.dtype=bf16`` DeepSpeed 0.19 wraps the torch AdamW in its ``FP16_UnfusedOptimizer``:
  ``module`` holds the bf16 model and ``optimizer["fp32_groups"]`` the fp32 masters, one list per
  optimizer group in the group's parameter order, without names. The names are the
  ``optimizer_param_names`` deepsuite records in state.json at save time; each master is checked
  against the bf16 copy (DeepSpeed writes the module as the master rounded to bf16).
* ZeRO-1/2/3: the masters are partitioned over the ranks' optimizer files; DeepSpeed's own
  ``zero_to_fp32`` merges them.
* ZeRO-1/2 with expert parallelism: DeepSpeed's merge concatenates every group's partitions over
  *all* ranks, which is right for dense groups but wrong for expert ("moe") groups: those are
  partitioned over the expert-data-parallel group of each EP rank and differ between EP ranks. Here
  dense groups are merged over all ranks, each expert group over the ranks ``{e, e + ep, …}`` of EP
  rank ``e``, and the EP ranks' local ``[E/ep, …]`` tensors are stacked back into ``[E, …]`` (rank
  ``e`` holds experts ``[e·E/ep, (e+1)·E/ep)``). The EP size comes from the expert shard files that
  `expert_parallel.save_expert_shards` writes.
* ZeRO-3 with expert parallelism: the routed experts are held outside ZeRO-3, so the optimizer
  files hold the dense masters only (merged by ``zero_to_fp32``) and each EP rank's expert shard
  file holds its experts' fp32 weights, which are stacked as above.

The optimizer knows parameters by their names in the trained module. A module that saves several of
its parameters as one stacked tensor (through a state-dict hook) lists them in its state-dict
metadata under ``stacked_parameters`` (``{key: [parameter names]}``, relative to the module); their
masters are stacked the same way, so the result has the keys of the plain model.

DeepSpeed's files are read with the weights-only unpickler; ``zero_to_fp32`` unpickles freely, so a
deepsuite checkpoint is consolidated only after `verify_checkpoint` proved every file loads
weights-only.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsuite.checkpoint.atomic import checkpoint_file
from deepsuite.checkpoint.hf_io import load_state_dict_strict
from deepsuite.checkpoint.manager import (
    STATE_FILE,
    CheckpointError,
    find_checkpoint,
    load_config_of,
    read_state,
    verify_checkpoint,
)
from deepsuite.config.schema import Config
from deepsuite.models.registry import build_model
from deepsuite.parallel.deepspeed import import_deepspeed, safe_torch_load
from deepsuite.parallel.expert_parallel import EXPERT_SHARD_GLOB, full_experts_from_shards

STACKED_PARAMETERS = "stacked_parameters"
_SHARD_RE = re.compile(r"expert_shard_ep(\d+)_of(\d+)\.pt$")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_tag_dir(path: str | os.PathLike[str], tag: str | None = None) -> Path:
    """The folder holding DeepSpeed's ``*_model_states.pt`` files.

    ``path`` may be that folder itself, a DeepSpeed save folder (``tag`` or its ``latest`` file
    picks the tag), or a deepsuite ``step_N`` folder / run folder (``deepspeed/`` inside).
    """
    root = Path(path)
    if checkpoint_file(root / "latest") and not list(root.glob("*_model_states.pt")):
        name = (root / "latest").read_text().strip()
        if tag is None and (root / name).is_dir():
            root = root / name
    if tag is not None:
        root = root / tag
    elif not list(root.glob("*_model_states.pt")) and (root / "deepspeed").is_dir():
        root = root / "deepspeed"
    if not list(root.glob("*_model_states.pt")):
        raise CheckpointError(f"no DeepSpeed *_model_states.pt files in {root}")
    return root


def expert_parallel_size(tag_dir: Path) -> int:
    """EP size of a checkpoint from its expert shard files (1 when there are none)."""
    sizes = {int(m.group(2)) for p in tag_dir.glob(EXPERT_SHARD_GLOB) if (m := _SHARD_RE.search(p.name))}
    if len(sizes) > 1:
        raise CheckpointError(f"{tag_dir} mixes expert shards of ep sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def stacked_parameters(module_state: Any) -> dict[str, list[str]]:
    """``{stacked key: [parameter names, in stacking order]}`` that the modules of a saved state dict
    declared in its metadata (empty for a model that saves every parameter under its own name)."""
    plan: dict[str, list[str]] = {}
    for prefix, meta in (getattr(module_state, "_metadata", None) or {}).items():
        lead = f"{prefix}." if prefix else ""
        for key, names in (meta.get(STACKED_PARAMETERS) or {}).items():
            plan[lead + key] = [lead + n for n in names]
    return plan


def _stack(tensors: dict[str, torch.Tensor], plan: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """``tensors`` with each group of ``plan`` that it holds stacked into its key."""
    for key, names in plan.items():
        if names[0] in tensors:
            tensors[key] = torch.stack([tensors.pop(n) for n in names])
    return tensors


def _fp32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and torch.is_floating_point(value) else value


def consolidated_state_dict(
    path: str | os.PathLike[str], state: dict[str, Any] | None = None, *, tag: str | None = None
) -> dict[str, Any]:
    """The model's full fp32 state dict from a checkpoint (any ZeRO stage, expert parallel or not):
    the optimizer's fp32 master weights (under bf16 too), in the plain model's layout.

    ``path`` is a deepsuite checkpoint (``step_N`` or run folder) or a DeepSpeed save folder (see
    `resolve_tag_dir`). ``state`` is the deepsuite state whose ``optimizer_param_names`` name a
    ZeRO-0 bf16 run's masters (default: the state.json beside the DeepSpeed folder, if any).
    """
    tag_dir = resolve_tag_dir(path, tag)
    if state is None and (tag_dir.parent / STATE_FILE).is_file():
        state = read_state(tag_dir.parent)
    states_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(
        tag_dir.glob("*_model_states.pt")
    )
    model_states = safe_torch_load(states_files[0], map_location="cpu")
    plan = stacked_parameters(model_states["module"])
    ep = expert_parallel_size(tag_dir)
    zero3 = int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)) == 3
    if ep > 1 and not zero3:
        return _stack(_consolidate_ep_zero12(tag_dir, ep, model_states), plan)
    if not any(tag_dir.glob("*_optim_states.pt")):  # ZeRO-0 keeps everything in the model states file
        return _consolidate_zero0(tag_dir, model_states, plan, (state or {}).get("optimizer_param_names"))
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # its progress prints ("Processing zero checkpoint ...") would land in the output of
    # `generate` / `convert`: kept out of stdout
    with contextlib.redirect_stdout(io.StringIO()):
        merged = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if ep > 1:  # ZeRO-3 × EP: the experts were held outside ZeRO, whole per EP rank, in the shard files
        merged.update(full_experts_from_shards(tag_dir, ep))
    return _stack({k: _fp32(v) for k, v in merged.items()}, plan)


def _same_storage_keys(module: dict[str, Any]) -> dict[str, list[str]]:
    """{key: every key of ``module`` that is the same tensor (tied weights), itself included}."""
    by_view: dict[tuple[Any, ...], list[str]] = {}
    for key, value in module.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            view = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
            )
            by_view.setdefault(view, []).append(key)
    return {key: keys for keys in by_view.values() for key in keys}


def _named_masters(
    tag_dir: Path, optimizer: dict[str, Any], names: list[list[str]]
) -> dict[str, torch.Tensor]:
    """``{parameter name: fp32 master}`` of a ZeRO-0 optimizer state (``fp32_groups``: one tensor
    per parameter, per group) with the recorded group names."""
    groups = optimizer.get("fp32_groups")
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise CheckpointError(f"{tag_dir}: the optimizer's `fp32_groups` are not lists of tensors per group")
    if [len(g) for g in groups] != [len(g) for g in names]:
        raise CheckpointError(
            f"{tag_dir}: the optimizer holds {[len(g) for g in groups]} fp32 master weights per "
            f"group, the recorded parameter names {[len(g) for g in names]}"
        )
    masters = {n: m for group_names, group in zip(names, groups) for n, m in zip(group_names, group)}
    for name, master in masters.items():
        if not isinstance(master, torch.Tensor):
            raise CheckpointError(f"{tag_dir}: no fp32 master weight for {name!r}")
    return masters


def _consolidate_zero0(
    tag_dir: Path, model_states: dict[str, Any], plan: dict[str, list[str]], names: list[list[str]] | None
) -> dict[str, Any]:
    """ZeRO-0: the saved module, with each trained parameter taken from the optimizer's fp32 master
    when the module was stored in bf16/fp16 (see the module docstring)."""
    module = model_states["module"]
    out = {k: _fp32(v) for k, v in module.items()}
    optimizer = model_states.get("optimizer")
    low_precision = any(isinstance(v, torch.Tensor) and v.dtype in _LOW_PRECISION for v in module.values())
    if not (isinstance(optimizer, dict) and "fp32_groups" in optimizer):
        ds_config = model_states.get("ds_config") or {}
        if low_precision and any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "fp16")):
            raise CheckpointError(
                f"{tag_dir} holds bf16/fp16 weights but its model states file has no fp32 master "
                "weights (no optimizer `fp32_groups`); it cannot be consolidated to the fp32 weights"
            )
        return out  # fp32 training: the module is the optimizer's own parameters
    if names is None:
        raise CheckpointError(
            f"{tag_dir} is a ZeRO-0 checkpoint of a bf16/fp16 run: its fp32 master weights are named only by "
            "the `optimizer_param_names` of deepsuite's state.json, which it lacks; consolidate the deepsuite "
            "checkpoint folder (step_N) it was saved in"
        )
    masters = _stack(_named_masters(tag_dir, optimizer, names), plan)
    tied = _same_storage_keys(module)
    for name, master in masters.items():
        stored = module.get(name)
        if not isinstance(stored, torch.Tensor):
            raise CheckpointError(
                f"{tag_dir}: no stored tensor for the fp32 master weight recorded as {name!r}"
            )
        if stored.shape != master.shape:
            raise CheckpointError(
                f"{tag_dir}: the fp32 master weight recorded as {name!r} has shape "
                f"{list(master.shape)}, the model states hold {list(stored.shape)} under that name"
            )
        rounded = master.to(stored.dtype)
        if not bool(((rounded == stored) | (rounded.isnan() & stored.isnan())).all()):
            raise CheckpointError(
                f"{tag_dir}: the fp32 master weight recorded as {name!r} does not round to the stored "
                f"{str(stored.dtype).removeprefix('torch.')} copy; the optimizer state does not belong to "
                "these weights"
            )
        for key in tied.get(name, [name]):
            out[key] = master.float()
    return out


def _consolidate_ep_zero12(tag_dir: Path, ep: int, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ZeRO-1/2 × EP: merge dense groups over all ranks, expert groups per EP rank, then stack experts."""
    import_deepspeed()
    from deepspeed.checkpoint.constants import BUFFER_NAMES, SINGLE_PARTITION_OF_FP32_GROUPS

    optim = ep_zero12_optimizer_states(tag_dir, ep)
    flat_groups = [o[SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]  # [rank][group] -> 1-D fp32
    buffers = set(model_states[BUFFER_NAMES])
    out = {k: _fp32(v) for k, v in model_states["module"].items() if k in buffers}
    out.update(merge_ep_zero12_partitions(tag_dir, ep, model_states, optim, flat_groups))
    for alias, target in model_states.get("shared_params", {}).items():
        if target in out:
            out[alias] = out[target]
    return out


def ep_zero12_optimizer_states(tag_dir: Path, ep: int) -> list[dict[str, Any]]:
    """The optimizer state dict of every rank of a ZeRO-1/2 × EP checkpoint, in rank order."""
    import_deepspeed()
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT
    from deepspeed.utils.zero_to_fp32 import get_checkpoint_files, natural_keys

    optim_files = sorted(get_checkpoint_files(str(tag_dir), "*_optim_states.pt"), key=natural_keys)
    optim = [safe_torch_load(f, map_location="cpu")[OPTIMIZER_STATE_DICT] for f in optim_files]
    stage = int(optim[0].get("zero_stage", 0)) if optim else 0
    if stage not in (1, 2):
        raise CheckpointError(
            f"{tag_dir}: expected the optimizer files of ZeRO-1/2 with expert parallelism (found ZeRO-{stage})"
        )
    if len(optim) % ep:
        raise CheckpointError(f"{tag_dir}: {len(optim)} optimizer shards are not divisible by ep_size={ep}")
    return optim


def merge_ep_zero12_partitions(
    tag_dir: Path,
    ep: int,
    model_states: dict[str, Any],
    optim: list[dict[str, Any]],
    flat_groups: list[list[torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Whole tensors by name out of ZeRO-1/2 × EP flat partitions ``flat_groups[rank][group]`` (the
    fp32 masters, or an Adam moment, which ZeRO lays out the same way): a dense group is partitioned
    over every rank, an expert group over the ranks ``{e, e + ep, ...}`` of EP rank ``e``; the EP
    ranks' ``[E/ep, ...]`` pieces are concatenated in rank order (= global expert order)."""
    import_deepspeed()
    from deepspeed.checkpoint.constants import PARAM_SHAPES, PARTITION_COUNT

    world = len(optim)
    shapes: list[dict[str, Any]] = model_states[PARAM_SHAPES]
    counts = optim[0][PARTITION_COUNT]
    counts = counts if isinstance(counts, list) else [counts] * len(shapes)
    paddings = optim[0].get("param_alignment_paddings")
    out: dict[str, torch.Tensor] = {}
    expert_pieces: dict[str, list[torch.Tensor]] = {}
    for g, group_shapes in enumerate(shapes):
        if counts[g] == world:  # dense: partitioned over every rank
            replicas = [list(range(world))]
        elif counts[g] == world // ep:  # experts: partitioned over the EDP ranks of each EP rank
            replicas = [list(range(e, world, ep)) for e in range(ep)]
        else:
            raise CheckpointError(
                f"{tag_dir}: group {g} has partition count {counts[g]} (world {world}, ep {ep})"
            )
        for ranks in replicas:
            full = torch.cat([flat_groups[r][g].reshape(-1) for r in ranks])
            offset = 0
            for i, (name, shape) in enumerate(group_shapes.items()):
                numel = math.prod(shape)
                tensor = full.narrow(0, offset, numel).view(shape).clone()
                offset += numel + (paddings[g][i] if paddings is not None else 0)
                if len(replicas) == 1:
                    out[name] = tensor
                else:
                    expert_pieces.setdefault(name, []).append(tensor)
    for name, pieces in expert_pieces.items():
        out[name] = torch.cat(pieces, dim=0)
    return out


def load_model_from_checkpoint(
    path: str | os.PathLike[str], device: str = "cpu", *, verify: bool = True
) -> tuple[nn.Module, dict[str, Any], Config]:
    """(model with the checkpoint's weights in fp32, state, run config) — for generation and conversion.

    ``path`` is a run folder or a step_N folder; its files are verified before anything is unpickled
    (`verify_checkpoint`; ``verify=False`` skips the checksums, not the weights-only check).
    """
    p = find_checkpoint(path)
    state = verify_checkpoint(p, checksums=verify)
    cfg = load_config_of(p)
    model = build_model(cfg.model, device=device)
    load_state_dict_strict(model, consolidated_state_dict(p, state), source=str(p))
    return model.eval(), state, cfg
