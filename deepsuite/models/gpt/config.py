"""GPT-2/3 model arguments and named flavors (defined torch-free in `deepsuite.config.families.gpt`,
where the config loader builds and validates them)."""

from deepsuite.config.families.gpt import FLAVORS, GPTConfig

__all__ = ["FLAVORS", "GPTConfig"]
