"""Measured FP8 / bf16 training throughput per model shape: the one table to update after a GPU run.

`prepare_fp8` looks the model up here and, where FP8 was measured slower than bf16, says so in the
run's start-up report (ratio, device, configuration, result file) instead of silently slowing the
run. A model matches an entry when every field of the entry's ``shape`` equals its ``model.args``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepsuite.config.families import MODEL_FAMILIES

# Fields that identify a model's shape (max_seq_len, rope and dropout do not change the ratio much).
_SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "moe_inter_dim")


@dataclass(frozen=True)
class MeasuredRatio:
    """One measurement of FP8 / bf16 tokens/s of whole training steps."""

    model: str
    """Flavor name or a description of the shape."""
    shape: tuple[tuple[str, int], ...]
    """(field, value) pairs of ``model.args`` that identify the model."""
    backend: str
    """FP8 backend measured: ``native`` or ``te``."""
    ratio: float
    """FP8 tokens/s / bf16 tokens/s."""
    device: str
    """GPU it was measured on."""
    setting: str
    """How: eager or compiled, batch."""
    source: str
    """Result file (and commit) it comes from."""

    def describe(self) -> str:
        return f"{self.ratio:.2f}x on {self.device} ({self.setting}; {self.source})"


def flavor_shape(flavor: str) -> tuple[tuple[str, int], ...]:
    """The shape fields of a named flavor of any family."""
    for family in MODEL_FAMILIES.values():
        if flavor in family.flavors:
            args = family.flavors[flavor]
            return tuple((f, getattr(args, f)) for f in _SHAPE_FIELDS if hasattr(args, f))
    raise KeyError(flavor)


_H200 = "tools/benchmarks/results/mfu_NVIDIA_H200.json"
# tools/benchmarks/mfu_gpu.py's 1B GPT: gpt2-xl with d 2048, 18 layers, 16 heads
_GPT_1B = (("d_model", 2048), ("n_layers", 18), ("n_heads", 16))

MEASURED: list[MeasuredRatio] = [
    MeasuredRatio(
        "deepseek-v3-small",
        flavor_shape("deepseek-v3-small"),
        "native",
        0.17,
        "NVIDIA H200",
        "eager, batch 16x2048",
        f"{_H200} @ c3752be",
    ),
    MeasuredRatio(
        "deepseek-v3-small",
        flavor_shape("deepseek-v3-small"),
        "native",
        0.20,
        "NVIDIA H200",
        "eager, batch 16x2048",
        f"{_H200} @ c9ad1eb",
    ),
    MeasuredRatio(
        "deepseek-v3-large",
        flavor_shape("deepseek-v3-large"),
        "native",
        0.11,
        "NVIDIA H200",
        "eager, batch 8x2048",
        _H200,
    ),
    MeasuredRatio(
        "gpt d2048 x 18 (1B)", _GPT_1B, "native", 0.73, "NVIDIA H200", "eager, batch 16x2048", _H200
    ),
    MeasuredRatio(
        "gpt d2048 x 18 (1B)", _GPT_1B, "native", 1.17, "NVIDIA H200", "compiled blocks, batch 16x2048", _H200
    ),
]


def measurements_for(
    args: Any, backend: str, table: list[MeasuredRatio] | None = None
) -> list[MeasuredRatio]:
    """Entries of ``table`` (default `MEASURED`) for a model with arguments ``args`` and ``backend``."""
    if args is None:
        return []
    return [
        m
        for m in (MEASURED if table is None else table)
        if m.backend == backend and all(getattr(args, f, None) == v for f, v in m.shape)
    ]


def slowdown_warning(
    args: Any, backend: str, device_name: str, table: list[MeasuredRatio] | None = None
) -> str | None:
    """A one-line warning when FP8 on this model was measured slower than bf16 (some ratio < 1),
    listing every measurement of it; None when nothing slower was measured."""
    found = measurements_for(args, backend, table)
    if not any(m.ratio < 1.0 for m in found):
        return None
    here = [m for m in found if m.device == device_name]
    where = "" if here else f" (this run is on {device_name}, measured elsewhere)"
    return (
        f"FP8 measured SLOWER than bf16 for {found[0].model}: FP8 / bf16 tokens/s "
        + "; ".join(m.describe() for m in found)
        + f"{where}; set fp8.enabled=false to train at bf16 speed"
    )
