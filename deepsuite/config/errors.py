"""The one error type for bad configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong.

    The message names the key, the value and how to fix it; the CLI prints it on one line
    and exits non-zero without a traceback.
    """
