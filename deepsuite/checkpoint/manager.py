"""Training checkpoints: DeepSpeed's engine state plus deepsuite's own, written so a kill at any
moment leaves the previous checkpoint loadable.

Layout of `checkpoint.dir`::

    latest                  # "step_N": the newest complete checkpoint (replaced atomically, last)
    step_N/
      deepspeed/…           # engine.save_checkpoint (model, optimizer, LR scheduler; ZeRO shards)
      rng/rank_00000.json   # every RNG of each rank
      config.yaml           # the resolved run config
      tokenizer.model       # copy of the tokenizer (tokenizer.json for a Hugging Face one): self-contained
      state.json            # written last: step, sampler position, tokens seen, model config,
                            # a manifest (path → bytes) of every other file and, under ZeRO-0, the
                            # parameter names of each optimizer group (`optimizer_param_names`)

Save sequence: everything goes to `tmp-step_N/`; `state.json` is written last and fsynced; the folder
is renamed to `step_N/`; then `latest` is replaced (write + fsync + `os.replace`); only then are old
checkpoints beyond `keep_last` deleted. Loading never unpickles freely: every DeepSpeed file is first
read with torch's weights-only unpickler (tensors, containers and a short allowlist of DeepSpeed
classes), and the engine's own reads are routed through it too.

Consolidation (`consolidated_state_dict`) gives the fp32 master weights at every ZeRO stage. Under
ZeRO-0 with ``training.dtype=bf16`` DeepSpeed 0.19 wraps the torch AdamW in its
``FP16_UnfusedOptimizer`` (low-precision dtype bf16) and writes everything into
``mp_rank_00_model_states.pt``: ``module`` holds the bf16 model, ``optimizer["fp32_groups"]`` the fp32
master copies, one list per optimizer group in the group's parameter order, without names. The
names come from ``optimizer_param_names`` in state.json (recorded at save time); each master is
checked against the bf16 copy (DeepSpeed writes the module as the master rounded to bf16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from deepsuite.checkpoint.rng import capture_rng_state, restore_rng_state
from deepsuite.config.loader import config_to_dict
from deepsuite.config.schema import Config

STATE_FILE = "state.json"
LATEST_FILE = "latest"
DS_TAG = "deepspeed"
STATE_FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
PAUSE_ENV = "DEEPSUITE_TEST_PAUSE_AT"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not fit the current run."""


def _pause_point(point: str, step: int) -> None:
    """Test hook: with DEEPSUITE_TEST_PAUSE_AT=<point>@<step>, announce the point and wait to be killed."""
    if os.environ.get(PAUSE_ENV) == f"{point}@{step}":
        print(f"DEEPSUITE_TEST_PAUSED {point}@{step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync_file(path)


def model_signature(cfg: Config) -> dict[str, Any]:
    """The model family and its resolved args: what a checkpoint's weights depend on."""
    args = cfg.model.resolved_args
    return {"name": cfg.model.name, "args": dataclasses.asdict(args)}


def step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the `step_N` folders in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def check_writable(ckpt_dir: Path) -> None:
    """Create `ckpt_dir` if needed and make sure files can be written in it."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.dir={str(ckpt_dir)!r} is not writable ({exc.strerror}); choose a writable folder"
        ) from None


# ------------------------------------------------------------------------------------------ saving


def save_checkpoint(
    engine: Any,
    ckpt_dir: str | os.PathLike[str],
    step: int,
    *,
    cfg: Config,
    rank: int,
    world_size: int,
    sampler_state: dict[str, int],
    tokens_seen: int,
    tokenizer_path: str | os.PathLike[str] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `ckpt_dir/step_<step>` (collective: every rank calls it) and return its path."""
    from deepsuite.parallel.dist import barrier

    root = Path(ckpt_dir)
    name = f"step_{step}"
    tmp = root / f"tmp-{name}"
    final = root / name
    if rank == 0:
        check_writable(root)
        for stale in root.glob("tmp-step_*"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _pause_point("tmp_created", step)
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    from deepsuite.parallel.expert_parallel import save_expert_shards

    save_expert_shards(engine, tmp / DS_TAG)  # EP: each EP rank's experts (no-op without EP)
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    _write_durable(rng_dir / f"rank_{rank:05d}.json", json.dumps(capture_rng_state()))
    barrier()
    _pause_point("engine_saved", step)
    if rank == 0:
        import yaml

        _write_durable(tmp / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)  # tokenizer.model or .json
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync_file(p)
                files[p.relative_to(tmp).as_posix()] = p.stat().st_size
        state = {
            "format": STATE_FORMAT,
            "step": step,
            "tokens_seen": tokens_seen,
            "sampler": sampler_state,
            "world_size": world_size,
            "zero_stage": cfg.parallel.zero_stage,
            "model": model_signature(cfg),
            "tokenizer": str(tokenizer_path) if tokenizer_path else "",
            "extra": extra or {},
            "files": files,
        }
        if cfg.parallel.zero_stage == 0:
            names = optimizer_param_names(engine)
            if names is not None:
                state["optimizer_param_names"] = names
        _write_durable(tmp / STATE_FILE, json.dumps(state, indent=1))
        for d in {tmp, *(p.parent for p in tmp.rglob("*"))}:
            _fsync_dir(d)
        _pause_point("state_written", step)
        if final.exists():  # re-saving a step (e.g. after resuming from an older one)
            trash = root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _pause_point("renamed", step)
        pointer = root / f".{LATEST_FILE}.tmp"
        _write_durable(pointer, name + "\n")
        os.replace(pointer, root / LATEST_FILE)
        _fsync_dir(root)
        _pause_point("latest_updated", step)
        rotate(root, cfg.checkpoint.keep_last)
    barrier()
    return final


def optimizer_param_names(engine: Any) -> list[list[str]] | None:
    """Names of the parameters of each optimizer group of ``engine``, in the order in which its
    optimizer wrapper stores their fp32 master copies (None when they cannot be told).

    DeepSpeed's ZeRO-0 mixed-precision wrappers (``FP16_UnfusedOptimizer``, ``FP16_Optimizer``)
    keep the low-precision parameters of group ``i`` in ``fp16_groups[i]`` and save the masters in
    that order with no names; ``BF16_Optimizer`` keeps ``bf16_groups``; without a wrapper (fp32) the
    optimizer's own ``param_groups`` hold the model's parameters.
    """
    module = getattr(engine, "module", None)
    optimizer = getattr(engine, "optimizer", None)
    if module is None or optimizer is None:
        return None
    name_of = {id(p): n for n, p in module.named_parameters()}
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bf16_groups", None)
    if groups is None:
        groups = [g["params"] for g in getattr(optimizer, "param_groups", [])]
    try:
        return [[name_of[id(p)] for p in group] for group in groups]
    except (KeyError, TypeError):
        return None


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (never the one `latest` names)."""
    latest = read_latest(root)
    complete = [p for _, p in step_dirs(root) if (p / STATE_FILE).is_file()]
    removed = []
    for p in complete[: max(0, len(complete) - keep_last)]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for trash in root.glob(".trash-step_*"):
        shutil.rmtree(trash, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------------- finding


def read_latest(root: Path) -> Path | None:
    """The folder named by `root/latest`, or None when there is no pointer."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_RE.match(name):
        raise CheckpointError(
            f"{pointer} is corrupt (holds {name[:40]!r}); delete it to resume from the newest step_N"
        )
    return root / name


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a step folder or a run folder (through `latest`, else the newest
    complete `step_N`)."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or _STEP_RE.match(p.name):
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
        return p
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist; give a run folder or a step_N folder")
    latest = read_latest(p)
    if latest is not None and (latest / STATE_FILE).is_file():
        return latest
    complete = [d for _, d in step_dirs(p) if (d / STATE_FILE).is_file()]
    if complete:
        return complete[-1]
    if latest is not None:
        raise CheckpointError(f"{p / LATEST_FILE} names {latest.name}, which is missing or incomplete")
    raise CheckpointError(f"no checkpoint in {str(p)!r} (no `latest` and no complete step_N folder)")


def checkpoint_tokenizer(path: str | os.PathLike[str]) -> Path | None:
    """The tokenizer file a checkpoint holds (its copy of the data folder's ``tokenizer.json`` or
    ``tokenizer.model``), from a step folder or a run folder; None when it holds none."""
    p = find_checkpoint(path)
    names = ["tokenizer.json", "tokenizer.model"]
    if (p / STATE_FILE).is_file():
        recorded = str(read_state(p).get("tokenizer") or "")
        if recorded:
            names.insert(0, Path(recorded).name)  # the name the copy was saved under
    return next((p / name for name in names if (p / name).is_file()), None)


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike[str]) -> Path | None:
    """`checkpoint.resume` → the folder to load: `never` → None; `auto` → the newest complete
    checkpoint in `ckpt_dir` or None when there is none; otherwise the path given."""
    if resume == "never":
        return None
    if resume == "auto":
        root = Path(ckpt_dir)
        if read_latest(root) is None and not step_dirs(root):
            return None
        return find_checkpoint(root)
    return find_checkpoint(resume)


# ---------------------------------------------------------------------------------------- checking


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder."""
    f = path / STATE_FILE
    if not f.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {STATE_FILE}); it was interrupted while saving"
        )
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({exc})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown {STATE_FILE} format")
    return state


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that a checkpoint is complete (every manifest file present with its size) and safe (every
    DeepSpeed file loads with the weights-only unpickler); return its state."""
    from deepsuite.parallel.deepspeed import safe_torch_load

    p = Path(path)
    state = read_state(p)
    for rel, size in state["files"].items():
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p} is corrupt: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {p} is corrupt: {rel} has {f.stat().st_size} bytes, the manifest says {size}"
            )
    for f in sorted((p / DS_TAG).rglob("*.pt")):
        try:
            safe_torch_load(f, map_location="cpu")
        except Exception as exc:  # pickle errors come as several exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
                first = next(
                    (ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), first
                )
                raise CheckpointError(
                    f"refusing to load {f}: it contains a pickled object that is not tensor data ({first}); "
                    "a checkpoint that names arbitrary code is never unpickled"
                ) from None
            raise CheckpointError(
                f"checkpoint {p} is corrupt: {f.relative_to(p)} cannot be read ({first})"
            ) from None
    return state


def check_compatible(state: dict[str, Any], cfg: Config, path: Path, world_size: int) -> None:
    """Refuse a checkpoint of another model config (naming the field) or an unsupported world change."""
    current = model_signature(cfg)
    saved = state["model"]
    if saved["name"] != current["name"]:
        raise CheckpointError(
            f"checkpoint {path} holds a model.name={saved['name']!r} model, the config asks for "
            f"{current['name']!r}; resume with the same model or set checkpoint.resume=never"
        )
    for key in sorted(set(saved["args"]) | set(current["args"])):
        a, b = saved["args"].get(key), current["args"].get(key)
        if a != b:
            raise CheckpointError(
                f"checkpoint {path} was trained with model.{key}={a!r} but the config has model.{key}={b!r}; "
                "resume with the same model config, or start fresh with checkpoint.resume=never "
                "(or another checkpoint.dir)"
            )
    if state["zero_stage"] > 0 and state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {state['world_size']} ranks with ZeRO-{state['zero_stage']}; "
            f"resuming on {world_size} ranks is not supported (its optimizer shards are per rank). "
            "Resume with the same number of ranks, or start a new run from its weights with "
            "checkpoint.init_from=<its run folder> in a new checkpoint.dir (fresh optimizer state)."
        )


# ----------------------------------------------------------------------------------------- loading


def load_checkpoint(engine: Any, path: Path, rank: int) -> dict[str, Any]:
    """Restore the engine (weights, optimizer, LR scheduler) and this rank's RNGs; return the state.

    Call `verify_checkpoint` and `check_compatible` first.
    """
    from deepsuite.parallel.deepspeed import make_checkpoint_loading_safe

    state = read_state(path)
    make_checkpoint_loading_safe(engine)
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=DS_TAG,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state in {path / DS_TAG}")
    from deepsuite.parallel.expert_parallel import load_expert_shards

    load_expert_shards(engine, path / DS_TAG)  # EP: DeepSpeed's module file holds rank 0's experts only
    rng_file = path / "rng" / f"rank_{rank:05d}.json"
    if rng_file.is_file():
        restore_rng_state(json.loads(rng_file.read_text(encoding="utf-8")))
    else:
        raise CheckpointError(f"checkpoint {path} has no RNG state for rank {rank} ({rng_file.name})")
    return state


def load_config_of(path: Path) -> Config:
    """The resolved run config stored in a checkpoint."""
    from deepsuite.config.loader import config_from_dict, read_yaml

    return config_from_dict(read_yaml(path / "config.yaml"))


_LOW_PRECISION = ("bfloat16", "float16")


def _same_storage_keys(module: dict[str, Any]) -> dict[str, list[str]]:
    """{key: every key of ``module`` that is the same tensor (tied weights), itself included}."""
    by_view: dict[tuple[Any, ...], list[str]] = {}
    for key, value in module.items():
        if hasattr(value, "untyped_storage") and value.numel() > 0:
            storage = value.untyped_storage().data_ptr()
            view = (storage, value.storage_offset(), tuple(value.shape), value.stride())
            by_view.setdefault(view, []).append(key)
    return {key: keys for keys in by_view.values() for key in keys}


def _derived_param_names(path: Path, module: dict[str, Any]) -> list[list[str]]:
    """The optimizer groups' parameter names of a ZeRO-0 checkpoint whose state.json predates
    ``optimizer_param_names``: deepsuite's AdamW grouping (`training.optim.param_groups`) of the
    model its config describes, with DeepSpeed's filter (trainable, non-empty; empty groups dropped).
    The caller checks every master against the stored bf16 copy, so a mismatch cannot pass."""
    import torch

    from deepsuite.models.registry import get_model_spec
    from deepsuite.training.optim import param_groups

    cfg = load_config_of(path)
    with torch.device("meta"):
        model = get_model_spec(cfg.model.name).model_cls(cfg.model.resolved_args)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [
        [name_of[id(p)] for p in g["params"] if p.requires_grad and p.numel() > 0]
        for g in param_groups(model, cfg.optim.weight_decay)
    ]
    names = [g for g in groups if g]
    missing = sorted({n for g in names for n in g} - set(module))
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: its state.json does not record the optimizer's parameter names and "
            f"the model its config describes has parameters the checkpoint lacks ({', '.join(missing[:3])}); "
            "the fp32 master weights cannot be matched to names"
        )
    return names


def _fp32_master_groups(path: Path, optimizer: Any, names: list[list[str]]) -> list[list[Any]]:
    """The fp32 masters of a ZeRO-0 optimizer state (``FP16_UnfusedOptimizer``'s ``fp32_groups``:
    one tensor per parameter), one list per group of ``names``."""
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise CheckpointError(
            f"checkpoint {path}: the optimizer's `fp32_groups` are not lists of tensors per group"
        )
    if [len(g) for g in groups] != [len(g) for g in names]:
        raise CheckpointError(
            f"checkpoint {path}: the optimizer holds {[len(g) for g in groups]} fp32 master weights per "
            f"group, the recorded parameter names {[len(g) for g in names]}"
        )
    return groups


def _zero0_state_dict(path: Path, state: dict[str, Any], tag_dir: Path) -> dict[str, Any]:
    """ZeRO-0: the model states file's module, with each trained parameter taken from the
    optimizer's fp32 master copy when the module was stored in bf16/fp16 (see the module docstring)."""
    import torch

    from deepsuite.fp8.experts import is_extra_state_key
    from deepsuite.parallel.deepspeed import safe_torch_load

    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {path} has no model states file in {tag_dir}")
    saved = safe_torch_load(files[0], map_location="cpu")
    module: dict[str, Any] = {k: v for k, v in saved["module"].items() if not is_extra_state_key(k)}
    out = {
        k: v.float() if isinstance(v, torch.Tensor) and torch.is_floating_point(v) else v
        for k, v in module.items()
    }
    optimizer = saved.get("optimizer")
    if not (isinstance(optimizer, dict) and "fp32_groups" in optimizer):
        ds_config = saved.get("ds_config") or {}
        mixed = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))
        if mixed and any(
            isinstance(v, torch.Tensor) and str(v.dtype).removeprefix("torch.") in _LOW_PRECISION
            for v in module.values()
        ):
            raise CheckpointError(
                f"checkpoint {path} holds bf16/fp16 weights but its model states file has no fp32 master "
                "weights (no optimizer `fp32_groups`); it cannot be consolidated to the fp32 weights"
            )
        return out  # fp32 training: the module is the optimizer's own parameters
    names = state.get("optimizer_param_names") or _derived_param_names(path, module)
    masters = _fp32_master_groups(path, optimizer, names)
    tied = _same_storage_keys(module)
    for group_names, group_masters in zip(names, masters):
        for name, master in zip(group_names, group_masters):
            stored = module.get(name)
            if not isinstance(master, torch.Tensor) or not isinstance(stored, torch.Tensor):
                raise CheckpointError(
                    f"checkpoint {path}: no fp32 master weight or no stored tensor for {name!r}"
                )
            if stored.shape != master.shape:
                raise CheckpointError(
                    f"checkpoint {path}: the fp32 master weight recorded as {name!r} has shape "
                    f"{list(master.shape)}, the model states hold {list(stored.shape)} under that name"
                )
            rounded = master.to(stored.dtype)
            same = (rounded == stored) | (rounded.isnan() & stored.isnan())
            if not bool(same.all()):
                raise CheckpointError(
                    f"checkpoint {path}: the fp32 master weight recorded as {name!r} does not round to "
                    f"the stored {str(stored.dtype).removeprefix('torch.')} copy; the optimizer state does "
                    "not belong to these weights"
                )
            for key in tied.get(name, [name]):
                out[key] = master.float()
    return out


def consolidated_state_dict(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The model's full fp32 state dict from a checkpoint folder (any ZeRO stage): the optimizer's
    fp32 master weights (under bf16 too), in the plain model's layout (FP8 Transformer Engine
    experts stacked back, ``_extra_state`` entries dropped)."""
    from deepsuite.fp8.experts import stack_te_expert_state_dict

    tag_dir = path / DS_TAG
    if any(tag_dir.glob("expert_shard_*.pt")):  # expert parallel: EP-aware merge of the ZeRO shards
        from deepsuite.parallel.consolidate import consolidate_state_dict

        return stack_te_expert_state_dict(consolidate_state_dict(tag_dir))
    if state["zero_stage"] == 0:
        return stack_te_expert_state_dict(_zero0_state_dict(path, state, tag_dir))
    from deepsuite.parallel.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's consolidation unpickles freely; verify_checkpoint() has already proven every
    # file loads with the weights-only unpickler. Its progress prints ("Processing zero checkpoint
    # ...") would land in the output of `generate` / `convert`: kept out of stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    return stack_te_expert_state_dict(state_dict)


def load_model_from_checkpoint(
    path: str | os.PathLike[str], device: str = "cpu"
) -> tuple[Any, dict[str, Any], Config]:
    """(model with the checkpoint's weights in fp32, state, run config) — for generation and conversion."""
    from deepsuite.checkpoint.hf_io import load_state_dict_strict
    from deepsuite.models.registry import build_model

    p = find_checkpoint(path)
    state = verify_checkpoint(p)
    cfg = load_config_of(p)
    model = build_model(cfg.model, device=device)
    sd = consolidated_state_dict(p, state)
    load_state_dict_strict(model, sd, source=str(p))
    model.eval()
    # the run's tokenizer travels with the weights: save_hf/save_model export it beside them
    return model, state, cfg
