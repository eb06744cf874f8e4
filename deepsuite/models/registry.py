"""Model registry: family name -> `ModelSpec`.

The contract every family follows (the trainer, `parallel/`, `fp8/`, `checkpoint/` and `tools/`
rely on it):

* ``model = spec.model_cls(args)`` builds the model; it works under ``torch.device("meta")``;
  ``model.init_weights()`` (re)initialises every parameter and buffer in place.
* ``model(input_ids)`` returns logits ``(B, T, V)``; ``model(input_ids, labels=labels)`` returns
  an `LMOutput` (loss through fused linear cross-entropy; labels are already shifted, i.e.
  ``labels[:, t]`` is the target of position ``t``, ``-100`` ignored).
* ``model.generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)``.
* ``model.args`` is the family's args dataclass.
* ``spec.parallelize`` is a ``"module:function"`` path under ``deepsuite.parallel`` (resolved lazily,
  so model code never imports distributed machinery).
* ``spec.hf_adapter`` is a module path with ``config_to_hf``, ``config_from_hf``,
  ``state_dict_to_hf`` and ``state_dict_from_hf``; ``spec.hf_model_types`` the HF ``model_type`` values.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepsuite.config.errors import ConfigError
from deepsuite.config.loader import MODEL_FAMILIES, family_module, resolve_model_args
from deepsuite.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """Everything deepsuite needs to know about one model family."""

    name: str
    args_cls: type
    flavors: dict[str, Any]
    model_path: str
    parallelize: str
    hf_adapter: str
    hf_model_types: tuple[str, ...]

    @property
    def model_cls(self) -> type[nn.Module]:
        """The model class (imported on first use)."""
        module, _, attr = self.model_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def parallelize_fn(self) -> Callable[..., nn.Module]:
        """The ``parallelize(model, dims, cfg)`` function from ``deepsuite.parallel``."""
        module, _, attr = self.parallelize.partition(":")
        return getattr(importlib.import_module(module), attr)

    def adapter(self) -> Any:
        """The HF adapter module."""
        return importlib.import_module(self.hf_adapter)


_SPECS: dict[str, dict[str, Any]] = {
    "gpt": dict(
        model_path="deepsuite.models.gpt.model:GPT",
        parallelize="deepsuite.parallel.parallelize:parallelize_model",
        hf_adapter="deepsuite.models.gpt.hf_adapter",
        hf_model_types=("gpt2",),
    ),
    "deepseek_v3": dict(
        model_path="deepsuite.models.deepseek_v3.model:DeepSeekV3",
        parallelize="deepsuite.parallel.parallelize:parallelize_model",
        hf_adapter="deepsuite.models.deepseek_v3.hf_adapter",
        hf_model_types=("deepseek_v3",),
    ),
}


def get_model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of family ``name`` (``gpt`` or ``deepseek_v3``)."""
    module = family_module(name)
    return ModelSpec(name=name, args_cls=module.ARGS_CLASS, flavors=module.FLAVORS, **_SPECS[name])


def family_for_hf_model_type(model_type: str) -> ModelSpec:
    """The family that reads HF checkpoints of ``model_type`` (from config.json)."""
    for name in MODEL_FAMILIES:
        if model_type in _SPECS[name]["hf_model_types"]:
            return get_model_spec(name)
    known = sorted(t for s in _SPECS.values() for t in s["hf_model_types"])
    raise ConfigError(f"HF model_type={model_type!r} is not supported (supported: {known})")


def build_model(
    model_cfg: ModelConfig | None = None,
    *,
    name: str | None = None,
    flavor: str | None = None,
    device: str | torch.device = "cpu",
    init: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build a model from a `ModelConfig` or from ``name``/``flavor`` plus field overrides.

    On ``device="meta"`` nothing is allocated (use it to count parameters); otherwise the model is
    built on meta, materialised on ``device`` and, if ``init``, initialised with ``init_weights()``.
    """
    if model_cfg is None:
        if name is None or flavor is None:
            raise ConfigError("build_model needs a ModelConfig or both name= and flavor=")
        model_cfg = ModelConfig(name=name, flavor=flavor, args=dict(overrides))
    elif overrides:
        model_cfg = dataclasses.replace(model_cfg, args={**model_cfg.args, **overrides})
    args = resolve_model_args(model_cfg)
    spec = get_model_spec(model_cfg.name)
    with torch.device("meta"):
        model = spec.model_cls(args)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights()  # type: ignore[operator]
    return model
