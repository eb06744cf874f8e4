"""The Transformer Engine path: recipes from config, module conversion, the autocast context.

The only module of deepsuite that imports ``transformer_engine`` (lazily, inside functions, so
importing it never fails). Versions differ in names, and both are handled:

* autocast: ``te.autocast(enabled, recipe=...)`` (TE ≥ 2.8) or ``te.fp8_autocast(enabled,
  fp8_recipe=...)`` (older);
* support checks: ``te.is_fp8_available()`` & co. (newer) or
  ``transformer_engine.pytorch.fp8.check_fp8_support()`` & co. (older);
* recipes: ``Float8CurrentScaling`` (TE ≥ 2.2), ``Float8BlockScaling`` (TE ≥ 2.3, Hopper),
  ``MXFP8BlockScaling`` (TE ≥ 2.0, Blackwell). A recipe the installed TE lacks is refused with a
  message naming the version.

Conversion copies weights into new TE modules, so it must happen before the optimizer (and the
DeepSpeed engine) is built. The converted modules save and load the plain layout: TE's
``_extra_state`` (its FP8 scaling metadata, pickled) stays out of their state dicts, so a checkpoint
of an FP8 model has the keys of the plain model and loads into either.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deepsuite.config.schema import FP8Config

_EXTRA_STATE = "_extra_state"  # the key nn.Module.state_dict gives get_extra_state()


def te_unavailable_reason() -> str | None:
    """None when ``transformer_engine.pytorch`` imports, else why not."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed (pip install 'deepsuite[fp8]' on a CUDA machine)"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # a broken TE install must not stop training: report and fall back
        return f"transformer_engine.pytorch does not import: {type(err).__name__}: {str(err)[:200]}"
    return None


def _te() -> Any:
    return importlib.import_module("transformer_engine.pytorch")


def te_version() -> str:
    """The installed Transformer Engine version (``"?"`` when unknown)."""
    te = importlib.import_module("transformer_engine")
    return str(getattr(te, "__version__", "?"))


# recipe name -> (class name in transformer_engine.common.recipe, newer availability function,
# older check function in transformer_engine.pytorch.fp8)
_RECIPES: dict[str, tuple[str, str, str]] = {
    "delayed": ("DelayedScaling", "is_fp8_available", "check_fp8_support"),
    "current": ("Float8CurrentScaling", "is_fp8_available", "check_fp8_support"),
    "block": ("Float8BlockScaling", "is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
    "mxfp8": ("MXFP8BlockScaling", "is_mxfp8_available", "check_mxfp8_support"),
}


def recipe_unsupported_reason(name: str) -> str | None:
    """None when the installed TE has recipe ``name`` and this GPU runs it, else why not."""
    if name not in _RECIPES:
        return f"fp8.recipe={name!r} is not one of {sorted(_RECIPES)}"
    cls_name, new_check, old_check = _RECIPES[name]
    recipe_mod = importlib.import_module("transformer_engine.common.recipe")
    if not hasattr(recipe_mod, cls_name):
        return f"Transformer Engine {te_version()} has no {cls_name} (fp8.recipe={name!r}); upgrade TE"
    te = _te()
    check = getattr(te, new_check, None)
    if check is not None:
        try:
            ok, reason = check(return_reason=True)
        except TypeError:
            ok, reason = check(), ""
    else:
        fp8_mod = importlib.import_module("transformer_engine.pytorch.fp8")
        old = getattr(fp8_mod, old_check, None)
        if old is None:
            return f"Transformer Engine {te_version()} cannot tell whether {cls_name} runs here"
        ok, reason = old()
    if not ok:
        return f"{cls_name} does not run on this GPU: {reason or 'unsupported hardware'}"
    return None


def build_recipe(cfg: FP8Config) -> Any:
    """The TE recipe object for ``cfg.recipe`` (call `recipe_unsupported_reason` first).

    ``delayed`` → ``DelayedScaling(margin=0, fp8_format=HYBRID, amax_history_len, "max")``;
    ``current`` → ``Float8CurrentScaling(fp8_format=HYBRID)``; HYBRID = e4m3 forward, e5m2
    gradients (``fp8.grad_dtype=e4m3`` → format E4M3 everywhere for these two). ``block`` → ``Float8BlockScaling()`` (e4m3 everywhere, 1×128 activation and
    128×128 weight tiles; TE's default power-of-two scales unless NVTE_FP8_BLOCK_SCALING_FP32_SCALES
    is set); ``mxfp8`` → ``MXFP8BlockScaling()`` (1×32 tiles, e8m0 scales).
    """
    recipe = importlib.import_module("transformer_engine.common.recipe")
    fmt = recipe.Format
    fp8_format = fmt.E4M3 if cfg.grad_dtype == "e4m3" else fmt.HYBRID
    if cfg.recipe == "delayed":
        return recipe.DelayedScaling(
            margin=0,
            fp8_format=fp8_format,
            amax_history_len=cfg.amax_history_len,
            amax_compute_algo="max",
        )
    if cfg.recipe == "current":
        return recipe.Float8CurrentScaling(fp8_format=fp8_format)
    if cfg.recipe == "block":
        return recipe.Float8BlockScaling()
    if cfg.recipe == "mxfp8":
        return recipe.MXFP8BlockScaling()
    raise ValueError(f"fp8.recipe={cfg.recipe!r} is not one of {sorted(_RECIPES)}")


@contextlib.contextmanager
def te_autocast(recipe: Any, enabled: bool = True, amax_group: Any = None) -> Iterator[None]:
    """TE's FP8 autocast around a forward pass (``te.autocast`` or ``te.fp8_autocast``).

    ``amax_group`` is the process group over which delayed-scaling amaxes are reduced (the
    data-parallel group; handed in by ``deepsuite.parallel`` — this module imports no
    torch.distributed).
    """
    te = _te()
    if hasattr(te, "autocast"):
        ctx = te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=amax_group)
    else:
        ctx = te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=amax_group)
    with ctx:
        yield


def _drop_extra_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, _: Any) -> None:
    state_dict.pop(prefix + _EXTRA_STATE, None)


def _no_extra_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    state_dict.setdefault(prefix + _EXTRA_STATE, None)  # TE's set_extra_state(None) keeps its defaults


def keep_extra_state_out(module: nn.Module) -> nn.Module:
    """``module`` (a TE module) saving and loading the plain layout: no ``_extra_state`` entry in
    its state dict, and a state dict without one loads strictly."""
    module.register_state_dict_post_hook(_drop_extra_state)
    module.register_load_state_dict_pre_hook(_no_extra_state)
    return module


def linear_to_te(linear: nn.Linear) -> nn.Module:
    """A ``te.Linear`` with the same shape, dtype and device as ``linear`` and its weights copied."""
    te = _te()
    weight = linear.weight
    new = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.train(linear.training)
    return keep_extra_state_out(new)
