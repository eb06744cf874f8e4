"""File-system guards for what the data commands read and build.

Special files (a named pipe, a socket, a device) are refused from `stat` alone: opening a named pipe
blocks until someone writes to it. Temporary build folders are named after their destination and
the run that owns them (``.<dest>.tmp-<host>-<pid>-<random>``), so that a later run for the same
destination can tell the leftovers of a killed run (owner gone) from a folder still being built and
from a user's own folders.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import uuid
from pathlib import Path

from deepsuite.data.errors import DataError

_KINDS = ("tmp", "old")
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file of `st_mode` `mode` is, in words (``"a named pipe"``, ...)."""
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike[str], what: str, fix: str) -> Path | None:
    """``path`` when it is a regular file (symlinks followed), None when it does not exist; a
    `DataError` naming `what` it should be and `fix` when it is anything else. Never opens it."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"{what} {p} cannot be read ({exc.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{what} {p} is {file_kind(mode)}, not a regular file; {fix}")
    return p


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _host() -> str:
    # a folder name part: the host keeps runs on other machines sharing the file system apart
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{_host()}-{os.getpid()}-"


def make_temp_dir(dest: str | os.PathLike[str]) -> Path:
    """A new empty folder beside `dest` to build it in, named for `dest` and this process."""
    out = Path(dest)
    return Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))


def old_name(dest: str | os.PathLike[str]) -> Path:
    """An unused path beside `dest` to move the previous `dest` to while the new one takes its place."""
    out = Path(dest)
    return out.parent / f"{_prefix(out, 'old')}{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def leftover_temp_dirs(dest: str | os.PathLike[str]) -> list[Path]:
    """Temporary folders beside `dest` that `make_temp_dir(dest)` made in a process of this host
    that has ended (killed before it could clean up), oldest name first."""
    out = Path(dest)
    pattern = re.compile(
        rf"\.{re.escape(out.name)}\.({'|'.join(_KINDS)})-([A-Za-z0-9._]+)-(\d+)-[A-Za-z0-9_]+"
    )
    host = _host()
    found = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing of ours to clear
        return []
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or m.group(2) != host or int(m.group(3)) == os.getpid():
            continue
        if p.is_symlink() or not p.is_dir() or _pid_alive(int(m.group(3))):
            continue
        found.append(p)
    return sorted(found)


def remove_leftover_temp_dirs(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove `leftover_temp_dirs(dest)`; return those removed."""
    removed = []
    for p in leftover_temp_dirs(dest):
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


def leftovers_message(removed: list[Path]) -> str:
    """The one line that says which leftovers were removed."""
    n = len(removed)
    names = ", ".join(str(p) for p in removed)
    return f"removed {n} leftover temporary folder{'s' if n != 1 else ''} of an interrupted run: {names}"
