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

The families themselves are listed once, in `deepsuite.config.families.MODEL_FAMILIES`; a
`ModelSpec` is that entry plus the imports of its code.
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
from deepsuite.config.families import MODEL_FAMILIES, Family, get_family
from deepsuite.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelSpec(Family):
    """Everything deepsuite needs to know about one model family: its `Family` entry, with its code."""

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


def get_model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of family ``name`` (``gpt`` or ``deepseek_v3``)."""
    family = get_family(name)
    return ModelSpec(**{f.name: getattr(family, f.name) for f in dataclasses.fields(family)})


def family_for_hf_model_type(model_type: str) -> ModelSpec:
    """The family that reads HF checkpoints of ``model_type`` (from config.json)."""
    for name, family in MODEL_FAMILIES.items():
        if model_type in family.hf_model_types:
            return get_model_spec(name)
    known = sorted(t for family in MODEL_FAMILIES.values() for t in family.hf_model_types)
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
    spec = get_model_spec(model_cfg.name)
    with torch.device("meta"):
        model = spec.model_cls(model_cfg.resolved_args)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights()  # type: ignore[operator]
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and engine/DDP (``module``) wrappers."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and not hasattr(model, "args"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def model_family(model: nn.Module) -> str:
    """Registry family name of ``model`` (matched on its class, without importing other families)."""
    specs: list[ModelSpec] = []
    for name in MODEL_FAMILIES:
        try:
            specs.append(get_model_spec(name))
        except ImportError:  # a family whose code is not there (yet) cannot own this model
            continue
    for base in type(model).__mro__:  # the class itself first, then the classes it derives from
        path = f"{base.__module__}:{base.__qualname__}"
        for spec in specs:
            if spec.model_path == path:
                return spec.name
    raise ConfigError(f"{type(model).__name__} is not a model of any registered family")
