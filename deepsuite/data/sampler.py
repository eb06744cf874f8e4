"""Deterministic, resumable sampling of training windows and fixed validation windows.

A training sample is a contiguous window of `seq_len + 1` tokens of the train stream; inputs are
`w[:-1]`, labels `w[1:]` (aligned targets). Each epoch visits `n_windows` windows starting at
`offset + i·seq_len` in an order drawn from `(seed, epoch)`, with a per-epoch random `offset` in
[0, seq_len). The sampler's position is `{"epoch", "index"}`: the next *global* sample, so it does
not depend on how a global batch is split into ranks and micro-batches. Its state also records
`seq_len`, `seed` and a fingerprint of the train split, so that resuming with another window
order is refused instead of silently reading another sample sequence.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from deepsuite.data.errors import DataError
from deepsuite.data.shards import TokenShards


class WindowSampler:
    """Global sample order over a `TokenShards` split: `(seed, epoch, index)` → window start."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self.n_windows = (len(shards) - seq_len) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the {shards.split} split has {len(shards)} tokens, fewer than 2 × training.seq_len="
                f"{2 * seq_len}; use a larger corpus or a shorter training.seq_len"
            )
        self.epoch = 0
        self.index = 0
        self._cached_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._offset = 0

    def data_fingerprint(self) -> str:
        """A short hash of what the window order is drawn over: the split's token count, its shard
        files (names and token counts) and the vocabulary size, from meta.json (cheap, no reads)."""
        split = self.shards.meta["splits"][self.shards.split]
        ident = {
            "split": self.shards.split,
            "tokens": len(self.shards),
            "shards": [[sh["file"], int(sh["tokens"])] for sh in split["shards"]],
            "vocab_size": self.shards.vocab_size,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Position of the next global sample, and what that position is relative to: `seq_len`,
        `seed`, the split's token count and `data_fingerprint()` (checked by `load_state_dict`)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": len(self.shards),
            "data": self.data_fingerprint(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise a `DataError` when `state` was saved with another training.seq_len, data.seed or
        data folder: its position would then index another window order. Fields missing from
        older checkpoints are not checked."""
        fix = (
            "resume with the original value, or start a new run from the checkpoint's weights with "
            "checkpoint.init_from=<its run folder> in a new checkpoint.dir (new optimizer and data order)"
        )
        if "seq_len" in state and int(state["seq_len"]) != self.seq_len:
            raise DataError(
                f"the checkpoint was trained with training.seq_len={int(state['seq_len'])} but the config has "
                f"training.seq_len={self.seq_len}; its data position only fits its own windows: {fix}"
            )
        if "seed" in state and int(state["seed"]) != self.seed:
            raise DataError(
                f"the checkpoint was trained with data.seed={int(state['seed'])} but the config has "
                f"data.seed={self.seed}; its data position only fits its own sample order: {fix}"
            )
        if "data" in state and state["data"] != self.data_fingerprint():
            saved = f"{int(state['tokens']):,} train tokens" if "tokens" in state else "other shards"
            raise DataError(
                f"the checkpoint was trained on other data ({saved}, fingerprint {state['data']}) than "
                f"data.out_dir={str(self.shards.dir)!r} ({len(self.shards):,} train tokens, fingerprint "
                f"{self.data_fingerprint()}); point data.out_dir at the original data, or train on this data from "
                "the checkpoint's weights with checkpoint.init_from=<its run folder> in a new checkpoint.dir"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (after `check_state`)."""
        self.check_state(state)
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.n_windows:
            raise DataError(
                f"sampler state {state} does not fit this data ({self.n_windows} windows per epoch); "
                "the checkpoint was made with other data or another training.seq_len"
            )
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._cached_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._offset = int(rng.integers(0, self.seq_len))
            self._perm = rng.permutation(self.n_windows)
            self._cached_epoch = epoch
        return self._perm, self._offset

    def next_starts(self, count: int) -> np.ndarray:
        """Start offsets of the next `count` global samples (advances the state)."""
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            perm, offset = self._order(self.epoch)
            out[k] = offset + int(perm[self.index]) * self.seq_len
            self.index += 1
            if self.index == self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (B, seq_len) int64, for windows at `starts`."""
        return windows_batch(self.shards, starts, self.seq_len)


def windows_batch(shards: TokenShards, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), each (B, seq_len) int64: windows of `seq_len + 1` tokens at `starts`;
    `labels[:, t]` is the token after `inputs[:, t]`."""
    windows = np.stack([shards.read(int(s), seq_len + 1) for s in starts])  # (B, T+1)
    w = torch.from_numpy(windows)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def rank_slice(starts: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The contiguous share of a global batch that data-parallel `rank` of `world` trains on."""
    if len(starts) % world:
        raise ValueError(f"global batch of {len(starts)} does not split over {world} ranks")
    per = len(starts) // world
    return starts[rank * per : (rank + 1) * per]


def eval_starts(shards: TokenShards, seq_len: int, count: int) -> np.ndarray:
    """`count` fixed window starts spread evenly over a split (the same every evaluation)."""
    last = len(shards) - seq_len - 1
    if last < 0:
        raise DataError(
            f"the {shards.split} split has {len(shards)} tokens, fewer than training.seq_len + 1 = "
            f"{seq_len + 1}; raise data.val_fraction or shorten training.seq_len"
        )
    return np.linspace(0, last, count).round().astype(np.int64)
