"""The vision package stands apart: it imports only torch (and itself); the LLM path never loads it."""

from __future__ import annotations

import subprocess
import sys

import deepsuite.vision as vision
import deepsuite.vision.heads as heads
import deepsuite.vision.layers as layers
import deepsuite.vision.losses as losses

PUBLIC = {
    heads: ["ClassificationHead", "ImageClassificationHead", "BoxHead", "CenterNetHead", "HeatmapHead"],
    losses: ["FocalLoss", "GIoULoss", "DIoULoss", "CenterNetLoss"],
    layers: [
        "Bottleneck",
        "ComplexConv2d",
        "ComplexBatchNorm2d",
        "DFT",
        "HermiteFeatures",
        "LaguerreFeatures",
    ],
}


def loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return set(out.stdout.split())


def test_public_names_from_both_paths():
    for module, names in PUBLIC.items():
        for name in names:
            assert getattr(module, name) is getattr(vision, name), name
            assert name in module.__all__ and name in vision.__all__


def test_vision_imports_only_torch_and_itself():
    modules = loaded_modules("import deepsuite.vision")
    ours = {m for m in modules if m.startswith("deepsuite")}
    assert ours - {"deepsuite"} == {m for m in ours if m.startswith("deepsuite.vision")}
    assert not {"transformers", "deepspeed", "transformer_engine"} & {m.split(".")[0] for m in modules}
    assert "torch.distributed.distributed_c10d" not in modules or "torch.distributed" in loaded_modules(
        "import torch"
    )


def test_llm_path_does_not_load_vision():
    code = "\n".join(
        f"try:\n    import {name}\nexcept ImportError:\n    pass"
        for name in (
            "deepsuite.models",
            "deepsuite.layers",
            "deepsuite.heads",
            "deepsuite.loss",
            "deepsuite.generation",
        )
    )
    modules = loaded_modules(code)
    assert "deepsuite.layers" in modules
    assert not any(m.startswith("deepsuite.vision") for m in modules)
