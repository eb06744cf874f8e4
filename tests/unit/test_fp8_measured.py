"""The start-up report names a measured FP8 slowdown (issue 17): table lookup and prepare_fp8's summary."""

from __future__ import annotations

import logging

import pytest

from deepsuite.config.families import MODEL_FAMILIES
from deepsuite.config.schema import FP8Config
from deepsuite.fp8 import measured, prepare_fp8
from deepsuite.fp8.measured import MEASURED, MeasuredRatio, flavor_shape, slowdown_warning
from deepsuite.fp8.native import scaled_mm_unusable_reason
from deepsuite.models import build_model


def _args(flavor: str) -> object:
    for family in MODEL_FAMILIES.values():
        if flavor in family.flavors:
            return family.flavors[flavor]
    raise KeyError(flavor)


def test_table_warns_for_deepseek_v3_small_with_ratio_device_and_source() -> None:
    line = slowdown_warning(_args("deepseek-v3-small"), "native", "NVIDIA H200")
    assert line is not None
    assert "SLOWER" in line and "0.17x" in line and "0.20x" in line
    assert "NVIDIA H200" in line and "mfu_NVIDIA_H200.json" in line
    assert "measured elsewhere" not in line
    elsewhere = slowdown_warning(_args("deepseek-v3-large"), "native", "cpu")
    assert elsewhere is not None and "0.11x" in elsewhere and "this run is on cpu" in elsewhere


def test_no_warning_without_a_slower_measurement() -> None:
    assert slowdown_warning(_args("deepseek-v3-small"), "te", "NVIDIA H200") is None  # not measured
    assert slowdown_warning(_args("gpt2-small"), "native", "NVIDIA H200") is None
    assert slowdown_warning(None, "native", "cpu") is None
    faster = [MeasuredRatio("x", flavor_shape("gpt2-debug"), "native", 1.3, "GPU", "eager", "f.json")]
    assert slowdown_warning(_args("gpt2-debug"), "native", "GPU", faster) is None


def test_every_entry_names_its_source_and_a_positive_ratio() -> None:
    for m in MEASURED:
        assert m.ratio > 0 and m.source and m.device and m.shape


@pytest.mark.skipif(
    scaled_mm_unusable_reason("cpu") is not None, reason="torch._scaled_mm does not run on CPU"
)
def test_prepare_fp8_summary_carries_the_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    entry = MeasuredRatio(
        "gpt2-debug", flavor_shape("gpt2-debug"), "native", 0.5, "NVIDIA H200", "eager", "results/x.json"
    )
    monkeypatch.setattr(measured, "MEASURED", [entry])
    model = build_model(name="gpt", flavor="gpt2-debug", device="cpu")
    with caplog.at_level(logging.WARNING, logger="deepsuite.fp8"):
        ctx = prepare_fp8(model, FP8Config(enabled=True, backend="native"))
    assert ctx.backend == "native" and ctx.converted
    assert "FP8 measured SLOWER than bf16 for gpt2-debug" in ctx.summary
    assert "0.50x on NVIDIA H200 (eager; results/x.json)" in ctx.summary
    assert any("SLOWER" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(measured, "MEASURED", [])
    clean = prepare_fp8(
        build_model(name="gpt", flavor="gpt2-debug", device="cpu"), FP8Config(enabled=True, backend="native")
    )
    assert "SLOWER" not in clean.summary
