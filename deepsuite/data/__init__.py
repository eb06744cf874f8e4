"""Data: corpus reading, SentencePiece tokenizer, packed token shards and the resumable sampler.

Imports are lazy so that the CLI's error handling (`DataError`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DataError": "deepsuite.data.errors",
    "prepare_data": "deepsuite.data.prepare",
    "WindowSampler": "deepsuite.data.sampler",
    "eval_starts": "deepsuite.data.sampler",
    "rank_slice": "deepsuite.data.sampler",
    "windows_batch": "deepsuite.data.sampler",
    "TokenShards": "deepsuite.data.shards",
    "read_meta": "deepsuite.data.shards",
    "token_dtype": "deepsuite.data.shards",
    "Tokenizer": "deepsuite.data.tokenizer",
    "check_tokenizer": "deepsuite.data.tokenizer",
    "train_tokenizer": "deepsuite.data.tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepsuite.data' has no attribute {name!r}")
