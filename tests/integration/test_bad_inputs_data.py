"""Bad data folders, tokenizer files and corpora through the CLI: a damaged, replaced or deleted
tokenizer, an empty corpus file, a negative data seed and named pipes where data files belong each
give one `error: …` line, exit 2, and write nothing; a rerun of `prepare-data` after SIGKILL removes
the killed run's temporary folder and says so."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fails, hf_tokenizer_folder, train_argv, write_corpus

from deepsuite.cli import main
from deepsuite.config import load_config
from deepsuite.data import prepare_data


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder prepared with a Hugging Face tokenizer (stored as `tokenizer.json`)."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("hfdata")
    corpus = write_corpus(root / "corpus", n_docs=6, lines=60)
    tok = hf_tokenizer_folder(root / "hf", corpus)
    out = root / "data"
    overrides = [f"data.source={corpus}", f"data.out_dir={out}", f"data.tokenizer={tok}", "data.num_proc=1"]
    prepare_data(load_config(None, overrides).data, log=lambda _: None)
    return out


def junk(path: Path) -> None:
    """Overwrite `path` with random bytes of the same size."""
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


# ----------------------------------------------------------------------- tokenizer of a data folder


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_garbage_tokenizer_is_refused_at_start_up(
    capsys: pytest.CaptureFixture[str],
    tiny_data: Path,
    hf_data: Path,
    tmp_path: Path,
    kind: str,
    dry_run: bool,
) -> None:
    """It used to be trained on: checkpoints written, `latest` moved."""
    src, name = (tiny_data, "tokenizer.model") if kind == "sentencepiece" else (hf_data, "tokenizer.json")
    data = shutil.copytree(src, tmp_path / "data")
    junk(data / name)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    argv = train_argv(data, tmp_path / "run", model__vocab_size=vocab)
    fails(
        capsys,
        [*argv, "--dry-run"] if dry_run else argv,
        rf"tokenizer {data / name} is not the file prepare-data wrote.*prepare-data --config FILE --force",
    )
    assert not (tmp_path / "run").exists()


def test_tokenizer_of_another_vocabulary_is_refused(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path
) -> None:
    """A folder prepared before meta.json recorded the tokenizer's hash: the tokenizer must still load
    and have the vocabulary the shards were written with."""
    from deepsuite.data.tokenizer import train_tokenizer

    data = shutil.copytree(tiny_data, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    del meta["tokenizer_sha256"]
    (data / "meta.json").write_text(json.dumps(meta))
    texts = [p.read_text() for p in sorted(Path(meta["files"][0]).parent.glob("*.txt"))]
    other = train_tokenizer(texts, tmp_path / "other", vocab_size=350, seed=0)
    (data / "tokenizer.model").write_bytes(other.read_bytes())
    fails(
        capsys,
        train_argv(data, tmp_path / "run"),
        r"tokenizer .*tokenizer.model has 350 pieces but the shards were written with vocab_size=320",
    )
    junk(data / "tokenizer.model")
    fails(
        capsys, train_argv(data, tmp_path / "run"), r"tokenizer does not load \(.*not a SentencePiece model"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_deleted_tokenizer_is_refused_before_anything_is_saved(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path, dry_run: bool
) -> None:
    """It used to end in a traceback at the first save, leaving a `tmp-step_N` folder behind."""
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / "tokenizer.model").unlink()
    argv = train_argv(data, tmp_path / "run")
    fails(capsys, [*argv, "--dry-run"] if dry_run else argv, r"tokenizer.model is missing")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- prepare-data


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_empty_corpus_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str) -> None:
    """An empty .txt used to end in a datasets traceback; an empty .jsonl in `StopIteration`."""
    (tmp_path / name).write_text("")
    fails(
        capsys,
        ["prepare-data", f"data.source={tmp_path / name}", f"data.out_dir={tmp_path / 'd'}"],
        rf"{tmp_path / name} is empty \(0 bytes\); point data.source at a corpus with text",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_negative_data_seed_is_refused_by_prepare_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c", n_docs=3, lines=5)
    fails(
        capsys,
        ["prepare-data", f"data.source={corpus}", f"data.out_dir={tmp_path / 'd'}", "data.seed=-1"],
        r"data\.seed=-1",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_rerun_after_sigkill_removes_the_killed_runs_temporary_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c")
    out = tmp_path / "d"
    argv = [
        "prepare-data",
        f"data.source={corpus}",
        f"data.out_dir={out}",
        "data.vocab_size=320",
        "data.num_proc=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepsuite", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".d.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (left,) = tmp_path.glob(".d.tmp-*")  # the killed run had no chance to clean up
    # a folder of a run still alive and a user's folder of a similar name stay
    _, host, _, _ = left.name.split("-")
    alive = tmp_path / f".d.tmp-{host}-{os.getppid()}-abcd1234"  # our parent: alive
    users = tmp_path / ".d.tmp-keep"
    alive.mkdir()
    users.mkdir()
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out.splitlines()
    assert f"removed 1 leftover temporary folder of an interrupted run: {left}" in said
    assert not left.exists() and alive.is_dir() and users.is_dir()
    assert (out / "meta.json").is_file()


# ------------------------------------------------------------------------------- special files


@pytest.mark.timeout(120)  # opening a named pipe would block: fail instead of hanging the suite
@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("name", ["meta.json", "train_000.bin", "val_000.bin", "tokenizer.model"])
def test_named_pipe_in_a_data_folder_is_refused_unopened(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path, name: str, dry_run: bool
) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / name).unlink()
    os.mkfifo(data / name)
    argv = train_argv(data, tmp_path / "run")
    fails(
        capsys,
        [*argv, "--dry-run"] if dry_run else argv,
        rf"{data / name} is a named pipe, not a regular file",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_named_pipe_as_corpus_or_tokenizer_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    corpus = write_corpus(tmp_path / "c", n_docs=3, lines=5)
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    out = f"data.out_dir={tmp_path / 'd'}"
    fails(capsys, ["prepare-data", f"data.source={pipe}", out], rf"data.source {pipe} is a named pipe")
    fails(
        capsys,
        ["prepare-data", f"data.source={corpus}", f"data.tokenizer={pipe}", out],
        rf"tokenizer {pipe} is a named pipe",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "pipe.txt"]
