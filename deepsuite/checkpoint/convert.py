"""Conversions behind `deepsuite convert`: HF folder ↔ deepsuite folder, training checkpoint → HF.

The file formats live in `deepsuite.checkpoint.hf_io` and the key/config mapping in each family's
HF adapter; a training checkpoint (any ZeRO stage) is consolidated with DeepSpeed's own
`zero_to_fp32` after its files passed the weights-only check.

The tokenizer travels with the weights: a training checkpoint's or deepsuite folder's
``tokenizer.model`` / ``tokenizer.json`` (bundle) is written into the HF folder as transformers reads
it (with its special ids in ``config.json``), and an HF folder's tokenizer is bundled into the
deepsuite folder. A source without a tokenizer gives a folder without one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepsuite.checkpoint.manager import checkpoint_tokenizer, find_checkpoint, load_model_from_checkpoint

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
    from deepsuite.data.errors import DataError
    from deepsuite.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE, Tokenizer

    candidates = [folder] if (folder / HF_TOKENIZER_FILE).is_file() else []
    candidates += [folder / SENTENCEPIECE_FILE] if (folder / SENTENCEPIECE_FILE).is_file() else []
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
) -> Path:
    """An HF folder (config.json + safetensors) → a deepsuite folder (model.yaml + safetensors, and
    the folder's tokenizer when deepsuite can use it); weights stored in ``dtype`` (None: float32)."""
    from deepsuite.checkpoint.hf_io import save_model
    from deepsuite.models.hf import load_hf

    model = _cast(load_hf(src), dtype)
    return save_model(model, dst, overwrite=overwrite, tokenizer=_hf_folder_tokenizer(Path(src)))


def deepsuite_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """A deepsuite folder (model.yaml) or a training checkpoint → an HF folder, with the source's
    tokenizer when it has one; weights stored in ``dtype`` (None: float32)."""
    from deepsuite.checkpoint.hf_io import MODEL_YAML, folder_tokenizer, load_model
    from deepsuite.models.hf import save_hf

    if (Path(src) / MODEL_YAML).is_file():
        model = load_model(src)
        tokenizer = folder_tokenizer(src)
    else:
        model, _, _ = load_model_from_checkpoint(src)
        tokenizer = checkpoint_tokenizer(src)
    return save_hf(_cast(model, dtype), dst, overwrite=overwrite, tokenizer=tokenizer)


def zero_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """A training checkpoint (run folder or step_N; ZeRO 0-3) → an HF folder with the run's
    tokenizer; the consolidated fp32 weights stored in ``dtype`` (None: float32)."""
    from deepsuite.models.hf import save_hf

    path = find_checkpoint(src)
    model, _, _ = load_model_from_checkpoint(path)
    return save_hf(_cast(model, dtype), dst, overwrite=overwrite, tokenizer=checkpoint_tokenizer(path))
