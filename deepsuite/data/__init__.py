"""Data: corpus reading, SentencePiece tokenizer, packed token shards and the resumable sampler."""

from deepsuite.data.errors import DataError
from deepsuite.data.prepare import prepare_data
from deepsuite.data.sampler import WindowSampler, eval_starts, rank_slice, windows_batch
from deepsuite.data.shards import TokenShards, read_meta, token_dtype
from deepsuite.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DataError",
    "TokenShards",
    "Tokenizer",
    "WindowSampler",
    "eval_starts",
    "prepare_data",
    "rank_slice",
    "read_meta",
    "token_dtype",
    "train_tokenizer",
    "windows_batch",
]
