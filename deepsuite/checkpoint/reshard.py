"""Resuming a checkpoint on another layout (world size, ZeRO stage, expert-parallel size).

A checkpoint's optimizer state is laid out for the ranks and ZeRO stage that wrote it. To resume it
elsewhere it is converted once, on rank 0, into a layout-free form kept beside it::

    step_N/universal/
      fp32.safetensors        # every parameter's fp32 master (and the module's buffers), by name;
                              # routed experts whole: [E, ...] in global expert order
      exp_avg.safetensors     # Adam's first moment of every parameter, by name
      exp_avg_sq.safetensors  # Adam's second moment
      meta.json               # the optimizer step, the source layout
      manifest.json           # checksums of the files above (a damaged folder is converted again)

written through `atomic_dir` (a kill leaves no half-written folder; a later resume converts again or
reuses the finished one). The sources: ZeRO-0 from the engine's plain torch optimizer state, named
by state.json's ``optimizer_param_names``; ZeRO-1/2/3 by applying DeepSpeed's own ``zero_to_fp32``
merge to the flat partitions of the masters and of each Adam moment; ZeRO-1/2 with expert parallelism
by the merge `consolidate` applies to its masters (dense groups over all ranks, each expert group over
the expert-data-parallel ranks of its EP rank, EP ranks' ``[E/ep, ...]`` pieces concatenated in rank
order), applied to each moment. The fp32 masters come from `consolidated_state_dict`.

The new engine is then filled in place: under ZeRO-1/2/3 through DeepSpeed's fragment API
(``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``; the optimizer states are created
first, since torch's AdamW makes them only at its first step), under ZeRO-0 by setting the torch
optimizer's state directly; the model weights are the masters. Under expert parallelism each rank
takes rows ``[r·E/ep, (r+1)·E/ep)`` of the whole expert tensors for its EP rank ``r`` (the slice
`expert_parallel.shard_stacked_experts` keeps). The LR scheduler and DeepSpeed's step
counters come from the source's model states file (the same on every rank), the data position from
state.json (the sampler's position is global: any world that splits the same global batch reads
the same samples). RNGs: a rank that existed in the source restores its own; a new rank is seeded
from ``training.seed``, its rank and the step (deterministic, but not the stream an uninterrupted
run on that layout would have drawn: only dropout-like randomness could differ).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deepsuite.checkpoint.atomic import atomic_dir
from deepsuite.checkpoint.checksums import check_folder, hash_folder, write_manifest
from deepsuite.checkpoint.consolidate import (
    consolidated_state_dict,
    ep_zero12_optimizer_states,
    merge_ep_zero12_partitions,
    stacked_parameters,
)
from deepsuite.checkpoint.manager import DS_TAG, CheckpointError, read_state
from deepsuite.checkpoint.rng import restore_rng_state, seed_everything
from deepsuite.config.schema import Config
from deepsuite.parallel.deepspeed import import_deepspeed, safe_torch_load
from deepsuite.parallel.dist import barrier
from deepsuite.parallel.expert_parallel import HeldExperts, expert_layout, expert_shard_path, held_experts
from deepsuite.parallel.groups import is_expert_param

UNIVERSAL_DIR = "universal"
UNIVERSAL_FORMAT = 1
MOMENTS = ("exp_avg", "exp_avg_sq")
_FILES = ("fp32", *MOMENTS)
_SHARD_RE = re.compile(r"expert_shard_ep\d+_of(\d+)\.pt$")


def layout_changed(state: dict[str, Any], cfg: Config, world_size: int) -> bool:
    """Whether resuming ``state`` on this config and world needs a conversion: another ZeRO stage,
    world size or ``ep_size`` (ZeRO-1/2/3 optimizer files and expert shards are per rank; under
    ZeRO-0 the new ranks have no RNG state of their own)."""
    return (
        int(state["zero_stage"]) != cfg.parallel.zero_stage
        or int(state["world_size"]) != world_size
        or saved_ep_size(state) != cfg.parallel.ep_size
    )


def saved_ep_size(state: dict[str, Any]) -> int:
    """The EP size a checkpoint was written with, from the expert shard files its state.json lists
    (one per EP rank; none without expert parallelism)."""
    sizes = {int(m.group(1)) for name in state.get("files", {}) if (m := _SHARD_RE.search(name))}
    if len(sizes) > 1:
        raise CheckpointError(f"the checkpoint lists expert shards of ep sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


# ------------------------------------------------------------------------------------ conversion


def ensure_universal(path: Path) -> Path:
    """``path/universal`` (rank 0 converts it once; every rank calls this and waits for it)."""
    target = path / UNIVERSAL_DIR
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        barrier()
    else:
        try:
            damage = check_folder(target).damage if (target / "meta.json").is_file() else None
            if damage is not None:  # derived from the checkpoint: convert it again rather than trust it
                warnings.warn(f"{target}: {damage}; converting {path} again", stacklevel=2)
            if damage is not None or not (target / "meta.json").is_file():
                for stale in path.glob(f".{UNIVERSAL_DIR}.*"):  # a killed conversion's temporary folder
                    shutil.rmtree(stale, ignore_errors=True)
                write_universal(path, target)
        finally:
            if torch.distributed.is_initialized():
                barrier()
    if not (target / "meta.json").is_file():
        raise CheckpointError(f"the conversion of {path} for another layout failed on rank 0 (see its log)")
    return target


def write_universal(path: Path, target: Path) -> None:
    """Convert checkpoint ``path`` into ``target`` (atomically)."""
    state = read_state(path)
    masters, moments, step = extract(path, state)
    with atomic_dir(target, overwrite=True) as tmp:
        for name, tensors in (("fp32", masters), *moments.items()):
            save_file(
                {k: v.detach().float().contiguous().clone() for k, v in tensors.items()},
                tmp / f"{name}.safetensors",
            )
        meta = {
            "format": UNIVERSAL_FORMAT,
            "step": step,
            "source_world_size": state["world_size"],
            "source_zero_stage": state["zero_stage"],
            "source_ep_size": saved_ep_size(state),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        write_manifest(tmp, hash_folder(tmp))


def extract(
    path: Path, state: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int]:
    """(fp32 masters and buffers by name, {moment: {name: tensor}}, optimizer step) of a checkpoint."""
    tag_dir = path / DS_TAG
    model_states = safe_torch_load(_model_states_file(tag_dir), map_location="cpu")
    plan = stacked_parameters(model_states["module"])
    masters = _unstack(consolidated_state_dict(path, state), plan)
    stage, ep = int(state["zero_stage"]), saved_ep_size(state)
    if ep > 1 and stage not in (1, 2, 3):
        raise CheckpointError(f"{path}: a ZeRO-{stage} checkpoint with ep_size={ep} (expected ZeRO-1/2/3)")
    if stage == 0:
        moments, step = _zero0_moments(path, model_states, state.get("optimizer_param_names"))
    elif ep > 1 and stage in (1, 2):
        moments, step = _ep_zero12_moments(tag_dir, ep, model_states)
    else:
        moments, step = _zero_moments(tag_dir, stage)
        if ep > 1:  # ZeRO-3 × EP: the experts' AdamW state is in the expert shard files
            held, held_step = _held_expert_moments(tag_dir, ep)
            if held_step != step:
                raise CheckpointError(
                    f"{path}: the experts' optimizer is at step {held_step}, the dense one at {step}"
                )
            moments = {m: {**moments[m], **held[m]} for m in MOMENTS}
    for moment, tensors in moments.items():
        missing = [n for n in tensors if n not in masters]
        if missing:
            raise CheckpointError(f"{path}: {moment} of unknown parameters {missing[:3]}")
    return masters, moments, step


def _model_states_file(tag_dir: Path) -> Path:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt")) or sorted(tag_dir.glob("*_model_states.pt"))
    if not files:
        raise CheckpointError(f"no DeepSpeed *_model_states.pt file in {tag_dir}")
    return files[0]


def _unstack(tensors: dict[str, torch.Tensor], plan: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    for key, names in plan.items():
        if key in tensors:
            for name, t in zip(names, tensors.pop(key).unbind(0)):
                tensors[name] = t
    return tensors


def _step_of(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _zero0_moments(
    path: Path, model_states: dict[str, Any], names: list[list[str]] | None
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """ZeRO-0: the torch optimizer's state dict (inside DeepSpeed's wrapper under bf16), its
    parameters named by the ``optimizer_param_names`` recorded at save time."""
    optimizer = model_states.get("optimizer")
    if isinstance(optimizer, dict) and "optimizer_state_dict" in optimizer:
        optimizer = optimizer["optimizer_state_dict"]
    if not isinstance(optimizer, dict) or "state" not in optimizer:
        raise CheckpointError(f"{path}: its model states file holds no optimizer state")
    if names is None:
        raise CheckpointError(
            f"{path}: a ZeRO-0 checkpoint without `optimizer_param_names` in its state.json"
        )
    groups = optimizer["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g) for g in names]:
        raise CheckpointError(f"{path}: the recorded parameter names do not fit the optimizer's groups")
    moments: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MOMENTS}
    steps: set[int] = set()
    for group_names, group in zip(names, groups):
        for name, index in zip(group_names, group["params"]):
            entry = optimizer["state"].get(index)
            if not entry:
                raise CheckpointError(
                    f"{path}: no optimizer state for {name!r} (saved before the first step?)"
                )
            for m in MOMENTS:
                moments[m][name] = entry[m]
            steps.add(_step_of(entry["step"]))
    if len(steps) != 1:
        raise CheckpointError(f"{path}: the optimizer's parameters are at different steps {sorted(steps)}")
    return moments, steps.pop()


def _zero_moments(tag_dir: Path, stage: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """ZeRO-1/2/3: each moment's flat partitions, merged by DeepSpeed's ``zero_to_fp32`` (the same
    layout as the fp32 master partitions, which that merge was written for)."""
    import_deepspeed()
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_ALIGNMENT_PADDINGS
    from deepspeed.utils import zero_to_fp32 as z

    optim_files = sorted(z.get_checkpoint_files(str(tag_dir), "*_optim_states.pt"), key=z.natural_keys)
    optim = [safe_torch_load(f, map_location="cpu")[OPTIMIZER_STATE_DICT] for f in optim_files]
    world = len(optim)
    # every file was proven weights-only loadable by `verify_checkpoint` before this runs
    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    base_key = "base_optimizer_state" if stage <= 2 else OPTIMIZER_STATE_DICT
    moments: dict[str, dict[str, torch.Tensor]] = {}
    steps: set[int] = set()
    for m in MOMENTS:
        flats = []
        for o in optim:
            base = o[base_key]
            per_group = _per_group(base)
            flats.append([g[m] for g in per_group])
            steps.update(_step_of(g["step"]) for g in per_group)
        with contextlib.redirect_stdout(io.StringIO()):
            if stage <= 2:
                merged = z._get_fp32_state_dict_from_zero2_checkpoint(
                    world, flats, model_states, False, optim[0].get(PARAM_ALIGNMENT_PADDINGS)
                )
            else:
                # per rank: the list of its sub-groups' flat partitions, as ZeRO-3 saves its masters
                merged = z.to_torch_tensor(
                    z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, False)
                )
        buffers = set(model_states[0].buffers)
        moments[m] = {k: v for k, v in merged.items() if k not in buffers}
    if len(steps) != 1:
        raise CheckpointError(f"{tag_dir}: the optimizer's groups are at different steps {sorted(steps)}")
    return moments, steps.pop()


def _per_group(base: Any) -> list[dict[str, Any]]:
    """A ZeRO-1/2 base optimizer state as one state per group (a list, or a torch state dict)."""
    return base if isinstance(base, list) else [base["state"][i] for i in sorted(base["state"])]


def _ep_zero12_moments(
    tag_dir: Path, ep: int, model_states: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """ZeRO-1/2 × EP: each moment's flat partitions (laid out like the fp32 masters' partitions)
    merged by `merge_ep_zero12_partitions`, as `consolidate` merges the masters."""
    import_deepspeed()
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE

    optim = ep_zero12_optimizer_states(tag_dir, ep)
    states = [_per_group(o[BASE_OPTIMIZER_STATE]) for o in optim]  # [rank][group] -> {step, exp_avg, ...}
    steps = {_step_of(g["step"]) for per_rank in states for g in per_rank}
    if len(steps) != 1:
        raise CheckpointError(f"{tag_dir}: the optimizer's groups are at different steps {sorted(steps)}")
    moments = {
        m: merge_ep_zero12_partitions(
            tag_dir, ep, model_states, optim, [[g[m] for g in per_rank] for per_rank in states]
        )
        for m in MOMENTS
    }
    return moments, steps.pop()


def _held_expert_moments(tag_dir: Path, ep: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """ZeRO-3 × EP: the experts' AdamW moments from each EP rank's shard file (`HeldExperts.state_dict`),
    whole ``[E, ...]``: the EP ranks' pieces concatenated in rank order."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in MOMENTS}
    steps: set[int] = set()
    for ep_rank in range(ep):
        shard = expert_shard_path(tag_dir, ep_rank, ep)
        optimizer = torch.load(shard, map_location="cpu", weights_only=True).get("optimizer") or {}
        if not optimizer:
            raise CheckpointError(
                f"{shard}: no optimizer state for its experts (saved before the first step?)"
            )
        for name, entry in optimizer.items():
            steps.add(_step_of(entry["step"]))
            for m in MOMENTS:
                pieces[m].setdefault(name, []).append(entry[m].float())
    if len(steps) != 1:
        raise CheckpointError(f"{tag_dir}: the expert shards are at different steps {sorted(steps)}")
    return {m: {n: torch.cat(p, dim=0) for n, p in pieces[m].items()} for m in MOMENTS}, steps.pop()


# --------------------------------------------------------------------------------------- loading


def load_resharded(engine: Any, path: Path, cfg: Config, rank: int, world_size: int) -> dict[str, Any]:
    """Restore ``engine`` from checkpoint ``path`` written on another layout (collective); return the
    checkpoint's state. Call `verify_checkpoint` and `check_compatible` first."""
    state = read_state(path)
    folder = ensure_universal(path)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tensors = {name: load_file(folder / f"{name}.safetensors") for name in _FILES}
    _fill_engine(engine, tensors["fp32"], {m: tensors[m] for m in MOMENTS}, int(meta["step"]), path)
    model_states = safe_torch_load(_model_states_file(path / DS_TAG), map_location="cpu")
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and model_states.get("lr_scheduler") is not None:
        # per-group lists follow the new optimizer's groups (expert parallelism adds its "moe" groups);
        # the trainer sets every group's rate from the config and the restored step
        current = sched.state_dict()
        sched.load_state_dict(
            {
                k: current[k] if isinstance(v, list) and len(v) != len(current.get(k) or []) else v
                for k, v in model_states["lr_scheduler"].items()
            }
        )
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in model_states and hasattr(engine, key):
            setattr(engine, key, model_states[key])
    rng_file = path / "rng" / f"rank_{rank:05d}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    else:  # a rank the source did not have
        seed_everything(cfg.training.seed + 1_000_003 * rank + 7_919 * int(state["step"]))
    return state


def _fill_engine(
    engine: Any,
    masters: dict[str, torch.Tensor],
    moments: dict[str, dict[str, torch.Tensor]],
    step: int,
    path: Path,
) -> None:
    import_deepspeed()
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    module = engine.module
    named = dict(module.named_parameters())
    trained = {n: p for n, p in named.items() if p.requires_grad}
    missing = [n for n in trained if n not in masters or any(n not in moments[m] for m in MOMENTS)]
    if missing:
        raise CheckpointError(f"{path}: no optimizer state for parameters {missing[:3]} of this model")
    layout = expert_layout(engine)
    masters = {**masters, **{n: _local_rows(n, p, masters[n], layout, path) for n, p in trained.items()}}
    moments = {
        m: {**moments[m], **{n: _local_rows(n, p, moments[m][n], layout, path) for n, p in trained.items()}}
        for m in MOMENTS
    }
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer

    def fresh(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return _adam_state(step, {m: torch.zeros_like(flat) for m in MOMENTS})

    with torch.no_grad():
        if stage == 0:
            # fp32: the engine's optimizer is the torch AdamW of the parameters themselves; bf16: DeepSpeed's
            # unfused wrapper keeps an fp32 copy of each parameter (``fp32_groups``) and steps those
            hp_of, base = {}, opt
            if hasattr(opt, "fp32_groups"):
                hp_of = {
                    id(lp): hp
                    for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                    for lp, hp in zip(lps, hps, strict=True)
                }
                base = opt.optimizer
            elif hasattr(opt, "bf16_groups"):
                raise CheckpointError(
                    f"resuming {path} on ZeRO-0 under {type(opt).__name__} is not supported (expected a torch "
                    "optimizer, or DeepSpeed's unfused bf16 wrapper); resume under ZeRO-1"
                )
            for n, p in trained.items():
                hp = hp_of.get(id(p), p)
                hp.copy_(masters[n].to(hp.dtype).view_as(hp))
                p.copy_(masters[n].to(p.dtype).view_as(p))
                base.state[hp] = _adam_state(
                    step, {m: moments[m][n].to(p.device, torch.float32).view_as(p).clone() for m in MOMENTS}
                )
        elif stage in (1, 2):
            base = opt.optimizer
            for i, flat in enumerate(opt.single_partition_of_fp32_groups):
                base.state[flat] = fresh(flat)
                for lp in opt.bit16_groups[i]:
                    if getattr(lp, "_hp_mapping", None) is not None:
                        lp._hp_mapping.set_optim_state_fragment(flat, base.state[flat])
            for n, p in trained.items():
                safe_set_full_fp32_param(p, masters[n].to(p.device))
                for m in MOMENTS:
                    safe_set_full_optimizer_state(p, moments[m][n].to(p.device), m)
                p.copy_(masters[n].to(p.dtype).view_as(p))
        elif stage == 3:
            base = opt.optimizer
            for flat in opt.fp32_partitioned_groups_flat:
                base.state[flat] = fresh(flat)
            for n, p in trained.items():
                safe_set_full_fp32_param(p, masters[n].float())  # the fp32 master, not rounded to p.dtype
                for m in MOMENTS:
                    safe_set_full_optimizer_state(p, moments[m][n].float(), m)
            with deepspeed.zero.GatheredParameters(list(trained.values()), modifier_rank=0):
                for n, p in trained.items():
                    p.data.copy_(masters[n].to(p.dtype).view_as(p))
        else:
            raise CheckpointError(f"unknown ZeRO stage {stage}")
        held = held_experts(engine)
        if held is not None:  # ZeRO-3 × EP: the experts and their AdamW live outside the engine
            _fill_held_experts(held, masters, moments, step, layout, path)
        for n, b in module.named_buffers():
            if n in masters:
                b.copy_(masters[n].to(b.dtype).view_as(b))


def _adam_state(step: int, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One parameter's state in torch AdamW's own layout: a float32 scalar step and the moments."""
    return {"step": torch.tensor(float(step), dtype=torch.float32), **moments}


def _fill_held_experts(
    held: HeldExperts,
    masters: dict[str, torch.Tensor],
    moments: dict[str, dict[str, torch.Tensor]],
    step: int,
    layout: Any,
    path: Path,
) -> None:
    missing = [n for n in held.masters if n not in masters or any(n not in moments[m] for m in MOMENTS)]
    if missing:
        raise CheckpointError(f"{path}: no optimizer state for the experts {missing[:3]} of this model")
    tensors, optimizer = {}, {}
    for n, p in held.params.items():
        tensors[n] = _local_rows(n, p, masters[n], layout, path)
        optimizer[n] = _adam_state(
            step, {m: _local_rows(n, p, moments[m][n], layout, path).float().clone() for m in MOMENTS}
        )
    held.load_state_dict({"tensors": tensors, "optimizer": optimizer}, str(path))


def _local_rows(name: str, param: torch.Tensor, full: torch.Tensor, layout: Any, path: Path) -> torch.Tensor:
    """This rank's experts out of a whole ``[E, ...]`` expert tensor (rows ``[r·E/ep, (r+1)·E/ep)``
    of EP rank ``r``, as `shard_stacked_experts` slices them); any other tensor unchanged."""
    if layout is None or not is_expert_param(param) or full.shape == param.shape:
        return full
    n_local = param.shape[0]
    if full.shape[1:] != param.shape[1:] or full.shape[0] != n_local * layout.ep_size:
        raise CheckpointError(
            f"{path}: expert parameter {name!r} has shape {list(full.shape)}, which ep_size={layout.ep_size} "
            f"does not split into this run's {list(param.shape)}"
        )
    return full.narrow(0, layout.ep_rank * n_local, n_local)
