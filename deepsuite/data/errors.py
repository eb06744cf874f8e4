"""The error type for bad corpora, tokenizers and token shards."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus, tokenizer or token shard is unusable.

    The message names the file (and byte or token offset where it applies) and how to fix it; the
    CLI prints it on one line and exits non-zero without a traceback.
    """
