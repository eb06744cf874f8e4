"""File-system ground rules of everything deepsuite writes and reads as a checkpoint.

* Durable writes: a file or rename is only on disk once it and its folder are fsynced; training
  checkpoints, HF and deepsuite model folders go through these helpers, so a crash never leaves a
  half-written file or folder under a final name (`atomic_dir`).
* Clean reruns: `atomic_dir` builds in ``.<target>.tmp-<host>-<pid>-<random>`` (named by
  `deepsuite.data.files`) and removes such folders that a killed run of this host left for the same
  target; each training run holds a lock on its checkpoint.dir while it lives, so that the next run
  removes the ``tmp-step_N`` folders of a killed save only when no live run writes there
  (`remove_interrupted_saves`).
* Write failures: a full disk, a missing permission or a read-only file system reach us as
  ``OSError`` from Python, but as ``RuntimeError`` from ``torch.save`` (its zip writer drops the
  errno) and as ``SafetensorError`` from safetensors; `write_failure` recovers the OS error, so
  that the callers can end in one line naming the cause and the fix.
* Special files: a named pipe where a checkpoint file belongs would block the reader that opens it;
  `checkpoint_file` refuses it from ``stat`` alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deepsuite.data.files import (
    leftovers_message,
    make_temp_dir,
    old_name,
    regular_file,
    remove_leftover_temp_dirs,
)

# ------------------------------------------------------------------------------------ durability


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


# --------------------------------------------------------------------------------- special files


def checkpoint_file(path: str | os.PathLike[str]) -> Path | None:
    """``path`` when it is a regular file (symlinks followed), None when it does not exist; anything
    else (a named pipe, a socket, a device, a folder) raises `DataError` naming it, without opening
    it: reading a named pipe would block until someone writes to it."""
    if not os.path.exists(path):  # as Path.is_file: a path through a file, or unreadable, holds none
        return None
    return regular_file(
        path,
        "checkpoint file",
        "a checkpoint or model folder holds regular files only: put the real file back (or use another copy)",
    )


def refuse_special_files(folder: str | os.PathLike[str]) -> None:
    """`checkpoint_file` on everything under ``folder`` that is not a folder: a training checkpoint is
    read file by file (by its checks, DeepSpeed and the consolidation), so none may be special."""
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_dir():
            checkpoint_file(p)


# -------------------------------------------------------------------------------- write failures

_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # std::io::Error's Display (safetensors, tokenizers)
_STRERRORS = {os.strerror(code): code for code in _WRITE_ERRNOS}
_ALMOST_FULL_BYTES = 1 << 20


class CheckpointWriteError(OSError):
    """A folder could not be written (disk full, no permission, read-only file system); nothing of it
    was left behind. The message names the folder, the cause and the fix."""


def write_failure(exc: BaseException, folder: str | os.PathLike[str]) -> OSError | None:
    """The OS error that made a write into ``folder`` fail, or None when ``exc`` is not one (re-raise
    it then).

    An ``OSError`` counts when its errno says the disk is full (ENOSPC, EDQUOT, EFBIG), the writer
    lacks the permission (EACCES, EPERM) or the file system is read-only (EROFS). Writers in Rust put
    ``(os error N)`` in their message; ``torch.save``'s zip writer names the ``strerror`` when it
    cannot open the file and only ``unexpected pos …`` when a write fails midway: then the file
    system is asked (before anything is cleaned up) whether it is read-only, full or not writable.
    """
    if isinstance(exc, OSError):
        return exc if exc.errno in _WRITE_ERRNOS else None
    text = str(exc)
    if m := _RUST_OS_ERROR.search(text):
        code = int(m.group(1))
        return OSError(code, os.strerror(code)) if code in _WRITE_ERRNOS else None
    for strerror, code in _STRERRORS.items():
        if strerror in text:
            return OSError(code, strerror)
    if isinstance(exc, RuntimeError):
        return _file_system_refuses(Path(folder))
    return None


def _file_system_refuses(folder: Path) -> OSError | None:
    """Why the file system holding ``folder`` refuses writes right now, or None."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    if blocks * st.f_frsize < _ALMOST_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if not os.access(folder, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES))
    return None


def write_fix(err: OSError, elsewhere: str) -> str:
    """What to do about ``err`` in words, ending in ``elsewhere`` (e.g. "point checkpoint.dir
    elsewhere")."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space or {elsewhere}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"make it writable or {elsewhere}"
    if err.errno == errno.EROFS:
        return f"remount it read-write or {elsewhere}"
    if err.errno == errno.EFBIG:
        return f"{elsewhere}, on a file system that takes files this large"
    return elsewhere


def reason(err: OSError) -> str:
    """``err``'s cause in words (``No space left on device``)."""
    return err.strerror or (os.strerror(err.errno) if err.errno else str(err))


@contextlib.contextmanager
def deferred_write_failures(
    folder: str | os.PathLike[str], methods: list[tuple[Any, str]]
) -> Iterator[list[OSError]]:
    """While active, a write failure (`write_failure`) raised by one of ``methods`` (``(object,
    attribute name)``; missing ones are skipped) is appended to the yielded list and the call returns
    None instead of raising; any other exception passes.

    For writers that hold collectives after their writes (DeepSpeed's ``save_checkpoint`` ends in a
    barrier): a rank whose write failed still runs to the end with the other ranks, which then
    agree to stop instead of waiting for it forever.
    """
    failures: list[OSError] = []
    patched: list[tuple[Any, str, bool, Any]] = []

    def deferring(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except (OSError, RuntimeError) as exc:  # RuntimeError: torch.save's; narrowed below
                failure = write_failure(exc, folder)
                if failure is None:
                    raise
                failures.append(failure)
                return None

        return call

    for obj, name in methods:
        method = getattr(obj, name, None) if obj is not None else None
        if method is None:
            continue
        patched.append((obj, name, name in vars(obj), method))
        setattr(obj, name, deferring(method))
    try:
        yield failures
    finally:
        for obj, name, shadowed, method in reversed(patched):
            if shadowed:
                setattr(obj, name, method)
            else:
                delattr(obj, name)


# ---------------------------------------------------------------- training saves: tmp-step_N folders

_SAVE_TMP = re.compile(r"tmp-step_\d+")
_WRITERS: dict[str, int] = {}  # checkpoint.dir -> the descriptor this process holds its flock on


def claim_checkpoint_dir(root: str | os.PathLike[str]) -> bool:
    """Mark ``root`` as written by this process, until it ends, and tell whether no other live
    process writes there.

    Each writer holds a shared ``flock`` on the folder; the kernel drops it when the process dies, so
    a killed run holds nothing. The claim first tries for the lock alone (exclusive): that succeeds
    only when no other live process holds it. A file system without ``flock`` (some network mounts)
    cannot tell: True, as a checkpoint.dir has one writer.
    """
    key = os.path.realpath(root)
    previous = _WRITERS.pop(key, None)
    if previous is not None:  # an earlier run of this process: it is over once this one starts
        os.close(previous)
    fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    except OSError:  # no flock here
        os.close(fd)
        return True
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a claim of another starting run: an instant
    _WRITERS[key] = fd
    return alone


def remove_interrupted_saves(root: str | os.PathLike[str], *, keep_claim: bool = False) -> list[Path]:
    """Claim ``root`` for this process (`claim_checkpoint_dir`) and, when no other live process
    writes there, remove the ``tmp-step_N`` folders in it: saves that were killed. Returns those
    removed (say so with `leftovers_message`). With ``keep_claim``, a ``root`` this process holds
    already (its run cleaned up when it started) is left as it is."""
    if keep_claim and os.path.realpath(root) in _WRITERS:
        return []
    if not claim_checkpoint_dir(root):
        return []
    removed = []
    for p in sorted(Path(root).iterdir()):
        if _SAVE_TMP.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


# --------------------------------------------------------------------------------- atomic folders


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


def _concerns(exc: BaseException, target: Path, tmp: Path | None) -> bool:
    """Whether ``exc`` is about writing ``target``: an ``OSError`` names its file (the temporary
    folder or one in it, ``target`` itself or its old copy, or a folder on the way to it, being
    created); the writers that lose the errno name none and write nothing but the target."""
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if not filename:
        return True
    f = Path(os.fsdecode(filename))
    ours = f.parent == target.parent and f.name.startswith(f".{target.name}.")  # .<target>.tmp-/.old-
    return ours or (tmp is not None and f.is_relative_to(tmp)) or f == target or target.is_relative_to(f)


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str],
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target``.

    A non-empty existing ``target`` is replaced only with ``overwrite=True``; on any error the
    temporary folder is removed and ``target`` is left as it was. A write failure (disk full, no
    permission, read-only file system; see `write_failure`) raises `CheckpointWriteError` in one
    line. Before the rename the folder (and every folder in it) gets the mode a plain ``mkdir``
    would give it (``0o777 & ~umask``, not ``mkdtemp``'s 0700), every file in it the mode a plain
    ``open`` would (``0o666 & ~umask``: writers such as safetensors create 0600 files), and every
    file and folder is fsynced; the parent folder is fsynced after the rename.

    The temporary folder is ``.<target>.tmp-<host>-<pid>-<random>``; such folders that a killed
    earlier run left for the same ``target`` are removed first, and ``log`` says so.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        removed = remove_leftover_temp_dirs(target)
        if removed and log is not None:
            log(leftovers_message(removed))
        tmp = make_temp_dir(target)
        yield tmp
        _chmod_tree(tmp, _umask())
        sync_tree(tmp)
        if target.exists():
            old = old_name(target)
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
    except Exception as exc:  # narrowed right below: only a write failure becomes one line
        failure = write_failure(exc, tmp if tmp is not None else target.parent)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None or not _concerns(exc, target, tmp):
            raise
        raise CheckpointWriteError(
            f"could not write {target}: {reason(failure)}; {write_fix(failure, 'write it elsewhere')} "
            f"({target} was left as it was)"
        ) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
