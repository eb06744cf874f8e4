"""Hugging Face folders in and out, for any registered family (`deepsuite.models.load_hf` /
`save_hf` are these functions).

``load_hf(path)`` reads config.json, finds the family by ``model_type`` in the registry, converts
config and weights with the family's HF adapter, builds the model on meta and loads strictly.
``save_hf(model, path)`` does the reverse. The adapters are pure functions on state dicts
(`deepsuite.models.<family>.hf_adapter`); the folder format is `deepsuite.checkpoint.hf_io`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deepsuite.checkpoint.hf_io import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointFormatError,
    load_state_dict_strict,
    materialize,
    read_hf_folder,
    write_hf_folder,
)
from deepsuite.config.errors import ConfigError
from deepsuite.models.registry import family_for_hf_model_type, get_model_spec, model_family, unwrap_model

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def load_hf(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load an HF model folder (config.json + safetensors) as a deepsuite model.

    ``dtype=None`` keeps deepsuite's float32 parameters; pass e.g. ``torch.bfloat16`` to cast.
    The model is returned in eval mode (dropout off), as transformers' ``from_pretrained`` does; call
    ``model.train()`` to train it. Missing or unexpected weights, a config.json that lacks a key the
    family needs and corrupt files (with ``verify``: also files that do not match the folder's
    manifest.json) raise `CheckpointFormatError` naming them.
    """
    config, tensors = read_hf_folder(path, verify=verify)
    config_file = Path(path) / CONFIG_FILE
    if "model_type" not in config:
        raise CheckpointFormatError(f"{config_file} has no model_type")
    spec = family_for_hf_model_type(str(config["model_type"]))
    adapter = spec.adapter()
    try:
        args = adapter.config_from_hf(config)
    except (ConfigError, CheckpointFormatError):
        raise
    except KeyError as exc:
        raise CheckpointFormatError(
            f"{config_file} lacks {_key_of(exc, 'the key {!r}')}, which a {config['model_type']} config needs; add it "
            "(the model's original config.json has it)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(
            f"{config_file} has a value of the wrong type or form ({_one_line(exc)}); fix it"
        ) from None
    try:
        state_dict = adapter.state_dict_from_hf(tensors, args)
    except (ConfigError, CheckpointFormatError):
        raise
    except (KeyError, RuntimeError) as exc:
        what = (
            _key_of(exc, "a weight (or weight part) {!r} is missing")
            if isinstance(exc, KeyError)
            else _one_line(exc)
        )
        raise CheckpointFormatError(
            f"the safetensors of {path} do not fit the {spec.name} model its config.json describes: {what}; "
            "check that the weights are complete and come from the model of that config.json (remove foreign "
            "tensors)"
        ) from None
    with torch.device("meta"):
        model = spec.model_cls(args)
    model = materialize(model, device, dtype)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model.eval()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _key_of(exc: KeyError, bare: str) -> str:
    """A KeyError's message: its own sentence, or ``bare`` formatted with the key it was raised for."""
    detail = exc.args[0] if exc.args else ""
    if isinstance(detail, str) and " " in detail:
        return detail
    return bare.format(detail)


def save_hf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` as an HF folder that transformers' ``from_pretrained`` reads (atomically).

    ``tokenizer`` (a tokenizer file, e.g. `checkpoint.manager.checkpoint_tokenizer` of the source
    checkpoint; None: none) is written too, as ``AutoTokenizer.from_pretrained`` reads it, and its
    special ids go into ``config.json``.
    """
    model = unwrap_model(model)
    spec = get_model_spec(model_family(model))
    adapter = spec.adapter()
    args = model.args
    config = adapter.config_to_hf(args)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    config["torch_dtype"] = config["dtype"] = dtype_name
    state_dict = adapter.state_dict_to_hf(model.state_dict(), args)
    return write_hf_folder(
        path, config, state_dict, max_shard_bytes=max_shard_bytes, overwrite=overwrite, tokenizer=tokenizer
    )
