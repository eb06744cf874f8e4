"""Hugging Face tokenizers as `data.tokenizer`: the ids equal transformers' fast tokenizer on the
same files, EOS comes from tokenizer_config.json / config.json, prepare-data bundles it into one
file that checkpoints copy, and a model folder's own tokenizer trains and samples end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import HF_EOS, hf_tokenizer_folder, tiny_overrides, write_corpus

from deepsuite.config import load_config
from deepsuite.data import DataError, Tokenizer, prepare_data
from deepsuite.data.tokenizer import bundle_hf_tokenizer, is_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")

EOS = HF_EOS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=6, lines=60)
    (folder / "play_99.txt").write_text("Ünïcödé — “quotes” and émojis 🎭 survive.\n", encoding="utf-8")
    return folder


def test_ids_equal_transformers_fast_tokenizer(corpus: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    folder = hf_tokenizer_folder(tmp_path / "hf", corpus)
    ours = Tokenizer(folder)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=EOS)
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text  # byte-level BPE round-trips any text
    assert ours.kind == "huggingface" and ours.eos_id == ref.eos_token_id
    assert ours.vocab_size == len(ref) and ours.bos_id == -1
    assert ours.decode([*ours.encode("the king"), ours.eos_id]) == "the king"  # special ids dropped
    # special-token text inside a document is text, not a document boundary
    literal = f"the king {EOS} the queen"
    assert ours.eos_id not in ours.encode(literal) and ours.decode(ours.encode(literal)) == literal


@pytest.mark.parametrize("eos_in", ["tokenizer_config", "config"])
def test_bundle_is_self_contained(corpus: Path, tmp_path: Path, eos_in: str) -> None:
    folder = hf_tokenizer_folder(tmp_path / "hf", corpus, eos_in=eos_in)
    bundle = tmp_path / "data" / "tokenizer.json"
    bundle.parent.mkdir()
    bundle_hf_tokenizer(folder, bundle)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (folder / name).unlink(missing_ok=True)  # the original is gone: the bundle still works
    tok = Tokenizer(bundle)
    assert is_hf_tokenizer(bundle) and tok.eos_id >= 0
    assert tok.decode(tok.encode("JULIET:\n  Fair love.")) == "JULIET:\n  Fair love."


def test_missing_eos_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    folder = hf_tokenizer_folder(tmp_path / "hf", corpus, eos_in="nowhere")
    with pytest.raises(DataError, match="cannot tell the end-of-document token"):
        Tokenizer(folder)
    with pytest.raises(DataError, match="cannot tell the end-of-document token"):
        bundle_hf_tokenizer(folder, tmp_path / "b.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        Tokenizer(tmp_path / "bad.json")


def test_prepare_train_and_generate_with_a_model_folders_tokenizer(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepsuite.cli import main
    from deepsuite.data import TokenShards

    folder = hf_tokenizer_folder(tmp_path / "hf", corpus)
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = tiny_overrides(data_dir, run_dir, training__steps=2, model__vocab_size=400)
    overrides += [f"data.source={corpus}", f"data.tokenizer={folder}", "data.num_proc=1"]
    meta = prepare_data(load_config(None, overrides).data, log=lambda _: None)
    tok = Tokenizer(folder)
    assert meta["tokenizer"] == "tokenizer.json" and meta["eos_id"] == tok.eos_id
    assert meta["vocab_size"] == tok.vocab_size
    # every document is its tokens followed by the EOS id, in corpus order over both splits
    train = np.asarray(TokenShards(data_dir, "train").read(0, meta["splits"]["train"]["tokens"]))
    assert (train == tok.eos_id).sum() == meta["splits"]["train"]["documents"]
    first_doc = train[: int(np.argmax(train == tok.eos_id))].tolist()
    assert tok.decode(first_doc) in {p.read_text(encoding="utf-8") for p in corpus.glob("*.txt")}
    assert main(["train", *overrides]) == 0
    ckpt = run_dir / "step_2"
    assert (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer.model").exists()
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "5"]
    assert main([*argv, "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
