"""FP8 training as a conversion step (DESIGN.md seam 3).

``ctx = prepare_fp8(model, cfg.fp8)`` swaps the selected ``nn.Linear`` modules in place — for
Transformer Engine's ``te.Linear`` when TE and FP8 hardware are there, else for the native
`Float8Linear` (``torch._scaled_mm``) when that runs on the model's device, else nothing (bf16,
with a logged message naming what was missing). The trainer wraps each forward in
``ctx.autocast()`` and logs ``ctx.summary``. Call it after the model is materialised and before
the optimizer / DeepSpeed engine is built (TE conversion makes new Parameters).

Selection rules:

* a module is converted when it is an ``nn.Linear`` (or stacked ``GroupedExperts``) whose
  qualified name is not matched by ``cfg.exclude`` (lm_head, router, gate, embed, eh_proj by
  default; see `excluded_by`: entries match whole name components, so ``gate`` is the MoE router,
  not ``gate_proj``), whose in/out features are multiples of 16 (FP8 GEMM alignment) and whose
  weight is not shared with another module; everything else stays and is listed in the summary
  with the reason;
* ``cfg.backend``: ``auto`` = TE if importable on a CUDA device of compute capability ≥ 8.9,
  else native if ``torch._scaled_mm`` runs on the device, else bf16; ``te`` and ``native`` force
  a backend but still fall back (with a warning) when it cannot run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from deepsuite.config.schema import FP8Config
from deepsuite.fp8.experts import convert_grouped_experts
from deepsuite.fp8.measured import slowdown_warning
from deepsuite.fp8.native import Float8Linear, Float8Recipe, scaled_mm_unusable_reason
from deepsuite.fp8.quant import Float8Quantized, dequantize, fake_quantize, quantize
from deepsuite.fp8.te import (
    build_recipe,
    linear_to_te,
    recipe_unsupported_reason,
    te_autocast,
    te_unavailable_reason,
)

__all__ = [
    "FP8Context",
    "Float8Linear",
    "Float8Quantized",
    "Float8Recipe",
    "dequantize",
    "excluded_by",
    "fake_quantize",
    "native_scaling_for",
    "prepare_fp8",
    "quantize",
    "select_backend",
]

logger = logging.getLogger(__name__)

Backend = Literal["te", "native", "bf16", "disabled"]
_ALIGN = 16
_MIN_TE_CAPABILITY = (8, 9)


@dataclass
class FP8Context:
    """What `prepare_fp8` did, and the autocast context the trainer enters around each forward."""

    backend: Backend
    recipe: str = ""
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    te_recipe: Any = None
    amax_group: Any = None
    """Process group for TE's amax reduction (delayed scaling); set by ``deepsuite.parallel``."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """TE's FP8 autocast for the TE backend; a no-op context otherwise (native FP8 modules
        quantise by themselves)."""
        if self.backend != "te":
            return contextlib.nullcontext()
        return te_autocast(self.te_recipe, enabled=True, amax_group=self.amax_group)

    @property
    def enabled(self) -> bool:
        """True when some module computes in FP8."""
        return self.backend in ("te", "native") and bool(self.converted)

    @property
    def summary(self) -> str:
        """Human-readable report: backend, recipe, converted and skipped modules, fallbacks."""
        if self.backend == "disabled":
            return "fp8: disabled"
        lines = [f"fp8: backend={self.backend}" + (f" recipe={self.recipe}" if self.recipe else "")]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  converted {len(self.converted)} modules (linear layers and stacked experts)")
        if self.skipped:
            lines.append(f"  kept in high precision ({len(self.skipped)}):")
            lines += [f"    {name}: {why}" for name, why in sorted(self.skipped.items())]
        return "\n".join(lines)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def select_backend(
    cfg: FP8Config, device: torch.device, te_blockers: Sequence[str] = ()
) -> tuple[Literal["te", "native", "bf16"], list[str]]:
    """The backend that will run on ``device`` and the reasons for any fallback.

    ``te_blockers``: reasons this run's layout rules Transformer Engine out (e.g. expert
    parallelism, activation checkpointing); the native path is used instead.
    """
    notes: list[str] = []
    if cfg.backend in ("auto", "te"):
        reason = "; ".join(te_blockers) or _te_unusable_reason(cfg, device)
        if reason is None:
            return "te", notes
        if cfg.backend == "te":
            notes.append(f"fp8.backend=te requested but {reason}; trying the native path")
        else:
            notes.append(f"Transformer Engine not used: {reason}")
    reason = scaled_mm_unusable_reason(str(device))
    if reason is None:
        return "native", notes
    notes.append(f"native FP8 not used: {reason}; training stays in bf16")
    return "bf16", notes


def _te_unusable_reason(cfg: FP8Config, device: torch.device) -> str | None:
    reason = te_unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the model is on {device}, Transformer Engine needs CUDA"
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_TE_CAPABILITY:
        return f"GPU compute capability {capability} < 8.9 (FP8 needs Ada, Hopper or newer)"
    return recipe_unsupported_reason(cfg.recipe)


def native_scaling_for(cfg: FP8Config) -> tuple[dict[str, Any], list[str]]:
    """`Float8Linear` options for ``cfg`` and notes where the native path approximates the recipe.

    ``current`` → ``cfg.native_scaling``; ``block`` → block (1×128 / 128×128); ``delayed`` →
    ``cfg.native_scaling`` with current scaling (the native path keeps no amax history);
    ``mxfp8`` → block with power-of-two scales (MX's 1×32 e8m0 tiles need Blackwell and TE).
    """
    notes: list[str] = []
    scaling = cfg.native_scaling
    power_of_two = cfg.power_of_two_scales
    if cfg.recipe == "block":
        scaling = "block"
    elif cfg.recipe == "delayed":
        notes.append(f"native path has no amax history: recipe 'delayed' runs as current {scaling} scaling")
    elif cfg.recipe == "mxfp8":
        scaling, power_of_two = "block", True
        notes.append(
            "native path has no MX format: recipe 'mxfp8' runs as 1×128/128×128 blocks with power-of-two scales"
        )
    grad_dtype = torch.float8_e4m3fn if cfg.grad_dtype == "e4m3" else torch.float8_e5m2
    return {"scaling": scaling, "power_of_two_scales": power_of_two, "grad_dtype": grad_dtype}, notes


def excluded_by(name: str, exclude: list[str]) -> list[str]:
    """The entries of ``exclude`` that match the qualified module ``name``.

    An entry matches a whole dot-separated component of the name (shell wildcards allowed:
    ``embed*``), or, when it contains a dot, any substring of the name (``attn.wq``). So ``gate``
    keeps the MoE router ``ffn.gate`` in high precision but not the SwiGLU ``gate_proj``.
    """
    parts = name.split(".")
    return [e for e in exclude if ("." in e and e in name) or any(fnmatch.fnmatchcase(p, e) for p in parts)]


def _candidates(model: nn.Module, exclude: list[str]) -> tuple[list[str], dict[str, str]]:
    """Names of the linear layers to convert, and the skipped ones with reasons."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, Float8Linear):
            continue
        hits = excluded_by(name, exclude)
        if hits:
            skipped[name] = f"excluded by name ({', '.join(hits)})"
        elif module.in_features % _ALIGN or module.out_features % _ALIGN:
            skipped[name] = (
                f"in/out features {module.in_features}/{module.out_features} not multiples of {_ALIGN}"
            )
        elif owners.get(id(module.weight), 0) > 1:
            skipped[name] = "weight shared with another module (tied)"
        elif module.weight.device.type == "meta":
            skipped[name] = "on the meta device (materialise the model first)"
        else:
            chosen.append(name)
    return chosen, skipped


def te_blockers_for(ep_size: int, activation_checkpointing: bool) -> list[str]:
    """Why a run layout cannot use Transformer Engine (empty when it can).

    Not built yet, so refused rather than run wrong: TE's grouped experts under expert parallelism
    (their per-expert weights are not registered as DeepSpeed expert parameters, and consolidation
    does not merge per-rank TE expert keys), and TE under activation checkpointing (the recompute
    in backward would run outside TE's FP8 autocast).
    """
    out = []
    if ep_size > 1:
        out.append("expert parallelism (parallel.ep_size>1) with TE grouped experts is not supported yet")
    if activation_checkpointing:
        out.append(
            "activation checkpointing would recompute TE layers outside FP8 autocast (not supported yet)"
        )
    return out


def prepare_fp8(model: nn.Module, fp8_cfg: FP8Config, te_blockers: Sequence[str] = ()) -> FP8Context:
    """Convert ``model``'s eligible linear layers to FP8 in place and return the `FP8Context`.

    Disabled config → ``FP8Context("disabled")`` and the model untouched. Nothing is converted
    when no FP8 backend can run; the context then says why (``backend="bf16"``). ``te_blockers``
    (see `te_blockers_for`) send a run that would pick Transformer Engine to the native path.
    """
    if not fp8_cfg.enabled:
        return FP8Context(backend="disabled")
    device = _model_device(model)
    backend, notes = select_backend(fp8_cfg, device, te_blockers)
    for note in notes:
        logger.warning(note)
    ctx = FP8Context(backend=backend, recipe=fp8_cfg.recipe, notes=notes)
    chosen, ctx.skipped = _candidates(model, list(fp8_cfg.exclude))
    if backend == "bf16":
        ctx.recipe = ""
        ctx.skipped.update(dict.fromkeys(chosen, "no FP8 backend runs here"))
        return ctx
    recipe: Float8Recipe | None = None
    if backend == "te":
        ctx.te_recipe = build_recipe(fp8_cfg)
        for name in chosen:
            model.set_submodule(name, linear_to_te(model.get_submodule(name)))  # type: ignore[arg-type]
    else:
        options, approx = native_scaling_for(fp8_cfg)
        ctx.notes += approx
        ctx.recipe = f"{fp8_cfg.recipe} (native {options['scaling']})"
        recipe = Float8Recipe(**options)
        for name in chosen:
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            model.set_submodule(name, Float8Linear.from_linear(linear, **options))
    exclude = list(fp8_cfg.exclude)
    experts, skipped = convert_grouped_experts(
        model, backend, lambda name: excluded_by(name, exclude), recipe
    )
    ctx.converted = chosen + experts
    ctx.skipped.update(skipped)
    warning = slowdown_warning(getattr(model, "args", None), backend, _device_name(device))
    if warning is not None and ctx.converted:
        ctx.notes.append(warning)
        logger.warning(warning)
    logger.info(ctx.summary)
    return ctx


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
