"""`checkpoint.init_from`: a fresh run starting from a training checkpoint, an HF folder or a
deepsuite model folder, with the architecture checked field by field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_DEEPSEEK, tiny_overrides

from deepsuite.cli import main
from deepsuite.config import ConfigError, load_config
from deepsuite.training.trainer import TrainResult, train


def run(data: Path, run_dir: Path, **extra: object) -> TrainResult:
    overrides = {**TINY_DEEPSEEK, "training__sample_tokens": 0, **extra}
    return train(load_config(None, tiny_overrides(data, run_dir, **overrides)))


@pytest.fixture(scope="module")
def source(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """A tiny DeepSeek-V3 (with one MTP module) trained for 4 steps, validated at 0, 2 and 4."""
    run_dir = tmp_path_factory.mktemp("source")
    result = run(tiny_data, run_dir, training__steps=4, training__eval_every=2)
    assert 4 in result.val_losses
    return run_dir, result


@pytest.mark.parametrize("kind", ["training checkpoint", "hf", "deepsuite"])
def test_fresh_run_starts_from_the_weights(
    source: tuple[Path, TrainResult],
    tiny_data: Path,
    tmp_path: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src_dir, src = source
    init = src_dir
    if kind != "training checkpoint":  # the same weights through the conversion tools
        init = tmp_path / kind
        argv = ["consolidate", str(src_dir), str(init), "--format", kind]
        assert main(argv) == 0
    capsys.readouterr()
    result = run(tiny_data, tmp_path / "run", training__steps=1, checkpoint__init_from=init)
    assert result.start_step == 0
    # step 0 validates the source's final weights: the source's last validation loss
    assert result.val_losses[0] == pytest.approx(src.val_losses[4], rel=1e-6)
    assert f"initialised from {init}" in capsys.readouterr().out


def test_architecture_mismatch_names_the_fields(
    source: tuple[Path, TrainResult], tiny_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"model\.n_layers=3 here, 2 in the source"):
        run(
            tiny_data, tmp_path / "run", training__steps=1, model__n_layers=3, checkpoint__init_from=source[0]
        )
    assert not (tmp_path / "run" / "step_1").exists()


def test_mtp_modules_may_differ(
    source: tuple[Path, TrainResult], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src_dir, src = source
    capsys.readouterr()
    result = run(
        tiny_data, tmp_path / "run", training__steps=1, model__mtp_depth=0, checkpoint__init_from=src_dir
    )
    assert "MTP tensors of the source dropped" in capsys.readouterr().out
    assert result.val_losses[0] == pytest.approx(src.val_losses[4], rel=1e-6)  # next-token loss alone


def test_resume_wins_over_init_from(
    source: tuple[Path, TrainResult], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run(tiny_data, run_dir, training__steps=2, training__max_steps_per_run=1)
    capsys.readouterr()
    result = run(tiny_data, run_dir, training__steps=2, checkpoint__init_from=source[0])
    assert result.start_step == 1
    assert "checkpoint.init_from ignored: resuming from" in capsys.readouterr().out


def test_missing_source_is_one_error_line(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *tiny_overrides(tiny_data, tmp_path / "run", checkpoint__init_from=tmp_path / "nope")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint.init_from=") and "does not exist" in err[-1]


def test_weights_of_a_transformers_folder(tmp_path: Path) -> None:
    """A folder written by transformers itself (GPT2LMHeadModel.save_pretrained): the built model
    then computes transformers' logits; dropout/init settings may differ, the architecture may not."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from deepsuite.checkpoint.init_from import load_initial_weights
    from deepsuite.models.registry import build_model

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.3)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = load_config(None, tiny_overrides(tmp_path / "d", tmp_path / "r"))
    model = build_model(cfg.model).eval()
    summary = load_initial_weights(model, str(tmp_path / "hf"))
    assert "Hugging Face folder" in summary
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    wider = build_model(
        load_config(None, tiny_overrides(tmp_path / "d", tmp_path / "r", model__d_ffn=64)).model
    )
    with pytest.raises(ConfigError, match=r"model\.d_ffn=64 here, 0 in the source"):
        load_initial_weights(wider, str(tmp_path / "hf"))
