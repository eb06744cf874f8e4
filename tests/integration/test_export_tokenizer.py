"""Exports carry the run's tokenizer: `convert deepsuite-to-hf|zero-to-hf` and `consolidate` of a
training checkpoint write it as transformers reads it (special ids in config.json too), the
deepsuite-format exports copy it, and every file written follows the umask."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import HF_EOS, hf_tokenizer_folder, tiny_overrides, write_corpus

from deepsuite.checkpoint.hf_io import write_hf_folder
from deepsuite.cli import main
from deepsuite.config import load_config
from deepsuite.data import Tokenizer, prepare_data

tokenizers = pytest.importorskip("tokenizers")

EOS = HF_EOS
TEXT = "ROMEO:\n  The king doth love thee, fair lady.\n\nJULIET:\n  Ünïcödé 🎭 sorrow.\n"
QUICK = dict(training__steps=2, training__eval_every=100, training__sample_tokens=0, schedule__warmup_steps=0)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, run folder) of a 2-step GPT run on a Hugging Face tokenizer."""
    root = tmp_path_factory.mktemp("hf_run")
    corpus = write_corpus(root / "corpus", n_docs=4, lines=40)
    folder = hf_tokenizer_folder(root / "tok", corpus)
    run_dir = root / "run"
    overrides = tiny_overrides(root / "data", run_dir, model__vocab_size=400, **QUICK)
    overrides += [f"data.source={corpus}", f"data.tokenizer={folder}", "data.num_proc=1"]
    prepare_data(load_config(None, overrides).data, log=lambda _: None)
    assert main(["train", *overrides]) == 0
    assert (run_dir / "step_2" / "tokenizer.json").is_file()
    return corpus, run_dir


def _config(folder: Path) -> dict[str, object]:
    return json.loads((folder / "config.json").read_text())


def test_hf_tokenizer_run_exports_a_folder_transformers_and_prepare_data_use(
    hf_run: tuple[Path, Path], tmp_path: Path, umask_022: None
) -> None:
    from transformers import AutoTokenizer

    corpus, run_dir = hf_run
    ours = Tokenizer(run_dir / "step_2" / "tokenizer.json")
    out = tmp_path / "hf"
    assert main(["convert", "deepsuite-to-hf", str(run_dir), str(out)]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    assert _config(out)["eos_token_id"] == ours.eos_id
    assert set(_modes(out).values()) == {0o755, 0o644}  # the folder, and every file (weights too)
    tok_conf = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_conf["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_conf["eos_token"] == EOS
    assert "bos_token" not in tok_conf and "pad_token" not in tok_conf  # only those that exist
    ref = AutoTokenizer.from_pretrained(str(out))  # a local folder: no network
    assert ref.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT)
    assert ref.eos_token_id == ours.eos_id and ref.decode(ours.encode(TEXT)) == TEXT
    # the exported folder is a valid data.tokenizer
    data2 = tmp_path / "data2"
    argv = ["prepare-data", f"data.source={corpus}", f"data.out_dir={data2}", f"data.tokenizer={out}"]
    assert main([*argv, "data.num_proc=1"]) == 0
    meta = json.loads((data2 / "meta.json").read_text())
    assert meta["eos_id"] == ours.eos_id and meta["vocab_size"] == ours.vocab_size
    assert Tokenizer(data2 / "tokenizer.json").encode(TEXT) == ours.encode(TEXT)


def test_every_export_of_an_hf_tokenizer_run_carries_it(hf_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = hf_run
    ckpt_tok = run_dir / "step_2" / "tokenizer.json"
    eos = Tokenizer(ckpt_tok).eos_id
    for name, argv in [
        ("zero", ["convert", "zero-to-hf", str(run_dir / "step_2"), str(tmp_path / "zero")]),
        ("cons", ["consolidate", str(run_dir), str(tmp_path / "cons"), "--format", "hf"]),
    ]:
        assert main(argv) == 0, name
        out = tmp_path / name
        assert Tokenizer(out).eos_id == eos and _config(out)["eos_token_id"] == eos, name
    # deepsuite format: the checkpoint's bundle copied as is, and it goes on to the HF export
    ds = tmp_path / "ds"
    assert main(["consolidate", str(run_dir), str(ds), "--format", "deepsuite"]) == 0
    assert (ds / "tokenizer.json").read_bytes() == ckpt_tok.read_bytes()
    assert main(["convert", "deepsuite-to-hf", str(ds), str(tmp_path / "hf2")]) == 0
    assert _config(tmp_path / "hf2")["eos_token_id"] == eos
    # and back: the HF folder's tokenizer is bundled into the deepsuite folder
    assert main(["convert", "hf-to-deepsuite", str(tmp_path / "hf2"), str(tmp_path / "ds2")]) == 0
    back = Tokenizer(tmp_path / "ds2" / "tokenizer.json")
    assert back.eos_id == eos and back.encode(TEXT) == Tokenizer(ckpt_tok).encode(TEXT)


def test_sentencepiece_run_exports_its_model(tiny_data: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    run_dir = tmp_path / "run"
    assert main(["train", *tiny_overrides(tiny_data, run_dir, **QUICK)]) == 0
    ckpt_tok = run_dir / "step_2" / "tokenizer.model"
    out = tmp_path / "hf"
    assert main(["convert", "zero-to-hf", str(run_dir), str(out)]) == 0
    assert (out / "tokenizer.model").read_bytes() == ckpt_tok.read_bytes()
    config = _config(out)
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (2, 1, 3)
    tok_conf = json.loads((out / "tokenizer_config.json").read_text())
    assert [tok_conf[f"{n}_token"] for n in ("unk", "bos", "eos", "pad")] == ["<unk>", "<s>", "</s>", "<pad>"]
    ours = Tokenizer(out / "tokenizer.model")
    assert ours.kind == "sentencepiece" and ours.eos_id == 2
    assert ours.encode(TEXT) == Tokenizer(ckpt_tok).encode(TEXT)
    ref = AutoTokenizer.from_pretrained(str(out))
    assert ref.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT) and ref.eos_token_id == 2
    ds = tmp_path / "ds"
    assert main(["consolidate", str(run_dir), str(ds), "--format", "deepsuite"]) == 0
    assert (ds / "tokenizer.model").read_bytes() == ckpt_tok.read_bytes()


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = write_hf_folder(tmp_path / "hf", {"model_type": "x"}, {"w": torch.zeros(3)})
        sharded = write_hf_folder(
            tmp_path / "sharded", {}, {"a": torch.zeros(64), "b": torch.zeros(64)}, max_shard_bytes=256
        )
    finally:
        os.umask(old)
    for folder in (out, sharded):
        modes = _modes(folder)
        assert len(modes) >= 3
        assert modes.pop(folder.name) == 0o777 & ~umask
        assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes
