"""Start a fresh training run from existing weights (``checkpoint.init_from``).

The source can be a Hugging Face folder (``config.json`` + safetensors, e.g. what
``deepsuite convert zero-to-hf`` writes or a transformers ``GPT2LMHeadModel`` /
``DeepseekV3ForCausalLM`` folder), a deepsuite model folder (``model.yaml``), or a training
checkpoint (a run folder or ``step_N``; any ZeRO stage and EP layout, consolidated on load). This is
also how a run changes its world size or ``ep_size``: point ``init_from`` at the old run.

The run's own model config decides the architecture; the source must match it field for field
(training-only fields such as dropout, init_std and the balance-loss weight may differ). MTP modules
are the one allowed structural difference: modules the source lacks are initialised fresh, extra
ones in the source are dropped; both are reported. Optimizer state, step and data position are
not taken over: the run starts at step 0 with these weights.

The whole source model is read into CPU memory on every rank before the engine is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from deepsuite.checkpoint.atomic import checkpoint_file
from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
from deepsuite.checkpoint.hf import load_hf
from deepsuite.checkpoint.hf_io import MODEL_YAML, folder_tokenizer, load_model
from deepsuite.checkpoint.manager import checkpoint_tokenizer, find_checkpoint
from deepsuite.config.errors import ConfigError

# fields that change training, not the function the weights compute
_TRAINING_ONLY_FIELDS = frozenset({"dropout", "init_std", "balance_loss_alpha", "mtp_depth"})


def load_source_model(path: Path, verify: bool = True) -> tuple[nn.Module, str, Path | None]:
    """The model in ``path`` (an HF folder, a deepsuite model folder, a run or a step_N folder),
    what kind of folder that is, and the tokenizer file stored with it (None where it has none);
    its files checked against their checksums first (``verify``)."""
    if checkpoint_file(path / "config.json"):
        return load_hf(path, verify=verify), "Hugging Face folder", folder_tokenizer(path)
    if checkpoint_file(path / MODEL_YAML):
        return load_model(path, verify=verify), "deepsuite model folder", folder_tokenizer(path)
    step = find_checkpoint(path)
    model, state, _ = load_model_from_checkpoint(step, verify=verify)
    recorded = state.get("tokenizer")  # the data folder's file, where the checkpoint kept no copy
    tokenizer = checkpoint_tokenizer(step) or (Path(recorded) if recorded else None)
    return model, "training checkpoint", tokenizer


def _architecture_mismatches(ours: Any, theirs: Any) -> list[str]:
    """``model.<field>=<ours> here, <theirs> in the source`` for every differing field."""
    if type(ours) is not type(theirs):
        names = {"GPTConfig": "gpt", "DeepSeekV3Config": "deepseek_v3"}
        a, b = (names.get(type(c).__name__, type(c).__name__) for c in (ours, theirs))
        return [f"model.name={a} here, {b} in the source"]
    out = []
    for f in dataclasses.fields(ours):
        if f.name in _TRAINING_ONLY_FIELDS:
            continue
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if a != b:
            out.append(f"model.{f.name}={a!r} here, {b!r} in the source")
    return out


def missing_source_error(init_from: str) -> ConfigError:
    """The error for a `checkpoint.init_from` path that does not exist."""
    return ConfigError(
        f"checkpoint.init_from={init_from!r} does not exist; give an HF folder, a deepsuite model folder "
        "or a training run/step_N folder"
    )


def load_initial_weights(model: nn.Module, init_from: str, verify: bool = True) -> str:
    """Copy the weights of ``init_from`` into ``model`` (freshly built from the run's config, not yet
    parallelised or handed to DeepSpeed); returns a one-line summary for the log.

    Raises `ConfigError` naming the path when it does not exist or its architecture differs from
    the run's (each differing field with both values), and `CheckpointFormatError` /
    `CheckpointError` (via the loaders) when its files are unreadable or, with ``verify``
    (``checkpoint.verify``), do not match their checksums.
    """
    path = Path(init_from)
    if not path.exists():
        raise missing_source_error(init_from)
    source, kind, _ = load_source_model(path, verify)
    ours, theirs = getattr(model, "args", None), getattr(source, "args", None)
    if ours is None or theirs is None:
        raise ConfigError(f"checkpoint.init_from={init_from!r}: cannot compare architectures (no model args)")
    mismatches = _architecture_mismatches(ours, theirs)
    if mismatches:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r} ({kind}) has a different architecture: "
            + "; ".join(mismatches)
            + ". Set those model keys to the source's values (or pick the matching model.flavor)"
        )
    target = model.state_dict()
    source_sd = source.state_dict()
    shape_errors = [
        f"{k}: {tuple(target[k].shape)} here, {tuple(v.shape)} in the source"
        for k, v in source_sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if shape_errors:  # the args agree, so this is a corrupt or foreign source
        raise ConfigError(
            f"checkpoint.init_from={init_from!r}: tensor shapes differ: {'; '.join(shape_errors[:5])}"
        )
    fresh = sorted(k for k in target if k not in source_sd)
    dropped = sorted(k for k in source_sd if k not in target)
    unexplained = [k for k in fresh + dropped if not k.startswith("mtp.")]
    if unexplained:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r}: weights do not line up with the model: {unexplained[:5]}"
        )
    model.load_state_dict({k: v for k, v in source_sd.items() if k in target}, strict=False)
    n_params = sum(v.numel() for k, v in source_sd.items() if k in target)
    summary = (
        f"initialised from {init_from} ({kind}): {len(target) - len(fresh)} tensors, {n_params:,} values"
    )
    if fresh:
        summary += f"; {len(fresh)} MTP tensors not in the source start fresh"
    if dropped:
        summary += f"; {len(dropped)} MTP tensors of the source dropped (model.mtp_depth is smaller)"
    return summary
