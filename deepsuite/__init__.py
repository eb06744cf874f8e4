"""deepsuite: train DeepSeek-V3 and GPT models at cluster scale.

Submodules are imported lazily so that `deepsuite.config` (and the CLI's config checks) stay
torch-free and fast.
"""

__version__ = "0.1.0"
