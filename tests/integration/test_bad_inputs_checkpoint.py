"""Bad checkpoints and failing writes through the CLI: an HF config.json holding Infinity or NaN, a
disk that fills up (or a folder that turns read-only) during a checkpoint save or an export, a named
pipe where a checkpoint file belongs. Each ends in one `error: …` line, a non-zero exit and nothing
left behind; and a rerun after SIGKILL removes the temporary folders the killed run left.

One small trained run (checkpoints at steps 2 and 4) and its exports are shared by the module and
copied per case; failures are injected into the real writers (torch.save, safetensors, os.mkdir,
os.replace, os.rename), raising what they raise on a full or read-only disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import fails, train_argv

from deepsuite.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run/`` (checkpoints step_2 and step_4 of 4), ``hf/`` and ``ds/`` (its exports)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(train_argv(tiny_data, root / "run", training__steps=4, training__sample_tokens=0)) == 0
    assert main(["convert", "zero-to-hf", str(root / "run"), str(root / "hf")]) == 0
    assert main(["consolidate", str(root / "run"), str(root / "ds"), "--format", "deepsuite"]) == 0
    return root


def copy_of(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c"
    shutil.copytree(trained, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of deepsuite's writers in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if re.search(r"(^tmp-|\.tmp|\.old-|\.trash-)", p.name))


# ------------------------------------------------------------------------- HF config.json numbers


@pytest.mark.parametrize(
    ("command", "key", "value"),
    [
        ("generate", "layer_norm_epsilon", "Infinity"),
        ("convert", "n_embd", "NaN"),  # was a traceback under inspect
        ("init_from", "resid_pdrop", "-Infinity"),
        ("inspect", "initializer_range", "1e999"),  # json reads it as infinity
    ],
)
def test_hf_config_with_a_non_finite_number_is_refused(
    capsys: pytest.CaptureFixture[str],
    tiny_data: Path,
    trained: Path,
    tmp_path: Path,
    command: str,
    key: str,
    value: str,
) -> None:
    """Python's json accepts Infinity and NaN; they used to reach the model (a run on inf weights,
    or a traceback)."""
    c = copy_of(trained, tmp_path)
    hf = c / "hf"
    (hf / "manifest.json").unlink()  # as an HF folder from elsewhere: nothing to verify against
    config = hf / "config.json"
    text, n = re.subn(rf'"{key}": [^,\n]+', f'"{key}": {value}', config.read_text())
    assert n == 1
    config.write_text(text)
    argv = {
        "generate": ["generate", "--checkpoint", str(hf), "--prompt", "x"],
        "convert": ["convert", "hf-to-deepsuite", str(hf), str(c / "out")],
        "init_from": train_argv(tiny_data, c / "new", checkpoint__init_from=hf),
        "inspect": ["inspect", str(hf)],
    }[command]
    shown = "Infinity" if value == "1e999" else value
    fails(capsys, argv, rf"{config}: {key} is {shown}, which JSON does not allow")
    assert not (c / "out").exists()
    assert not (c / "new").exists() or not any((c / "new").glob("*step_*"))


# ---------------------------------------------------------------------- OS errors while saving

_TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def fake_full_disk(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.statvfs`` of ``folder`` reports no free block, as after a write that filled the disk."""
    real = os.statvfs

    class Full:
        def __init__(self, st: Any) -> None:
            self.f_flag, self.f_frsize, self.f_bfree, self.f_bavail = st.f_flag, st.f_frsize, 0, 0

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)) if Path(p).is_relative_to(folder) else real(p))


def inject_save_failure(monkeypatch: pytest.MonkeyPatch, case: str, run: Path) -> None:
    """Make the save of step 6 fail at the point and with the error of ``case``."""
    import torch

    from deepsuite.checkpoint import manager

    real_save, real_mkdir, real_replace = torch.save, os.mkdir, os.replace

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)) and "tmp-step_6" in Path(f).parts:
            if case == "enospc":  # what torch's zip writer raises on a full disk
                fake_full_disk(monkeypatch, run)
                raise RuntimeError(_TORCH_WRITE_FAILED)
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(f))
        return real_save(obj, f, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "tmp-step_6":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(dst) == run / "latest":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    if case in ("enospc", "edquot"):  # inside DeepSpeed's save_checkpoint, before its last barrier
        monkeypatch.setattr(torch, "save", torch_save)
    elif case == "eacces" and os.geteuid() != 0:  # a folder that turned read-only (root ignores modes)
        fresh_tmp = manager._fresh_tmp

        def read_only_then(root: Path, tmp: Path) -> Any:
            os.chmod(root, 0o555)
            return fresh_tmp(root, tmp)

        monkeypatch.setattr(manager, "_fresh_tmp", read_only_then)
    elif case == "eacces":
        monkeypatch.setattr(os, "mkdir", mkdir)
    else:  # erofs: step_6 is renamed into place, `latest` cannot be replaced
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(
    ("case", "reason", "fix"),
    [
        ("enospc", "No space left on device", "free space or point checkpoint.dir elsewhere"),
        ("edquot", "Disk quota exceeded", "free space or point checkpoint.dir elsewhere"),
        ("eacces", "Permission denied", "make it writable or point checkpoint.dir elsewhere"),
        (
            "erofs",
            "Read-only file system",
            "remount it read-write or point checkpoint.dir elsewhere",
        ),
    ],
)
def test_os_error_during_a_checkpoint_save_ends_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_data: Path,
    trained: Path,
    tmp_path: Path,
    case: str,
    reason: str,
    fix: str,
) -> None:
    """A full disk used to end the run in a traceback, its tmp-step_N folder left behind."""
    run = copy_of(trained, tmp_path) / "run"
    before = snapshot(run / "step_4")
    inject_save_failure(monkeypatch, case, run)
    try:
        fails(
            capsys,
            train_argv(tiny_data, run, training__steps=6, training__sample_tokens=0),
            rf"^error: could not write checkpoint step_6 to {run}: {reason}; {re.escape(fix)}; "
            r"the previous checkpoint step_4 is intact$",
        )
    finally:
        os.chmod(run, 0o755)
    assert (run / "latest").read_text().strip() == "step_4"
    assert snapshot(run / "step_4") == before
    assert sorted(p.name for p in run.glob("step_*")) == ["step_2", "step_4"]
    assert leftovers(run) == []


@pytest.mark.parametrize("case", ["convert-enospc", "consolidate-eacces", "overwrite-erofs"])
def test_os_error_while_writing_an_export_ends_in_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    trained: Path,
    tmp_path: Path,
    case: str,
) -> None:
    """`convert`, `consolidate` and the exports into a destination: the temporary folder removed, an
    existing destination left as it was."""
    import tempfile

    from safetensors import SafetensorError

    from deepsuite.checkpoint import hf_io

    c = copy_of(trained, tmp_path)
    dst = c / "out"
    if case == "convert-enospc":  # safetensors' own words for a full disk

        def save_file(*args: Any, **kwargs: Any) -> None:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(hf_io, "save_file", save_file)
        argv = ["convert", "zero-to-hf", str(c / "run"), str(dst)]
        expect = "No space left on device; free space or write it elsewhere"
    elif case == "consolidate-eacces":
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(*args: Any, **kwargs: Any) -> str:
            if Path(kwargs.get("dir") or "") == c:  # as os.mkdir names it in a read-only folder
                name = c / f"{kwargs.get('prefix', '')}abcd1234"
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
            return real_mkdtemp(*args, **kwargs)

        if os.geteuid() != 0:
            os.chmod(c, 0o555)
        else:
            monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        argv = ["consolidate", str(c / "run"), str(dst), "--format", "deepsuite"]
        expect = "Permission denied; make it writable or write it elsewhere"
    else:  # the new folder cannot take the old one's place: the old one is put back
        shutil.copytree(c / "hf", dst)
        real_rename = os.rename

        def rename(src: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(target) == dst and ".tmp-" in Path(src).name:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), None, str(target))
            return real_rename(src, target, *args, **kwargs)

        monkeypatch.setattr(os, "rename", rename)
        argv = ["convert", "zero-to-hf", str(c / "run"), str(dst), "--overwrite"]
        expect = "Read-only file system; remount it read-write or write it elsewhere"
    before = snapshot(dst) if dst.exists() else None
    try:
        fails(
            capsys, argv, rf"^error: could not write {dst}: {re.escape(expect)} \({dst} was left as it was\)$"
        )
    finally:
        os.chmod(c, 0o755)
    assert (snapshot(dst) if dst.exists() else None) == before
    assert leftovers(c) == []


# --------------------------------------------------------------------------------- special files


@pytest.mark.timeout(120)  # opening a named pipe would block: fail instead of hanging the suite
@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("run/latest", "inspect"),
        ("run/step_4/state.json", "resume"),
        ("run/step_4/deepspeed/mp_rank_00_model_states.pt", "resume-unverified"),
        ("run/step_4/rng/rank_00000.json", "inspect-unverified"),
        ("hf/model.safetensors", "generate"),  # an HF folder without manifest: nothing checks it first
        ("hf/config.json", "convert"),
        ("ds/model.yaml", "inspect"),
        ("ds/tokenizer.model", "convert-unverified"),
    ],
)
def test_named_pipe_where_a_checkpoint_file_belongs_is_refused_unopened(
    capsys: pytest.CaptureFixture[str],
    tiny_data: Path,
    trained: Path,
    tmp_path: Path,
    name: str,
    command: str,
) -> None:
    """`inspect` and `--resume` used to hang on it (or took the next checkpoint without a word)."""
    c = copy_of(trained, tmp_path)
    (c / "hf" / "manifest.json").unlink()
    (c / name).unlink()
    os.mkfifo(c / name)
    folder = c / name.split("/")[0]
    unverified = ["--no-verify"] if command.endswith("-unverified") else []
    argv = {
        "inspect": ["inspect", str(folder), *unverified],
        "resume": [*train_argv(tiny_data, folder, training__steps=6), "--resume"],
        "generate": ["generate", "--checkpoint", str(folder), "--prompt", "x"],
        "convert": ["convert", "hf-to-deepsuite" if folder.name == "hf" else "deepsuite-to-hf", str(folder)],
    }[command.removesuffix("-unverified")]
    if command.startswith("resume") and unverified:
        argv = [*argv[:-1], "checkpoint.verify=false", "--resume"]
    if argv[0] == "convert":
        argv += [str(c / "out"), *unverified]
    fails(capsys, argv, rf"{c / name} is a named pipe, not a regular file")
    assert not (c / "out").exists() and not (c / "run" / "step_6").exists()


# -------------------------------------------------------------------------------- clean reruns

_PAUSE_IN_EXPORT = """
import sys, time
from deepsuite.checkpoint import hf_io
from deepsuite.cli import main
write = hf_io.write_safetensors
def paused(*args, **kwargs):
    out = write(*args, **kwargs)
    print("PAUSED", flush=True)
    time.sleep(3600)
hf_io.write_safetensors = paused
raise SystemExit(main(sys.argv[1:]))
"""


def test_rerun_after_sigkill_removes_the_killed_convert_runs_temporary_folder(
    capsys: pytest.CaptureFixture[str], trained: Path, tmp_path: Path
) -> None:
    """The killed run's `.out.tmp-…` folder (the size of the model) used to stay forever."""
    c = copy_of(trained, tmp_path)
    argv = ["convert", "zero-to-hf", str(c / "run"), str(c / "out")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_IN_EXPORT, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "PAUSED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (left,) = c.glob(".out.tmp-*")  # the weights are in it; the killed run had no chance to clean up
    assert (left / "model.safetensors").is_file() and not (c / "out").exists()
    # a folder of a run still alive and a user's folder of a similar name stay
    _, host, _, _ = left.name.split("-")
    alive = c / f".out.tmp-{host}-{os.getppid()}-abcd1234"
    users = c / ".out.tmp-keep"
    alive.mkdir()
    users.mkdir()
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out.splitlines()
    assert f"removed 1 leftover temporary folder of an interrupted run: {left}" in said
    assert not left.exists() and alive.is_dir() and users.is_dir()
    assert (c / "out" / "model.safetensors").is_file()


def test_train_removes_the_tmp_step_folders_of_a_killed_save(
    capsys: pytest.CaptureFixture[str], tiny_data: Path, trained: Path, tmp_path: Path
) -> None:
    """At start-up, when no other live process writes in checkpoint.dir (the kill-safety tests kill
    real saves; here the folder a killed save of step 8 leaves)."""
    c = copy_of(trained, tmp_path)
    argv = train_argv(tiny_data, c / "run", training__steps=6, training__sample_tokens=0)

    def leave_killed_save(run: Path) -> Path:
        (run / "tmp-step_8" / "deepspeed").mkdir(parents=True)
        (run / "tmp-step_8" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"half")
        (run / "tmp-step_keep").mkdir()  # a user's folder: not a save's name
        return run / "tmp-step_8"

    # another live process writes there (it holds the folder's lock): its folders are not touched
    shared = c / "shared"
    shutil.copytree(c / "run", shared)
    left = leave_killed_save(shared)
    fd = os.open(shared, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        capsys.readouterr()
        assert main(train_argv(tiny_data, shared, training__steps=6, training__sample_tokens=0)) == 0
        assert "leftover" not in capsys.readouterr().out and left.is_dir()
    finally:
        os.close(fd)

    left = leave_killed_save(c / "run")
    capsys.readouterr()
    assert main(argv) == 0
    assert f"removed 1 leftover temporary folder of an interrupted run: {left}" in capsys.readouterr().out
    assert not left.exists() and (c / "run" / "tmp-step_keep").is_dir()
    assert (c / "run" / "latest").read_text().strip() == "step_6"
