"""`deepsuite plan`: model sizes counted on the meta device (nothing is allocated).

For now it reports total and activated parameters of a flavor; the memory planner of the
distributed issue extends it.
"""

from __future__ import annotations

import argparse
from typing import Any

from deepsuite.config.errors import ConfigError
from deepsuite.config.loader import MODEL_FAMILIES, family_module


def find_flavor(name: str) -> tuple[str, str]:
    """(family, flavor) for `flavor`, `family`, or `family:flavor`."""
    if ":" in name:
        family, flavor = name.split(":", 1)
        family_module(family)
        return family, flavor
    if name in MODEL_FAMILIES:
        flavors = list(family_module(name).FLAVORS)
        return name, flavors[0]
    known: list[str] = []
    for family in MODEL_FAMILIES:
        try:
            flavors = family_module(family).FLAVORS
        except ImportError:
            continue
        if name in flavors:
            return family, name
        known.extend(flavors)
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--model {name!r} is not a known flavor or family{hint} (flavors: {', '.join(known)})")


def count_params(model: Any) -> dict[str, int]:
    """Total parameters (tied counted once) and those used per token (routed experts scaled by
    activated / routed experts)."""
    total = 0
    routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in f".{name}" and "shared_experts" not in name:
            routed += p.numel()
    args = getattr(model, "args", None)
    n_routed = getattr(args, "n_routed_experts", 0) or 0
    n_active = next(
        (
            getattr(args, k)
            for k in ("n_activated_experts", "num_experts_per_tok", "top_k")
            if hasattr(args, k)
        ),
        0,
    )
    active = total - routed + (routed * n_active // n_routed if n_routed else routed)
    return {"total": total, "activated": active}


def _fmt(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def plan_main(args: argparse.Namespace) -> int:
    """Print the parameter counts of `args.model` (built on meta)."""
    from deepsuite.models.registry import build_model

    family, flavor = find_flavor(args.model)
    model = build_model(name=family, flavor=flavor, device="meta")
    counts = count_params(model)
    print(f"model: {family} / {flavor}")
    print(f"parameters: {counts['total']:,} ({_fmt(counts['total'])})")
    print(f"activated per token: {counts['activated']:,} ({_fmt(counts['activated'])})")
    return 0
