"""Checkpoint checksums (issue 16): one byte changed in any file of a training checkpoint or of an
exported model folder is found by every command that reads it, named in one `error:` line (exit 2)
with the newest intact checkpoint to use instead; older checkpoints without a manifest load with
one warning; `--no-verify` / `checkpoint.verify=false` skip the check.

One trained run (ZeRO-1, so the optimizer partition has its own file) is shared by the module and
copied per case."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import fails, train_argv

from deepsuite.checkpoint.checksums import MANIFEST_FILE, check_folder
from deepsuite.cli import main

RUN = {
    "training__steps": 4,
    "parallel__zero_stage": 1,
    "training__sample_tokens": 0,
    "training__eval_every": 0,
}

FILE_KINDS = {
    "model": "deepspeed/mp_rank_00_model_states.pt",
    "optimizer": "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "state": "state.json",
    "rng": "rng/rank_00000.json",
    "manifest": MANIFEST_FILE,
}


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints step_2 and step_4 (ZeRO-1, one rank)."""
    run_dir = tmp_path_factory.mktemp("checksums") / "run"
    assert main(train_argv(tiny_data, run_dir, **RUN)) == 0
    return run_dir


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's last checkpoint as an HF folder and as a deepsuite folder."""
    out = tmp_path_factory.mktemp("exported")
    assert main(["consolidate", str(trained), str(out / "hf")]) == 0
    assert main(["consolidate", str(trained), str(out / "ds"), "--format", "deepsuite"]) == 0
    return {"hf": out / "hf", "ds": out / "ds"}


def flip_one_byte(path: Path) -> None:
    """Change one byte of ``path`` in place, keeping its size, where no parser notices: a digit of a
    JSON file, a byte inside the largest tensor of a torch zip file, a byte near the end of a
    safetensors file (tensor data)."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        i = next(i for i in range(len(data) // 2, len(data)) if chr(data[i]).isdigit())
        data[i] = ord("7") if data[i] != ord("7") else ord("3")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = max(z.infolist(), key=lambda m: m.file_size)
        name_len, extra_len = struct.unpack(
            "<HH", data[member.header_offset + 26 : member.header_offset + 30]
        )
        i = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        data[i] ^= 0x01
    else:
        data[len(data) - 64] ^= 0x01
    path.write_bytes(bytes(data))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def notes(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The `warning:` and `error:` lines on stderr (DeepSpeed's progress bars left out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("warning", "error"))]


# ------------------------------------------------------------------------- training checkpoints


def test_every_file_is_in_the_manifest(trained: Path) -> None:
    for step in ("step_2", "step_4"):
        folder = trained / step
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {MANIFEST_FILE}
        assert set(FILE_KINDS.values()) <= on_disk
        assert check_folder(folder).verified and check_folder(folder).damage is None


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_damaged_file_is_named_by_resume_consolidate_convert_inspect(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, trained: Path, tmp_path: Path, kind: str
) -> None:
    run_dir = copy(trained, tmp_path / "run")
    rel = FILE_KINDS[kind]
    flip_one_byte(run_dir / "step_4" / rel)
    pattern = (
        rf"checkpoint .*step_4 is corrupt: {re.escape(rel)} .*"
        rf"newest intact checkpoint of the run is {re.escape(str(run_dir / 'step_2'))}"
    )
    resume = [*train_argv(tiny_data, run_dir, **{**RUN, "training__steps": 6}), "--resume"]
    for argv in (
        resume,
        ["consolidate", str(run_dir), str(tmp_path / "c")],
        ["convert", "zero-to-hf", str(run_dir), str(tmp_path / "z")],
        ["convert", "deepsuite-to-hf", str(run_dir / "step_4"), str(tmp_path / "d")],
        ["inspect", str(run_dir)],
        ["generate", "--checkpoint", str(run_dir), "--prompt", "x"],
    ):
        line = fails(capsys, argv, pattern)
        assert "Traceback" not in line
    assert not (run_dir / "step_6").exists()
    assert not any((tmp_path / name).exists() for name in ("c", "z", "d"))


def test_no_intact_checkpoint_is_said_so(
    capsys: pytest.CaptureFixture[str], trained: Path, tmp_path: Path
) -> None:
    run_dir = copy(trained, tmp_path / "run")
    flip_one_byte(run_dir / "step_4" / FILE_KINDS["model"])
    flip_one_byte(run_dir / "step_2" / FILE_KINDS["optimizer"])
    fails(capsys, ["inspect", str(run_dir)], r"step_4 is corrupt: .*no intact checkpoint in ")
    # the older one, asked for by name: the newer one is damaged too
    fails(
        capsys,
        ["inspect", str(run_dir / "step_2")],
        r"step_2 is corrupt: deepspeed/zero_pp.*no intact checkpoint",
    )


def test_special_file_in_place_of_a_checkpoint_file_is_refused_without_opening(
    capsys: pytest.CaptureFixture[str], trained: Path, tmp_path: Path
) -> None:
    run_dir = copy(trained, tmp_path / "run")
    rng = run_dir / "step_4" / FILE_KINDS["rng"]
    rng.unlink()
    os.mkfifo(rng)  # opening it for reading would block
    fails(capsys, ["inspect", str(run_dir)], r"rng/rank_00000.json .*not a regular file")


def test_old_checkpoint_without_manifest_loads_with_one_warning(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, trained: Path, tmp_path: Path
) -> None:
    run_dir = copy(trained, tmp_path / "run")
    for step in ("step_2", "step_4"):
        (run_dir / step / MANIFEST_FILE).unlink()
    warning = f"warning: {run_dir / 'step_4'} has no checksums (written by an older deepsuite); not verified"
    capsys.readouterr()
    assert main(["inspect", str(run_dir)]) == 0
    assert notes(capsys) == [warning]
    assert main(["consolidate", str(run_dir), str(tmp_path / "hf")]) == 0
    assert notes(capsys) == [warning]
    assert main([*train_argv(tiny_data, run_dir, **{**RUN, "training__steps": 6}), "--resume"]) == 0
    assert notes(capsys) == [warning]
    assert check_folder(run_dir / "step_6").verified  # what it writes now has checksums


def test_no_verify_skips_the_check(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, trained: Path, tmp_path: Path
) -> None:
    run_dir = copy(trained, tmp_path / "run")
    flip_one_byte(run_dir / "step_4" / FILE_KINDS["model"])  # tensor data: it still loads
    capsys.readouterr()
    assert main(["inspect", str(run_dir), "--no-verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "checksums not verified (--no-verify)" in report["integrity"]["checks"]
    assert main(["consolidate", str(run_dir), str(tmp_path / "hf"), "--no-verify"]) == 0
    assert main(["convert", "zero-to-hf", str(run_dir), str(tmp_path / "z"), "--no-verify"]) == 0
    argv = [*train_argv(tiny_data, run_dir, **{**RUN, "training__steps": 6}), "checkpoint.verify=false"]
    assert main([*argv, "--resume"]) == 0
    assert notes(capsys) == []


def test_clean_checkpoint_is_reported_verified(capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    capsys.readouterr()
    assert main(["inspect", str(trained), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert f"every file matches its size and checksum in {MANIFEST_FILE}" in report["integrity"]["checks"]
    assert MANIFEST_FILE in [f["path"] for f in report["layout"]["files"]]


# ------------------------------------------------------------------------------ exported folders


@pytest.mark.parametrize("fmt", ["hf", "ds"])
def test_damaged_model_folder_is_refused_by_generate_convert_init_from(
    capsys: pytest.CaptureFixture[str],
    tiny_data: Path,
    exported: dict[str, Path],
    tmp_path: Path,
    fmt: str,
) -> None:
    assert check_folder(exported[fmt]).verified and check_folder(exported[fmt]).damage is None
    folder = copy(exported[fmt], tmp_path / fmt)
    flip_one_byte(folder / "model.safetensors")
    pattern = rf"{re.escape(str(folder / 'model.safetensors'))} is corrupt: it does not match its checksum"
    conversion = "hf-to-deepsuite" if fmt == "hf" else "deepsuite-to-hf"
    fails(capsys, ["generate", "--checkpoint", str(folder), "--prompt", "x"], pattern)
    fails(capsys, ["convert", conversion, str(folder), str(tmp_path / "out")], pattern)
    fails(capsys, ["inspect", str(folder)], pattern)
    fresh = tmp_path / "fresh"
    fails(capsys, [*train_argv(tiny_data, fresh, **RUN), f"checkpoint.init_from={folder}"], pattern)
    assert not (tmp_path / "out").exists() and not any(fresh.glob("step_*"))
    # asked to, they read it anyway
    argv = ["generate", "--checkpoint", str(folder), "--prompt", "x", "--max-new-tokens", "2", "--no-verify"]
    assert main(argv) == 0
    assert main(["convert", conversion, str(folder), str(tmp_path / "out"), "--no-verify"]) == 0
