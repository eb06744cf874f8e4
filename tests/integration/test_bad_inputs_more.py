"""More bad input through the CLI: NaN and out-of-range numbers, `plan` options, raw DeepSpeed batch
keys, the tokenizer's vocabulary advice, an incomplete meta.json and a resume that changes the data
order. Each gives one `error: …` line, exit 2, and writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import fails, train_argv, write_corpus

from deepsuite.cli import main


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=nan", r"optim.lr=nan must be > 0 and finite"),  # was a ValueError in AdamW, exit 1
        ("optim.eps=-1", r"optim.eps=-1.0 must be > 0"),
        # a NaN grad_clip used to turn clipping silently off
        ("training.grad_clip=.nan", r"training.grad_clip=nan must be >= 0 and finite"),
        ("optim.weight_decay=.nan", r"optim.weight_decay=nan must be >= 0 and finite"),
        ("training.mtp_lambda=.inf", r"training.mtp_lambda=inf must be >= 0 and finite"),
    ],
)
def test_bad_float_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path, override: str, pattern: str
) -> None:
    fails(capsys, [*train_argv(tiny_data, tmp_path / "run"), override], pattern)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("train_micro_batch_size_per_gpu", "training.micro_batch_size"),
        ("gradient_accumulation_steps", "training.gradient_accumulation_steps"),
        ("train_batch_size", "training.global_batch_size"),
    ],
)
def test_raw_deepspeed_batch_key_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str, ours: str
) -> None:
    fails(
        capsys,
        [*train_argv(tmp_path / "data", tmp_path / "run"), f"parallel.deepspeed={{{key}: 4}}"],
        rf"parallel.deepspeed.{key}=4 is not allowed.*set {ours}",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--nodes", "0"], r"--nodes=0 must be >= 1"),  # was a ZeroDivisionError traceback
        (["--gpus-per-node", "-1"], r"--gpus-per-node=-1 must be >= 1"),  # printed FITS
        (["--micro-batch", "0"], r"--micro-batch=0 must be >= 1"),
        (["--seq-len", "0"], r"--seq-len=0 must be >= 1"),
        (["--gpu-mem", "nan"], r"--gpu-mem=nan must be a finite number"),
    ],
)
def test_plan_bad_numbers(capsys: pytest.CaptureFixture[str], args: list[str], pattern: str) -> None:
    out = fails(capsys, ["plan", "--model", "gpt2-small", *args], pattern)
    assert "FITS" not in out


# ---------------------------------------------------------------------------------------- data


def test_vocab_too_small_says_raise_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", n_docs=2, lines=5)
    out = fails(
        capsys,
        ["prepare-data", f"data.source={corpus}", f"data.out_dir={tmp_path / 'd'}", "data.vocab_size=260"],
        r"data.vocab_size=260 is too small for this corpus.*raise data.vocab_size to >= \d+$",
    )
    assert "lower" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_vocab_too_large_says_lower_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", n_docs=2, lines=5)
    fails(
        capsys,
        ["prepare-data", f"data.source={corpus}", f"data.out_dir={tmp_path / 'd'}", "data.vocab_size=5000"],
        r"data.vocab_size=5000 is too large for this corpus.*lower data.vocab_size to <= \d+",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_meta_without_vocab_size(capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    del meta["vocab_size"]
    (data / "meta.json").write_text(json.dumps(meta))
    fails(
        capsys,
        train_argv(data, tmp_path / "run"),
        r"meta.json: key 'vocab_size' is missing.*prepare-data --config FILE --force",
    )
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def two_steps(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with one complete checkpoint (step 2 of 2)."""
    run_dir = tmp_path_factory.mktemp("two_steps")
    argv = train_argv(
        tiny_data, run_dir, training__steps=2, training__sample_tokens=0, training__eval_every=0
    )
    assert main(argv) == 0
    assert (run_dir / "step_2").is_dir()
    return run_dir


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"training__seq_len": 8}, r"training.seq_len=16 but the config has training.seq_len=8"),
        ({"data__seed": 99}, r"data.seed=1234 but the config has data.seed=99"),
    ],
)
def test_resume_with_another_window_order_is_refused(
    capsys: pytest.CaptureFixture[str],
    tiny_data: Path,
    two_steps: Path,
    tmp_path: Path,
    change: dict[str, object],
    pattern: str,
) -> None:
    """The sampler's position only fits its own window order: another seq_len or seed is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    before = snapshot(run_dir)
    argv = train_argv(tiny_data, run_dir, training__steps=4, training__sample_tokens=0, **change)
    fails(capsys, argv, pattern + r".*original value.*checkpoint.init_from")
    assert snapshot(run_dir) == before  # nothing written
