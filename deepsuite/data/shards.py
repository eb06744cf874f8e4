"""Packed token shards on disk: raw `.bin` arrays (uint16 when the vocab fits, else uint32) + meta.json.

`TokenShards` opens one split, checks every shard (size, dtype, token ids < vocab) and reads
contiguous windows across shard boundaries through numpy memmaps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.data.errors import DataError
from deepsuite.data.files import regular_file

META_FILE = "meta.json"
META_FORMAT = 1
_SCAN_CHUNK = 1 << 24
_REBUILD = "rebuild the folder with `deepsuite prepare-data --config FILE --force`"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def read_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a prepared data folder, or a `DataError` telling the user to prepare it."""
    path = Path(data_dir) / META_FILE
    if regular_file(path, "prepared data file", _REBUILD) is None:
        raise DataError(
            f"no prepared data in {str(Path(data_dir))!r} (missing {META_FILE}); run "
            "`deepsuite prepare-data --config FILE` first (or fix data.out_dir)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt ({exc}); run `deepsuite prepare-data` again") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: unknown format; run `deepsuite prepare-data` again")
    _check_meta(path, meta)
    return meta


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Raise a `DataError` naming the first missing or malformed key of a meta.json."""
    fix = "the file is incomplete or was edited; rebuild the folder with `deepsuite prepare-data --config FILE --force`"

    def bad(key: str, problem: str) -> DataError:
        return DataError(f"{path}: key '{key}' is {problem}; {fix}")

    for key, kind in (("vocab_size", int), ("dtype", str), ("tokenizer", str), ("splits", dict)):
        if key not in meta:
            raise bad(key, "missing")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise bad(key, f"malformed (not {'an' if kind is int else 'a'} {kind.__name__})")
    try:
        np.dtype(meta["dtype"])
    except TypeError:
        raise bad("dtype", f"not a numpy dtype ({meta['dtype']!r})") from None
    for name, split in meta["splits"].items():
        where = f"splits.{name}"
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise bad(f"{where}.shards", "missing or malformed")
        if not isinstance(split.get("tokens"), int):
            raise bad(f"{where}.tokens", "missing or malformed")
        for i, shard in enumerate(split["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                raise bad(f"{where}.shards[{i}].file", "missing or malformed")
            if not isinstance(shard.get("tokens"), int):
                raise bad(f"{where}.shards[{i}].tokens", "missing or malformed")


class TokenShards:
    """One split (`train` or `val`) of a prepared data folder, as one virtual token stream."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str, check_ids: bool = True) -> None:
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise DataError(f"{self.dir / META_FILE}: no split {split!r}")
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.arrays: list[np.memmap] = []
        self.files: list[Path] = []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.dir / shard["file"]
            n = int(shard["tokens"])
            if regular_file(path, "shard", _REBUILD) is None:
                raise DataError(f"shard {path} is missing; run `deepsuite prepare-data` again")
            if path.stat().st_size != n * self.dtype.itemsize:
                raise DataError(
                    f"shard {path} has {path.stat().st_size} bytes, expected {n * self.dtype.itemsize} "
                    f"({n} {self.dtype.name} tokens): it is truncated or corrupt; run `deepsuite prepare-data` again"
                )
            self.files.append(path)
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        if check_ids:
            self.check_ids()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def check_ids(self) -> None:
        """Raise `DataError` naming the shard and offset of the first token id >= vocab_size."""
        for path, arr in zip(self.files, self.arrays):
            for lo in range(0, len(arr), _SCAN_CHUNK):
                chunk = np.asarray(arr[lo : lo + _SCAN_CHUNK])
                bad = np.flatnonzero(chunk >= self.vocab_size)
                if bad.size:
                    at = lo + int(bad[0])
                    raise DataError(
                        f"shard {path}: token id {int(chunk[bad[0]])} at offset {at} is >= vocab_size="
                        f"{self.vocab_size}; the shard does not belong to this tokenizer, run `deepsuite prepare-data` again"
                    )

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as an int64 array."""
        if start < 0 or start + length > len(self):
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.split} split of {len(self)} tokens"
            )
        out = np.empty(length, dtype=np.int64)
        pos = 0
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < length:
            arr = self.arrays[i]
            lo = start + pos - int(self.starts[i])
            take = min(length - pos, len(arr) - lo)
            out[pos : pos + take] = arr[lo : lo + take]
            pos += take
            i += 1
        return out
