"""Conversions behind `deepsuite convert`: HF folder ↔ deepsuite folder, training checkpoint → HF.

The file formats live in `deepsuite.checkpoint.hf_io` and the key/config mapping in each family's
HF adapter; a training checkpoint (any ZeRO stage) is consolidated with DeepSpeed's own
`zero_to_fp32` after its files passed the weights-only check.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepsuite.checkpoint.manager import find_checkpoint, load_model_from_checkpoint


def hf_to_deepsuite(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """An HF folder (config.json + safetensors) → a deepsuite folder (model.yaml + safetensors)."""
    from deepsuite.checkpoint.hf_io import save_model
    from deepsuite.models.hf import load_hf

    return save_model(load_hf(src), dst, overwrite=overwrite)


def deepsuite_to_hf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """A deepsuite folder (model.yaml) or a training checkpoint → an HF folder."""
    from deepsuite.checkpoint.hf_io import MODEL_YAML, load_model
    from deepsuite.models.hf import save_hf

    if (Path(src) / MODEL_YAML).is_file():
        model = load_model(src)
    else:
        model, _, _ = load_model_from_checkpoint(src)
    return save_hf(model, dst, overwrite=overwrite)


def zero_to_hf(src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """A training checkpoint (run folder or step_N; ZeRO 0-3) → an HF folder with fp32 weights."""
    from deepsuite.models.hf import save_hf

    model, _, _ = load_model_from_checkpoint(find_checkpoint(src))
    return save_hf(model, dst, overwrite=overwrite)
