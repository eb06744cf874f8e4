"""End to end in one process: train, exact resume, checkpoint layout, metrics, generate, convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_DEEPSEEK, tiny_overrides

from deepsuite.config import load_config
from deepsuite.training.trainer import TrainResult, train

ROOT = Path(__file__).resolve().parents[2]


def run(data: Path, run_dir: Path, **extra: object) -> TrainResult:
    return train(load_config(None, tiny_overrides(data, run_dir, **extra)))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.fixture(scope="module")
def straight(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """6 uninterrupted steps, checkpoints every 2 (keep 2)."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, run(tiny_data, run_dir)


def test_exact_resume_is_bitwise_identical(
    straight: tuple[Path, TrainResult], tiny_data: Path, tmp_path: Path
) -> None:
    ref_dir, ref = straight
    first = run(tiny_data, tmp_path, training__max_steps_per_run=3)
    assert first.end_step == 3 and (tmp_path / "step_3").is_dir() and first.sample == ""
    second = run(tiny_data, tmp_path)  # checkpoint.resume=auto
    assert second.start_step == 3 and second.end_step == 6
    assert len(ref.losses) == 6
    assert first.losses + second.losses == ref.losses  # bitwise: float equality
    assert losses(tmp_path) == losses(ref_dir)
    assert val_losses(tmp_path) == val_losses(ref_dir)
    from deepsuite.checkpoint.consolidate import consolidated_state_dict
    from deepsuite.checkpoint.manager import read_state

    a = consolidated_state_dict(ref_dir / "step_6", read_state(ref_dir / "step_6"))
    b = consolidated_state_dict(tmp_path / "step_6", read_state(tmp_path / "step_6"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert second.sample == ref.sample and ref.sample.startswith("ROMEO:")


def test_loss_decreases_and_metrics_are_logged(straight: tuple[Path, TrainResult]) -> None:
    run_dir, _ = straight
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(r)
    assert train_rows[-1]["tokens_seen"] == 6 * 4 * 16
    assert train_rows[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup 2 steps
    val = val_losses(run_dir)
    assert sorted(val) == [0, 3, 6] and val[6] < val[0]
    assert (run_dir / "config.yaml").is_file()


def test_checkpoint_layout_and_rotation(straight: tuple[Path, TrainResult]) -> None:
    run_dir, result = straight
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_4", "step_6"]  # keep_last=2
    assert (run_dir / "latest").read_text().strip() == "step_6"
    assert not list(run_dir.glob("tmp-*")) and not list(run_dir.glob(".trash-*"))
    ckpt = run_dir / "step_6"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 16
    sampler = state["sampler"]
    assert {k: sampler[k] for k in ("epoch", "index", "seq_len", "seed")} == {
        "epoch": 0,
        "index": 24,
        "seq_len": 16,
        "seed": 1234,
    }
    assert sampler["tokens"] > 0 and sampler["data"]
    assert state["model"]["args"]["d_model"] == 32
    for rel, size in state["files"].items():
        assert (ckpt / rel).stat().st_size == size
    assert {"config.yaml", "tokenizer.model", "rng/rank_00000.json"} <= set(state["files"])
    rng = json.loads((ckpt / "rng" / "rank_00000.json").read_text())
    assert {"python", "numpy", "torch"} <= set(rng)
    assert result.checkpoint == str(ckpt)


def test_generate_cli(straight: tuple[Path, TrainResult], capsys: pytest.CaptureFixture[str]) -> None:
    from deepsuite.cli import main

    run_dir, _ = straight
    argv = [
        "generate",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:")
    assert main([*argv[:-2], "--temperature", "1.0", "--top-p", "0.9", "--seed", "3"]) == 0
    # --speculative needs an MTP module: a GPT checkpoint gets one error line and exit 2
    assert main([*argv[:-2], "--speculative"]) == 2
    assert "drafts with the MTP module" in capsys.readouterr().err


def test_convert_to_hf_matches_the_trained_model(straight: tuple[Path, TrainResult], tmp_path: Path) -> None:
    from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
    from deepsuite.checkpoint.hf import load_hf
    from deepsuite.cli import main

    run_dir, _ = straight
    model, _, _ = load_model_from_checkpoint(run_dir)
    x = torch.randint(0, 320, (2, 12))
    expected = model(x)
    assert main(["convert", "zero-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    torch.testing.assert_close(load_hf(tmp_path / "hf")(x), expected)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(hf(x).logits, expected, rtol=1e-4, atol=1e-4)
    assert main(["convert", "hf-to-deepsuite", str(tmp_path / "hf"), str(tmp_path / "ds")]) == 0
    assert main(["convert", "deepsuite-to-hf", str(tmp_path / "ds"), str(tmp_path / "hf2")]) == 0
    torch.testing.assert_close(load_hf(tmp_path / "hf2")(x), expected)


def test_zero2_resume_and_consolidation(
    straight: tuple[Path, TrainResult], tiny_data: Path, tmp_path: Path
) -> None:
    _, ref = straight
    first = run(tiny_data, tmp_path, training__max_steps_per_run=3, parallel__zero_stage=2)
    second = run(tiny_data, tmp_path, parallel__zero_stage=2)
    assert first.losses + second.losses == pytest.approx(ref.losses, rel=1e-6)
    from deepsuite.checkpoint.consolidate import load_model_from_checkpoint

    model, state, _ = load_model_from_checkpoint(tmp_path)
    assert state["zero_stage"] == 2 and state["step"] == 6
    x = torch.randint(0, 320, (1, 8))
    assert torch.isfinite(model(x)).all()


def test_plot_metrics(straight: tuple[Path, TrainResult], tmp_path: Path) -> None:
    import subprocess
    import sys

    run_dir, _ = straight
    out = tmp_path / "m.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "plot_metrics.py"),
            str(run_dir / "metrics.jsonl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp8_conversion_step_trains(tiny_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepsuite.fp8")
    result = run(tiny_data, tmp_path, fp8__enabled="true", model__d_model=64, training__sample_tokens=0)
    assert len(result.losses) == 6 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert result.losses[-1] < result.losses[0]


DSV3 = {**TINY_DEEPSEEK, "training__mtp_lambda": 0.3, "training__router_bias_update_rate": 0.01}


def test_deepseek_v3_mtp_run_reports_main_loss_and_acceptance(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny DeepSeek-V3 run with MTP: train records split the loss, the validation loss is the
    next-token loss alone (recomputed here from the saved weights), the end reports MTP acceptance,
    and an interrupted run resumes bitwise (router biases included)."""
    result = run(tiny_data, tmp_path / "a", **DSV3)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for r in train_rows:
        assert r["loss"] == pytest.approx(r["main_loss"] + 0.3 * r["mtp_loss_1"], rel=1e-5)
        assert "expert_load/max_over_mean" in r
    (spec,) = [r for r in rows if "mtp_acceptance" in r]
    assert spec["mtp_drafted"] > 0 and 0.0 <= spec["mtp_acceptance"] <= 1.0
    assert result.mtp_acceptance == spec["mtp_acceptance"]

    # the last validation loss equals the main cross-entropy of the final weights on the eval windows
    from deepsuite.checkpoint.consolidate import load_model_from_checkpoint
    from deepsuite.data import TokenShards, eval_starts, windows_batch

    model, _, cfg = load_model_from_checkpoint(tmp_path / "a" / "step_6")
    model.eval()
    val = TokenShards(tiny_data, "val")
    starts = eval_starts(val, cfg.training.seq_len, cfg.training.eval_batches * cfg.training.micro_batch_size)
    main = []
    with torch.no_grad():
        for lo in range(0, len(starts), cfg.training.micro_batch_size):
            inputs, labels = windows_batch(
                val, starts[lo : lo + cfg.training.micro_batch_size], cfg.training.seq_len
            )
            main.append(float(model(inputs, labels=labels).metrics["main_loss"]))
    last_val = [r for r in rows if "val_loss" in r][-1]
    assert last_val["val_loss"] == pytest.approx(sum(main) / len(main), rel=1e-5)
    assert last_val["val_mtp_loss_1"] != pytest.approx(last_val["val_loss"], rel=1e-6)

    # `deepsuite generate --speculative` prints the plain greedy text and the acceptance rate
    from deepsuite.cli import main

    argv = ["generate", "--checkpoint", str(tmp_path / "a"), "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    capsys.readouterr()  # the training output
    assert main([*argv, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*argv, "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy and "drafted tokens accepted" in captured.err

    first = run(tiny_data, tmp_path / "b", training__max_steps_per_run=3, **DSV3)
    second = run(tiny_data, tmp_path / "b", **DSV3)
    assert first.losses + second.losses == result.losses
    assert second.mtp_acceptance == result.mtp_acceptance


def lrs(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_resume_follows_the_configured_learning_rate(tiny_data: Path, tmp_path: Path) -> None:
    """A resumed run uses *its* optim.lr and schedule from the first step on (DeepSpeed restores the
    old ones with the checkpoint)."""
    run(tiny_data, tmp_path, training__steps=6, training__max_steps_per_run=3, optim__lr=1e-3)
    second = run(tiny_data, tmp_path, training__steps=8, optim__lr=4e-3, schedule__decay="constant")
    assert second.start_step == 3
    got = lrs(tmp_path)
    assert [got[s] for s in (4, 5, 8)] == pytest.approx([4e-3, 4e-3, 4e-3], rel=1e-12)


def test_finished_run_started_again_does_nothing(
    straight: tuple[Path, TrainResult], tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(straight[0], run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = run(tiny_data, run_dir, training__steps=4)  # the checkpoint is at step 6
    assert again.start_step == again.end_step == 6 and again.sample == ""
    assert "is at step 6 and training.steps=4: nothing to train" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_sigterm_checkpoints_and_stops_then_resume_is_exact(
    straight: tuple[Path, TrainResult],
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM (docker stop, SLURM time limit, preemption) during step 3 of 6: the run finishes
    that step, saves step_3 (not on the every-2 schedule), exits 128 + 15 with one line, and the
    next run resumes there and ends bitwise like the uninterrupted one."""
    import os
    import signal

    from deepsuite.cli import main
    from deepsuite.training.trainer import Trainer

    original = Trainer.train_step

    def step_then_signal(self: Trainer) -> dict[str, float]:
        out = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: recorded, acted on after this step
        return out

    argv = ["train", *tiny_overrides(tiny_data, tmp_path)]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", step_then_signal)
        capsys.readouterr()
        assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped: SIGTERM received: stopped after step 3 of 6 and saved")
    assert (tmp_path / "step_3").is_dir() and not (tmp_path / "step_4").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    assert main(argv) == 0
    assert losses(tmp_path) == losses(straight[0])


def test_generate_from_exported_folders_equals_the_run(
    straight: tuple[Path, TrainResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The HF and deepsuite folders exported from a run carry its tokenizer: greedy samples from
    them equal the run's own."""
    from deepsuite.cli import main

    run_dir, _ = straight
    gen = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), *gen]) == 0
    expected = capsys.readouterr().out
    assert main(["convert", "deepsuite-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
    assert main(["consolidate", str(run_dir), str(tmp_path / "ds"), "--format", "deepsuite"]) == 0
    for folder in ("hf", "ds"):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(tmp_path / folder), *gen]) == 0
        assert capsys.readouterr().out == expected, folder
