"""Conversions behind `deepsuite convert`: HF folder ↔ deepsuite folder, training checkpoint → HF.

The file formats live in `deepsuite.checkpoint.hf_io` and the key/config mapping in each family's
HF adapter; a training checkpoint (any ZeRO stage) is consolidated with DeepSpeed's own
`zero_to_fp32` after its files passed the weights-only check.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepsuite.checkpoint.manager import find_checkpoint, load_model_from_checkpoint

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""`--dtype` choices of `deepsuite convert`: the dtype the written weights are stored in."""


def _cast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    return model if dtype is None else model.to(dtype)


def hf_to_deepsuite(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """An HF folder (config.json + safetensors) → a deepsuite folder (model.yaml + safetensors);
    weights stored in ``dtype`` (None: float32)."""
    from deepsuite.checkpoint.hf_io import save_model
    from deepsuite.models.hf import load_hf

    return save_model(_cast(load_hf(src), dtype), dst, overwrite=overwrite)


def deepsuite_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """A deepsuite folder (model.yaml) or a training checkpoint → an HF folder; weights stored in
    ``dtype`` (None: float32)."""
    from deepsuite.checkpoint.hf_io import MODEL_YAML, load_model
    from deepsuite.models.hf import save_hf

    if (Path(src) / MODEL_YAML).is_file():
        model = load_model(src)
    else:
        model, _, _ = load_model_from_checkpoint(src)
    return save_hf(_cast(model, dtype), dst, overwrite=overwrite)


def zero_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """A training checkpoint (run folder or step_N; ZeRO 0-3) → an HF folder; the consolidated
    fp32 weights stored in ``dtype`` (None: float32)."""
    from deepsuite.models.hf import save_hf

    model, _, _ = load_model_from_checkpoint(find_checkpoint(src))
    return save_hf(_cast(model, dtype), dst, overwrite=overwrite)
