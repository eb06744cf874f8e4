"""Consolidate a DeepSpeed checkpoint (ZeRO 0–3, with or without expert parallelism) into full fp32
weights, and from there into an HF folder.

* No expert parallelism: DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
  (ZeRO-1/2/3), or the module state for stage 0.
* Expert parallelism (ZeRO-1/2, see `groups.validate_parallel_layout`): DeepSpeed's consolidation
  concatenates every parameter group's partitions over *all* ranks, which is right for dense
  groups but wrong for expert ("moe") groups: those are partitioned over the expert-data-parallel
  group of each EP rank and differ between EP ranks. Here dense groups are merged over all ranks as
  DeepSpeed does, each expert group over the ranks ``{e, e + ep, …}`` of EP rank ``e``, and the EP
  ranks' local ``[E/ep, …]`` tensors are stacked back into ``[E, …]`` (rank ``e`` holds experts
  ``[e·E/ep, (e+1)·E/ep)``). The fp32 master partitions and the per-rank layout come from the
  optimizer files, parsed with DeepSpeed's own readers; the EP size from the expert shard files
  that `expert_parallel.save_expert_shards` writes next to them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from deepsuite.parallel.expert_parallel import EXPERT_SHARD_GLOB

_SHARD_RE = re.compile(r"expert_shard_ep(\d+)_of(\d+)\.pt$")


def _load(path: Path) -> Any:
    from deepsuite.parallel.deepspeed import safe_torch_load

    return safe_torch_load(path, map_location="cpu")


def resolve_tag_dir(ckpt_dir: str | os.PathLike[str], tag: str | None = None) -> Path:
    """The folder holding DeepSpeed's ``*_model_states.pt`` files.

    ``ckpt_dir`` may be that folder itself, a DeepSpeed save dir (``tag`` or its ``latest`` file
    picks the tag), or a deepsuite ``step_N`` folder / run folder (``deepspeed/`` inside).
    """
    root = Path(ckpt_dir)
    if (root / "latest").is_file() and not list(root.glob("*_model_states.pt")):
        name = (root / "latest").read_text().strip()
        if tag is None and (root / name).is_dir():
            root = root / name
    if tag is not None:
        root = root / tag
    elif not list(root.glob("*_model_states.pt")) and (root / "deepspeed").is_dir():
        root = root / "deepspeed"
    if not list(root.glob("*_model_states.pt")):
        raise FileNotFoundError(f"no DeepSpeed *_model_states.pt files in {root}")
    return root


def expert_parallel_size(tag_dir: Path) -> int:
    """EP size of a checkpoint from its expert shard files (1 when there are none)."""
    sizes = {int(m.group(2)) for p in tag_dir.glob(EXPERT_SHARD_GLOB) if (m := _SHARD_RE.search(p.name))}
    if len(sizes) > 1:
        raise ValueError(f"{tag_dir} mixes expert shards of ep sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def _zero_stage(tag_dir: Path) -> int:
    optim = sorted(tag_dir.glob("*_optim_states.pt"))
    if not optim:
        return 0
    sd = _load(optim[0])["optimizer_state_dict"]
    return int(sd.get("zero_stage", 0))


def _fp32(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}


def consolidate_state_dict(
    ckpt_dir: str | os.PathLike[str], tag: str | None = None
) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (stacked ``[E, …]`` experts, buffers included) of a DeepSpeed checkpoint."""
    from deepsuite.parallel.deepspeed import import_deepspeed

    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    ep = expert_parallel_size(tag_dir)
    stage = _zero_stage(tag_dir)
    if ep > 1:
        if stage not in (1, 2):
            raise NotImplementedError(
                f"{tag_dir}: expert-parallel checkpoints are written under ZeRO-1/2 only (found ZeRO-{stage})"
            )
        return _consolidate_ep_zero12(tag_dir, ep)
    if stage == 0:
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        module = _load(states[0])["module"]
        if any(
            isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16)
            for v in module.values()
        ):
            # the fp32 masters are unnamed lists in the optimizer state; deepsuite's checkpoint
            # folder records their names (state.json), a bare DeepSpeed folder does not
            raise NotImplementedError(
                f"{tag_dir}: a ZeRO-0 checkpoint of a bf16/fp16 run; its fp32 master weights are only named in "
                "deepsuite's checkpoint folder: use `deepsuite consolidate <run or step_N>` "
                "(deepsuite.checkpoint.manager.consolidated_state_dict)"
            )
        return _fp32(module)
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return _fp32(dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)))


def _consolidate_ep_zero12(tag_dir: Path, ep: int) -> dict[str, torch.Tensor]:
    """ZeRO-1/2 × EP: merge dense groups over all ranks, expert groups per EP rank, then stack experts."""
    from deepsuite.parallel.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        OPTIMIZER_STATE_DICT,
        PARAM_SHAPES,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )
    from deepspeed.utils.zero_to_fp32 import get_checkpoint_files, natural_keys

    model_states = _load(tag_dir / "mp_rank_00_model_states.pt")
    optim_files = sorted(get_checkpoint_files(str(tag_dir), "*_optim_states.pt"), key=natural_keys)
    world = len(optim_files)
    if world % ep:
        raise ValueError(f"{tag_dir}: {world} optimizer shards are not divisible by ep_size={ep}")
    optim = [_load(Path(f))[OPTIMIZER_STATE_DICT] for f in optim_files]
    flat_groups = [o[SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]  # [rank][group] -> 1-D fp32
    counts = optim[0][PARTITION_COUNT]
    counts = counts if isinstance(counts, list) else [counts] * len(flat_groups[0])
    paddings = optim[0].get("param_alignment_paddings")
    shapes: list[dict[str, Any]] = model_states[PARAM_SHAPES]

    out: dict[str, torch.Tensor] = {
        k: v.float() if torch.is_floating_point(v) else v
        for k, v in model_states["module"].items()
        if k in set(model_states[BUFFER_NAMES])
    }
    expert_pieces: dict[str, list[torch.Tensor]] = {}
    for g, group_shapes in enumerate(shapes):
        if counts[g] == world:  # dense: partitioned over every rank
            replicas = [list(range(world))]
        elif counts[g] == world // ep:  # experts: partitioned over the EDP ranks of each EP rank
            replicas = [list(range(e, world, ep)) for e in range(ep)]
        else:
            raise ValueError(f"{tag_dir}: group {g} has partition count {counts[g]} (world {world}, ep {ep})")
        for ranks in replicas:
            full = torch.cat([flat_groups[r][g] for r in ranks])
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
        out[name] = torch.cat(pieces, dim=0)  # EP rank order = global expert order
    for alias, target in model_states.get("shared_params", {}).items():
        if target in out:
            out[alias] = out[target]
    return out


def consolidate_to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tag: str | None = None,
    model_cfg: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF folder (config.json + safetensors) from a DeepSpeed checkpoint of any supported layout.

    The model config comes from ``model_cfg`` (a `ModelConfig`) or from the ``config.yaml`` that
    deepsuite stores in each ``step_N`` folder (looked up next to and above the tag folder).
    """
    from deepsuite.checkpoint.hf_io import load_state_dict_strict
    from deepsuite.models.hf import save_hf
    from deepsuite.models.registry import build_model

    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    if model_cfg is None:
        from deepsuite.config.loader import config_from_dict, read_yaml

        for folder in (tag_dir, tag_dir.parent, tag_dir.parent.parent):
            if (folder / "config.yaml").is_file():
                model_cfg = config_from_dict(read_yaml(folder / "config.yaml")).model
                break
        else:
            raise FileNotFoundError(f"no config.yaml near {tag_dir}; pass model_cfg=")
    model = build_model(model_cfg, device="cpu", init=False)
    load_state_dict_strict(model, consolidate_state_dict(tag_dir), source=str(tag_dir))
    return save_hf(model, out_dir, overwrite=overwrite)
