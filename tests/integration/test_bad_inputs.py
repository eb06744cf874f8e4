"""Bad input through the CLI: one clear `error: …` line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import fails, train_argv, write_corpus

from deepsuite.cli import main


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or (not any(folder.glob("step_*")) and not any(folder.glob("tmp-*")))


@pytest.fixture(scope="module")
def finished(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with complete checkpoints (steps 2 and 4 of 4)."""
    run_dir = tmp_path_factory.mktemp("finished")
    assert main(train_argv(tiny_data, run_dir, training__steps=4, training__sample_tokens=0)) == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- data


def test_missing_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(
        capsys,
        ["prepare-data", f"data.source={tmp_path / 'none'}", f"data.out_dir={tmp_path / 'd'}"],
        r"does not exist",
    )
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("\n \n")
    fails(
        capsys,
        ["prepare-data", f"data.source={tmp_path / 'c'}", f"data.out_dir={tmp_path / 'd'}"],
        r"holds no text",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_non_utf8_corpus(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", n_docs=3, lines=5)
    bad = corpus / "play_01.txt"
    bad.write_bytes(bad.read_bytes()[:40] + b"\xe9t\xe9" + bad.read_bytes()[40:])
    fails(
        capsys,
        ["prepare-data", f"data.source={corpus}", f"data.out_dir={tmp_path / 'd'}", "data.vocab_size=300"],
        rf"{bad}: byte 40 is not valid UTF-8",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_token_id_beyond_vocab(capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path) -> None:
    data = copy_run(tiny_data, tmp_path / "data")
    arr = np.memmap(data / "train_000.bin", dtype=np.uint16, mode="r+")
    arr[77] = 999
    arr.flush()
    del arr
    fails(
        capsys,
        train_argv(data, tmp_path / "run"),
        r"train_000\.bin: token id 999 at offset 77 is >= vocab_size=320",
    )
    assert not (tmp_path / "run").exists()


def test_data_not_prepared(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, train_argv(tmp_path / "nodata", tmp_path / "run"), r"run `deepsuite prepare-data")
    assert not (tmp_path / "run").exists()


def test_model_vocab_smaller_than_tokenizer(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path
) -> None:
    fails(
        capsys,
        train_argv(tiny_data, tmp_path / "run", model__vocab_size=300),
        r"model.vocab_size=300 is smaller",
    )


# -------------------------------------------------------------------------------------- config


def test_steps_not_positive(capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path) -> None:
    fails(capsys, train_argv(tiny_data, tmp_path / "run", training__steps=0), r"training.steps=0 must be > 0")
    fails(
        capsys, train_argv(tiny_data, tmp_path / "run", training__steps=-3), r"training.steps=-3 must be > 0"
    )
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible(capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path) -> None:
    fails(
        capsys,
        train_argv(tiny_data, tmp_path / "run", training__global_batch_size=6, training__micro_batch_size=4),
        r"global_batch_size=6 is not divisible",
    )
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir(capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails(capsys, train_argv(tiny_data, blocker / "run"), r"checkpoint.dir=.* is not writable")
    argv = [*train_argv(tiny_data, tmp_path / "ok"), f"logging.run_dir={blocker / 'logs'}"]
    fails(capsys, argv, r"logging.run_dir=.* is not writable")


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_another_model(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, finished: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    before = sorted(p.name for p in run_dir.iterdir())
    fails(
        capsys,
        train_argv(tiny_data, run_dir, training__steps=6, model__d_model=48),
        r"trained with model.d_model=32 but the config has model.d_model=48",
    )
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_corrupt_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, finished: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    target = run_dir / "step_4" / "deepspeed" / "mp_rank_00_model_states.pt"
    with open(target, "r+b") as f:
        f.truncate(100)
    fails(
        capsys,
        train_argv(tiny_data, run_dir, training__steps=6),
        r"step_4 is corrupt: .*mp_rank_00_model_states.pt has 100 bytes",
    )
    # same size, garbage inside, in a checkpoint without checksums (an older one, or its manifest
    # deleted; test_checksums covers the manifest): the weights-only reader fails on it
    (run_dir / "step_4" / "manifest.json").unlink()
    state = json.loads((run_dir / "step_4" / "state.json").read_text())
    state["files"]["deepspeed/mp_rank_00_model_states.pt"] = 100
    (run_dir / "step_4" / "state.json").write_text(json.dumps(state))
    fails(capsys, train_argv(tiny_data, run_dir, training__steps=6), r"step_4 is corrupt: .*cannot be read")
    assert not (run_dir / "step_6").exists()


def test_incomplete_checkpoint_given_explicitly(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, finished: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "step_2" / "state.json").unlink()
    fails(
        capsys,
        train_argv(tiny_data, tmp_path / "new", checkpoint__resume=run_dir / "step_2"),
        r"step_2 is incomplete \(no state.json\)",
    )
    assert nothing_written(tmp_path / "new")


def test_resume_flag_without_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path
) -> None:
    fails(
        capsys,
        [*train_argv(tiny_data, tmp_path / "run"), "--resume"],
        r"--resume: .*does not exist|no checkpoint",
    )


class Payload:
    """Unpickling this calls Path.touch(marker): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def plant_payload(ckpt: Path, marker: Path) -> None:
    import torch

    target = ckpt / "deepspeed" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=True)
    state["evil"] = Payload(marker)
    torch.save(state, target)
    meta = json.loads((ckpt / "state.json").read_text())
    meta["files"]["deepspeed/mp_rank_00_model_states.pt"] = target.stat().st_size  # size check passes
    (ckpt / "state.json").write_text(json.dumps(meta))
    (ckpt / "manifest.json").unlink()  # checksums are no defence against a planted file: the unpickler is


def test_pickled_payload_is_refused_not_run(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, finished: Path, tmp_path: Path
) -> None:
    run_dir = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "code-ran"
    plant_payload(run_dir / "step_4", marker)
    # sanity: an unrestricted load of the planted file would run the payload
    import torch

    probe = tmp_path / "probe.pt"
    torch.save({"x": Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    fails(
        capsys,
        train_argv(tiny_data, run_dir, training__steps=6),
        r"refusing to load .*mp_rank_00_model_states.pt.*pickled object",
    )
    fails(capsys, ["generate", "--checkpoint", str(run_dir), "--prompt", "x"], r"refusing to load")
    fails(capsys, ["convert", "zero-to-hf", str(run_dir), str(tmp_path / "hf")], r"refusing to load")
    assert not marker.exists()
    assert not (run_dir / "step_6").exists() and not (tmp_path / "hf").exists()


def test_generate_without_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"], r"does not exist")


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--top-p", "0"], r"--top-p=0.0 must be in \(0, 1\]"),
        (["--temperature", "-1"], r"--temperature=-1.0 must be >= 0"),
        (["--top-k", "-3"], r"--top-k=-3 must be >= 0"),
    ],
)
def test_generate_bad_sampling_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], pattern: str
) -> None:
    # checked before the checkpoint is even looked for
    fails(capsys, ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", *flags], pattern)


def test_generate_prompt_longer_than_the_model(capsys: pytest.CaptureFixture[str], finished: Path) -> None:
    prompt = " ".join(["ROMEO and JULIET"] * 60)  # > max_seq_len=64 tokens
    fails(capsys, ["generate", "--checkpoint", str(finished), "--prompt", prompt], r"max_seq_len is 64")
    # a prompt that fits but leaves less room than asked: shortened, with a note
    assert (
        main(["generate", "--checkpoint", str(finished), "--prompt", "ROMEO", "--max-new-tokens", "500"]) == 0
    )
    assert "note: --max-new-tokens 500 shortened to" in capsys.readouterr().err


def test_non_finite_loss_stops_without_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    fails(
        capsys,
        train_argv(tiny_data, run_dir, optim__lr=1e30, training__grad_clip=0, checkpoint__every=0),
        r"non-finite loss \(nan\) at step \d+; stopped without saving a checkpoint",
        code=3,
    )
    assert nothing_written(run_dir) and not (run_dir / "latest").exists()


def test_dry_run_checks_what_training_would_refuse(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, finished: Path, tmp_path: Path
) -> None:
    """`--dry-run` runs the checks `train` makes before building: data vs vocabulary, the
    checkpoint it would resume from, the init_from source; and says what the run would do."""
    dry = ["--dry-run"]
    fails(
        capsys,
        [*train_argv(tiny_data, tmp_path / "a", model__vocab_size=100), *dry],
        r"model.vocab_size=100 is smaller",
    )
    fails(
        capsys,
        [*train_argv(tiny_data, tmp_path / "b", checkpoint__init_from=tmp_path / "no"), *dry],
        r"does not exist",
    )
    fails(
        capsys,
        [*train_argv(tiny_data, tmp_path / "c", checkpoint__resume="maybe"), *dry],
        r"'maybe' does not exist",
    )
    fails(capsys, [*train_argv(tiny_data, finished, model__n_layers=3), *dry], r"model.n_layers")
    fails(capsys, [*train_argv(tiny_data, finished, training__seq_len=8), *dry], r"training.seq_len=16")
    fails(capsys, [*train_argv(tiny_data, tmp_path / "e"), "--resume", *dry], r"--resume: .* does not exist")
    never = train_argv(tiny_data, finished, checkpoint__resume="never")
    fails(capsys, [*never, "--resume", *dry], r"--resume contradicts checkpoint.resume=never")
    capsys.readouterr()
    assert main([*train_argv(tiny_data, finished, training__steps=8), *dry]) == 0
    out = capsys.readouterr().out
    assert f"would resume from {finished / 'step_4'} (step 4)" in out and "train tokens" in out
    assert main([*train_argv(tiny_data, tmp_path / "d", checkpoint__init_from=finished), *dry]) == 0
    assert "starts at step 0" in (out := capsys.readouterr().out) and f"initialised from {finished}" in out


def test_consolidate_step_on_a_step_folder_says_what_to_pass(
    capsys: pytest.CaptureFixture[str], finished: Path, tmp_path: Path
) -> None:
    step = finished / "step_4"
    fails(
        capsys,
        ["consolidate", str(step), str(tmp_path / "o"), "--step", "2"],
        r"is itself a checkpoint \(step_4\)",
    )
    assert main(["consolidate", str(step), str(tmp_path / "o"), "--step", "4"]) == 0  # the same one: fine


def test_generate_from_a_model_folder_without_tokenizer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from deepsuite.checkpoint.hf_io import save_model
    from deepsuite.models import build_model

    save_model(build_model(name="gpt", flavor="gpt2-debug"), tmp_path / "m")
    fails(capsys, ["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "x"], r"holds no tokenizer")


def test_init_from_another_family_names_model_name(tiny_data: Path, finished: Path, tmp_path: Path) -> None:
    from conftest import TINY_DEEPSEEK

    from deepsuite.config import ConfigError, load_config
    from deepsuite.training.trainer import train

    argv = train_argv(tiny_data, tmp_path / "r", checkpoint__init_from=finished, **TINY_DEEPSEEK)[1:]
    with pytest.raises(ConfigError, match=r"model\.name=deepseek_v3 here, gpt in the source"):
        train(load_config(None, argv))
