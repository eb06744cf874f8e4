"""The one error type for bad configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong.

    The message names the key, the value and how to fix it; the CLI prints it on one line
    and exits non-zero without a traceback.
    """


class ConfigWarning(UserWarning):
    """A configuration that runs but probably not as intended (e.g. a warmup longer than training).

    Python's default warning filter prints each distinct message once per process.
    """
