"""`deepsuite prepare-data`: corpus → train/val split → tokenizer → packed token shards + meta.json.

Everything is built in a temporary folder beside `data.out_dir` and renamed into place at the end,
so an interrupted or failed run never leaves a half-written data folder; the temporary folders of
an earlier run that was killed (SIGKILL leaves no chance to clean up) are removed by the next run
for the same `data.out_dir`. A folder that is already up to date (same corpus files, tokenizer and
settings, its tokenizer file intact) is kept as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.config.schema import DataConfig
from deepsuite.data.corpus import load_corpus, resolve_files
from deepsuite.data.errors import DataError
from deepsuite.data.files import (
    leftovers_message,
    make_temp_dir,
    old_name,
    remove_leftover_temp_dirs,
    sha256_file,
)
from deepsuite.data.shards import META_FILE, META_FORMAT, read_meta, token_dtype
from deepsuite.data.tokenizer import (
    HF_TOKENIZER_FILE,
    Tokenizer,
    bundle_hf_tokenizer,
    check_tokenizer,
    is_hf_tokenizer,
    train_tokenizer,
)

TOKENIZER_FILE = "tokenizer.model"
"""The SentencePiece model in a data folder (a Hugging Face tokenizer is stored as `tokenizer.json`)."""
_SPLITS = ("train", "val")
_ENCODERS: dict[str, Any] = {}


def _encode_batch(batch: dict[str, list[str]], model_path: str) -> dict[str, list[Any]]:
    """datasets.map worker: token ids of each document and its length with the EOS."""
    tok = _ENCODERS.get(model_path)
    if tok is None:
        tok = _ENCODERS[model_path] = Tokenizer(model_path)
    ids = tok.encode_batch(batch["text"])
    return {"ids": ids, "n_tokens": [len(x) + 1 for x in ids]}


def fingerprint(data: DataConfig) -> str:
    """Hash of everything the shards depend on: settings, corpus files (path, size, mtime), tokenizer."""
    files: list[Any] = []
    if not data.source.startswith("hf:"):
        for p in resolve_files(data.source):
            st = p.stat()
            files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    tokenizer = ""
    if data.tokenizer:
        src = Path(data.tokenizer)
        # an HF tokenizer's special tokens come from the configs beside tokenizer.json: hash them too
        folder = src if src.is_dir() else src.parent
        siblings = (
            [folder / n for n in ("tokenizer_config.json", "config.json")] if is_hf_tokenizer(src) else []
        )
        parts = [src / HF_TOKENIZER_FILE if src.is_dir() else src, *siblings]
        tokenizer = ",".join(sha256_file(p) for p in parts if p.is_file())
    settings = {
        "format": META_FORMAT,
        "source": data.source,
        "text_field": data.text_field,
        "tokenizer": tokenizer,
        "vocab_size": 0 if data.tokenizer else data.vocab_size,
        "val_fraction": data.val_fraction,
        "shard_tokens": data.shard_tokens,
        "seed": data.seed,
        "files": files,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) document indices, each in corpus order; at least one of each."""
    if n_docs < 2:
        raise DataError(
            f"the corpus has {n_docs} document; a train/validation split needs at least 2 "
            "(add files, or use one text file with blank-line separated paragraphs)"
        )
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    perm = np.random.default_rng(seed).permutation(n_docs)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


def _write_split(
    ds: Any, split: str, out: Path, dtype: np.dtype, shard_tokens: int, eos_id: int
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    shards: list[dict[str, Any]] = []
    f = None
    in_shard = 0

    def roll() -> Any:
        nonlocal in_shard
        name = f"{split}_{len(shards):03d}.bin"
        shards.append({"file": name, "tokens": 0})
        in_shard = 0
        return open(out / name, "wb")

    total = 0
    with tqdm(total=len(ds), desc=f"writing {split} shards", unit="doc", leave=False) as bar:
        for batch in ds.iter(batch_size=256):
            for ids in batch["ids"]:
                arr = np.asarray([*ids, eos_id], dtype=dtype)
                pos = 0
                while pos < len(arr):
                    if f is None or in_shard == shard_tokens:
                        if f is not None:
                            f.close()
                        f = roll()
                    take = min(len(arr) - pos, shard_tokens - in_shard)
                    arr[pos : pos + take].tofile(f)
                    in_shard += take
                    shards[-1]["tokens"] += take
                    pos += take
                total += len(arr)
            bar.update(len(batch["ids"]))
    if f is not None:
        f.close()
    return {"documents": len(ds), "tokens": total, "shards": shards}


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = old_name(out)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def prepare_data(data: DataConfig, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare `data.out_dir` from `data.source`; return its meta.json. Skips work when up to date."""
    out = Path(data.out_dir)
    removed = remove_leftover_temp_dirs(out)
    if removed:
        log(leftovers_message(removed))
    fp = fingerprint(data)
    if not force and (out / META_FILE).is_file():
        try:
            meta = read_meta(out)
            if meta.get("fingerprint") == fp:
                check_tokenizer(out, meta)  # a damaged or deleted tokenizer file is rebuilt
                log(f"data in {out} is up to date ({meta['splits']['train']['tokens']:,} train tokens)")
                return meta
        except DataError as exc:
            log(f"rebuilding {out}: {exc}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out)
    except OSError as exc:
        raise DataError(
            f"cannot write data.out_dir={str(out)!r} ({exc.strerror}); choose a writable folder"
        ) from None
    try:
        meta = _prepare_into(data, tmp, fp, log)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t = meta["splits"]
    log(
        f"prepared {out}: vocab {meta['vocab_size']}, train {t['train']['tokens']:,} tokens "
        f"({t['train']['documents']} docs), val {t['val']['tokens']:,} tokens ({t['val']['documents']} docs)"
    )
    return meta


def _prepare_into(data: DataConfig, tmp: Path, fp: str, log: Callable[[str], None]) -> dict[str, Any]:
    cache = tmp / ".cache"
    corpus = load_corpus(data.source, data.text_field, cache)
    docs = corpus.documents
    train_idx, val_idx = split_documents(len(docs), data.val_fraction, data.seed)
    splits = {"train": docs.select(train_idx), "val": docs.select(val_idx)}
    model_path = tmp / TOKENIZER_FILE
    if data.tokenizer and is_hf_tokenizer(data.tokenizer):
        model_path = tmp / HF_TOKENIZER_FILE
        bundle_hf_tokenizer(data.tokenizer, model_path)  # with its special tokens: one self-contained file
    elif data.tokenizer:
        Tokenizer(data.tokenizer)  # validates the file
        shutil.copyfile(data.tokenizer, model_path)
    else:
        log(f"training a {data.vocab_size}-piece BPE tokenizer on {len(train_idx)} documents")
        train_tokenizer(
            (row["text"] for row in splits["train"]),
            tmp / "tokenizer",
            data.vocab_size,
            seed=data.seed,
            num_threads=max(1, min(data.num_proc, os.cpu_count() or 1)),
        )
    tok = Tokenizer(model_path)
    dtype = token_dtype(tok.vocab_size)
    split_meta: dict[str, Any] = {}
    for name in _SPLITS:
        ds = splits[name]
        encoded = ds.map(
            _encode_batch,
            batched=True,
            batch_size=16,
            fn_kwargs={"model_path": str(model_path)},
            remove_columns=["text"],
            num_proc=max(1, min(data.num_proc, len(ds))),
            desc=f"tokenizing {name}",
        )
        if sum(encoded["n_tokens"]) == len(encoded):  # every document encoded to nothing but its EOS
            raise DataError(
                f"data.source={data.source!r}: the {name} documents encode to no tokens with the tokenizer "
                f"{data.tokenizer or '(trained)'}; check the corpus text and data.tokenizer"
            )
        split_meta[name] = _write_split(encoded, name, tmp, dtype, data.shard_tokens, tok.eos_id)
    shutil.rmtree(cache, ignore_errors=True)
    meta = {
        "format": META_FORMAT,
        "fingerprint": fp,
        "source": corpus.description,
        "files": [str(p) for p in corpus.files],
        "text_field": data.text_field,
        "tokenizer": model_path.name,
        "tokenizer_sha256": sha256_file(model_path),  # checked before training: see check_tokenizer
        "tokenizer_source": data.tokenizer or "trained",
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "dtype": dtype.name,
        "seed": data.seed,
        "val_fraction": data.val_fraction,
        "splits": split_meta,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
