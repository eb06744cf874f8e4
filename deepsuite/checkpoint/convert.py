"""Conversions behind `deepsuite convert` and `deepsuite consolidate`: HF folder ↔ deepsuite folder,
training checkpoint → HF or deepsuite folder.

The file formats live in `deepsuite.checkpoint.hf_io` and the key/config mapping in each family's
HF adapter; a training checkpoint (any ZeRO stage and EP layout) is consolidated by
`deepsuite.checkpoint.consolidate` after its files passed the weights-only check. Both commands
export a training checkpoint through `consolidate_checkpoint`.

The tokenizer travels with the weights: a training checkpoint's or deepsuite folder's
``tokenizer.model`` / ``tokenizer.json`` (bundle) is written into the HF folder as transformers reads
it (with its special ids in ``config.json``), and an HF folder's tokenizer is bundled into the
deepsuite folder. A source without a tokenizer gives a folder without one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from deepsuite.checkpoint.atomic import checkpoint_file
from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
from deepsuite.checkpoint.hf import load_hf, save_hf
from deepsuite.checkpoint.hf_io import MODEL_YAML, folder_tokenizer, load_model, save_model
from deepsuite.checkpoint.manager import checkpoint_tokenizer, find_checkpoint
from deepsuite.data.errors import DataError
from deepsuite.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, Tokenizer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""`--dtype` choices of `deepsuite convert`: the dtype the written weights are stored in."""


def _cast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    return model if dtype is None else model.to(dtype)


def _hf_folder_tokenizer(folder: Path) -> Path | None:
    """The tokenizer of an HF model folder when deepsuite can use it: the folder itself (with
    ``tokenizer.json`` and a known end-of-document token) or its ``tokenizer.model``; else None."""
    candidates = [folder] if checkpoint_file(folder / HF_TOKENIZER_FILE) else []
    candidates += [folder / SENTENCEPIECE_FILE] if checkpoint_file(folder / SENTENCEPIECE_FILE) else []
    for candidate in candidates:
        try:
            Tokenizer(candidate)
        except DataError:  # e.g. no end-of-document token: the weights convert without it
            continue
        return candidate
    return None


def hf_to_deepsuite(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Path:
    """An HF folder (config.json + safetensors) → a deepsuite folder (model.yaml + safetensors, and
    the folder's tokenizer when deepsuite can use it); weights stored in ``dtype`` (None: float32).
    ``verify``: check SRC against its manifest.json first (when it has one)."""
    model = _cast(load_hf(src, verify=verify), dtype)
    return save_model(model, dst, overwrite=overwrite, tokenizer=_hf_folder_tokenizer(Path(src)))


def deepsuite_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Path:
    """A deepsuite folder (model.yaml) or a training checkpoint → an HF folder, with the source's
    tokenizer when it has one; weights stored in ``dtype`` (None: float32). ``verify``: check SRC
    against its manifest.json first."""
    if not checkpoint_file(Path(src) / MODEL_YAML):
        return zero_to_hf(src, dst, overwrite=overwrite, dtype=dtype, verify=verify)
    model = _cast(load_model(src, verify=verify), dtype)
    return save_hf(model, dst, overwrite=overwrite, tokenizer=folder_tokenizer(src))


def consolidate_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    format: Literal["hf", "deepsuite"] = "hf",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """A training checkpoint (run folder or step_N; any ZeRO stage and EP layout) → an HF or a
    deepsuite folder of its consolidated fp32 weights, stored in ``dtype`` (None: float32), with the
    run's tokenizer. Returns the folder and the checkpoint's state. ``verify=False`` skips the
    checksums (never the weights-only check)."""
    path = find_checkpoint(src)
    model, state, _ = load_model_from_checkpoint(path, verify=verify)  # verified, then consolidated
    save = save_hf if format == "hf" else save_model
    out = save(_cast(model, dtype), dst, overwrite=overwrite, tokenizer=checkpoint_tokenizer(path))
    return out, state


def zero_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Path:
    """A training checkpoint → an HF folder: `consolidate_checkpoint` (`deepsuite convert zero-to-hf`)."""
    return consolidate_checkpoint(src, dst, overwrite=overwrite, dtype=dtype, verify=verify)[0]
