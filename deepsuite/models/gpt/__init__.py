"""GPT-2/3 family: `GPTConfig`, `FLAVORS`, the `GPT` model and its HF adapter."""

from __future__ import annotations

from typing import Any

from deepsuite.models.gpt.config import FLAVORS, GPTConfig

__all__ = ["FLAVORS", "GPT", "GPTConfig"]


def __getattr__(name: str) -> Any:
    if name == "GPT":
        from deepsuite.models.gpt.model import GPT

        return GPT
    raise AttributeError(name)
