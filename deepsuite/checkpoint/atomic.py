"""Durable writes: fsync of files and folders, a durable text write, and folders that appear whole.

A file or rename is only on disk once it and its folder are fsynced; everything deepsuite writes
(training checkpoints, HF and deepsuite model folders) goes through these helpers, so a crash never
leaves a half-written file or folder under a final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries: makes creations and renames in it durable); a no-op where the
    platform cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    path.write_text(text, encoding="utf-8")
    fsync_file(path)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, then ``folder`` itself."""
    for p in sorted(folder.rglob("*"), reverse=True):  # children before their folders
        if p.is_symlink():
            continue
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def _chmod_tree(folder: Path, umask: int) -> None:
    """Give ``folder``, the folders and the files under it the modes ``mkdir``/``open`` give under ``umask``."""
    for p in folder.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~umask)
        elif p.is_file():
            os.chmod(p, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target``.

    A non-empty existing ``target`` is replaced only with ``overwrite=True``; on any error the
    temporary folder is removed and ``target`` is left as it was. Before the rename the folder (and
    every folder in it) gets the mode a plain ``mkdir`` would give it (``0o777 & ~umask``, not
    ``mkdtemp``'s 0700), every file in it the mode a plain ``open`` would (``0o666 & ~umask``: writers
    such as safetensors create 0600 files), and every file and folder is fsynced; the parent folder
    is fsynced after the rename.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _chmod_tree(tmp, _umask())
        sync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)  # makes the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
