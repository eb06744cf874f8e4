"""CUDA-only tests: everything here is marked ``gpu`` and skipped, with the reason, without CUDA.

Run on a GPU machine with ``pytest tests/gpu -m gpu`` (about a minute on an H100).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA (torch {torch.__version__} sees no GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
