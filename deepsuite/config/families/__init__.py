"""The model families: the one table of every family deepsuite knows, and the builder of its args.

Each family names its torch-free args dataclass and flavors (in this package), the HF ``model_type``
values it reads, and the import paths of its model class, HF adapter and ``parallelize`` function.
The paths stay strings here: the config layer imports no model code; `deepsuite.models.registry`
imports them on first use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from deepsuite.config.coerce import FLOAT32_MAX, build_dataclass, suggest
from deepsuite.config.errors import ConfigError
from deepsuite.config.families import deepseek_v3, gpt


@dataclass(frozen=True)
class Family:
    """One model family: its args and flavors, and where its model code lives."""

    name: str
    args_cls: type
    flavors: dict[str, Any]
    hf_model_types: tuple[str, ...]
    model_path: str
    """``"module:Class"`` of the model (built as ``Class(args)``)."""
    hf_adapter: str
    """Module with ``config_to_hf``, ``config_from_hf``, ``state_dict_to_hf``, ``state_dict_from_hf``."""
    parallelize: str
    """``"module:function"`` under ``deepsuite.parallel``: ``parallelize(model, dims, cfg)``."""


MODEL_FAMILIES: dict[str, Family] = {
    "gpt": Family(
        name="gpt",
        args_cls=gpt.GPTConfig,
        flavors=gpt.FLAVORS,
        hf_model_types=("gpt2",),
        model_path="deepsuite.models.gpt.model:GPT",
        hf_adapter="deepsuite.models.gpt.hf_adapter",
        parallelize="deepsuite.parallel.parallelize:parallelize_model",
    ),
    "deepseek_v3": Family(
        name="deepseek_v3",
        args_cls=deepseek_v3.DeepSeekV3Config,
        flavors=deepseek_v3.FLAVORS,
        hf_model_types=("deepseek_v3",),
        model_path="deepsuite.models.deepseek_v3.model:DeepSeekV3",
        hf_adapter="deepsuite.models.deepseek_v3.hf_adapter",
        parallelize="deepsuite.parallel.parallelize:parallelize_model",
    ),
}


def get_family(name: str) -> Family:
    """The family called ``name``, or a `ConfigError` naming the known ones."""
    if name not in MODEL_FAMILIES:
        raise ConfigError(
            f"model.name={name!r} is not a known model family{suggest(name, MODEL_FAMILIES)} "
            f"(choose one of {sorted(MODEL_FAMILIES)})"
        )
    return MODEL_FAMILIES[name]


def build_args(name: str, flavor: str, overrides: dict[str, Any]) -> Any:
    """The args dataclass of family ``name``: the ``flavor``'s values, then ``overrides``, validated.

    `ModelConfig.resolved_args` calls it once per config; everything else reads that attribute.
    """
    family = get_family(name)
    flavors = family.flavors
    if flavor not in flavors:
        raise ConfigError(
            f"model.flavor={flavor!r} is not a {name} flavor{suggest(flavor, flavors)} "
            f"(choose one of {', '.join(flavors)})"
        )
    base = dataclasses.asdict(flavors[flavor])
    base.update(overrides)
    args = build_dataclass(family.args_cls, base, "model")
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if not isinstance(value, float):
            continue
        default = getattr(flavors[flavor], f.name)
        if not math.isfinite(value):
            raise ConfigError(
                f"model.{f.name}={value} must be a finite number, e.g. model.{f.name}={default} "
                f"(the {flavor} value)"
            )
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(
                f"model.{f.name}={value} is beyond float32's range (|x| <= {FLOAT32_MAX:.2g}), which torch "
                f"computes in, e.g. model.{f.name}={default} (the {flavor} value)"
            )
    args.validate()
    return args
