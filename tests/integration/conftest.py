"""Shared fixtures for the pipeline tests: a tiny corpus, its prepared shards and a tiny run config."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

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
    "hath",
    "doth",
    "thou",
    "thee",
    "thy",
    "mine",
    "honour",
    "grace",
    "noble",
    "gentle",
    "sweet",
    "sorrow",
    "fortune",
    "heaven",
    "earth",
    "fire",
    "water",
    "wind",
]
NAMES = ["ROMEO", "JULIET", "HAMLET", "LEAR", "MACBETH", "OTHELLO"]


def write_corpus(folder: Path, n_docs: int = 8, lines: int = 120, seed: int = 0) -> Path:
    """`n_docs` small plays of pseudo-English lines, deterministic for `seed`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        out = []
        for _ in range(lines):
            speaker = rng.choice(NAMES)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
            out.append(f"{speaker}:\n  {words.capitalize()}.\n")
        (folder / f"play_{d:02d}.txt").write_text("\n".join(out), encoding="utf-8")
    return folder


def tiny_overrides(data_dir: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides for a tiny GPT run on the tiny corpus (seconds per run on one CPU core)."""
    values: dict[str, object] = {
        "model.flavor": "gpt2-debug",
        "model.vocab_size": 320,
        "model.d_model": 32,
        "model.n_layers": 1,
        "model.n_heads": 2,
        "model.max_seq_len": 64,
        "data.out_dir": str(data_dir),
        "data.vocab_size": 320,
        "training.steps": 6,
        "training.seq_len": 16,
        "training.global_batch_size": 4,
        "training.micro_batch_size": 2,
        "training.eval_every": 3,
        "training.eval_batches": 2,
        "training.sample_tokens": 8,
        "schedule.warmup_steps": 2,
        "checkpoint.dir": str(run_dir),
        "checkpoint.every": 2,
        "checkpoint.keep_last": 2,
        "logging.run_dir": str(run_dir),
        "logging.log_every": 1,
        "logging.progress": False,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


# a tiny DeepSeek-V3 (MLA, MoE after one dense layer, one MTP module) on top of `tiny_overrides`
TINY_DEEPSEEK: dict[str, object] = {
    "model__name": "deepseek_v3",
    "model__flavor": "deepseek-v3-debug",
    "model__n_layers": 2,
    "model__inter_dim": 64,
    "model__moe_inter_dim": 16,
    "model__q_lora_rank": 16,
    "model__kv_lora_rank": 16,
    "model__qk_nope_head_dim": 8,
    "model__qk_rope_head_dim": 8,
    "model__v_head_dim": 8,
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data folder (320-piece tokenizer) from an 8-document corpus."""
    from deepsuite.config import load_config
    from deepsuite.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus")
    out = root / "data"
    cfg = load_config(
        None, [f"data.source={corpus}", f"data.out_dir={out}", "data.vocab_size=320", "data.num_proc=1"]
    )
    prepare_data(cfg.data, log=lambda _: None)
    return out


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str, code: int = 2) -> str:
    """Run the CLI: exit status ``code``, no traceback, and exactly one `error: …` line on stderr, its
    last line, matching ``pattern``; returns that line."""
    import re

    from deepsuite.cli import main

    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    assert err[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in err) == 1, err
    assert "Traceback" not in "\n".join(err)
    assert re.search(pattern, err[-1]), err[-1]
    return err[-1]


def train_argv(data: Path, run_dir: Path, **extra: object) -> list[str]:
    """`deepsuite train` arguments of a tiny run (see `tiny_overrides`)."""
    return ["train", *tiny_overrides(data, run_dir, **extra)]


HF_EOS = "<|endoftext|>"


def hf_tokenizer_folder(folder: Path, corpus: Path, eos_in: str = "tokenizer_config") -> Path:
    """A GPT-2-style byte-level BPE trained on `corpus`, saved as a model folder holds it; the EOS
    named in tokenizer_config.json, config.json (as an id) or nowhere (``eos_in``)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[HF_EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if eos_in == "tokenizer_config":
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": HF_EOS}}))
    elif eos_in == "config":
        (folder / "config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id(HF_EOS)}))
    return folder
