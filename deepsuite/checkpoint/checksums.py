"""Checksums of every file of a training checkpoint or model folder, listed in its ``manifest.json``.

Writers hash each file right after writing it (it is still in the page cache) and list it with its
size and xxh3-64 digest (xxhash: several GB/s per core, a dependency of ``datasets`` and so always
installed). The manifest records the digest of its own canonical content (``manifest_xxh3_64``), so a
changed byte in any listed file or in the manifest itself is found. Readers call `check_folder`
before they trust a folder; a folder without a manifest (written by an older deepsuite, or an HF
folder from elsewhere) is reported as unverified, not as damaged.

Layout of ``manifest.json``::

    {"format": 1, "algorithm": "xxh3_64",
     "files": {"deepspeed/mp_rank_00_model_states.pt": {"bytes": 1234, "xxh3_64": "9f…"}, …},
     "manifest_xxh3_64": "…"}
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from deepsuite.checkpoint.atomic import write_durable
from deepsuite.parallel.dist import global_rank

MANIFEST_FILE = "manifest.json"
ALGORITHM = "xxh3_64"
MANIFEST_FORMAT = 1
_SELF_KEY = f"manifest_{ALGORITHM}"
_CHUNK = 1024 * 1024  # stays in the CPU caches between the read and the hash: faster than 8 MiB

Entry = dict[str, Any]
"""One file of a manifest: ``{"bytes": size, "xxh3_64": hex digest}``."""


def hash_file(path: str | os.PathLike[str], *, mapped: bool = False) -> Entry:
    """Size and digest of the regular file at ``path``, read in chunks.

    ``mapped``: hash a memory map of the file instead, twice as fast when it is in the page cache
    (no copy); only for files this process just wrote, because a file truncated by someone else while
    it is mapped kills the reader (SIGBUS) instead of raising."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if mapped and size > 0:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return {"bytes": len(m), ALGORITHM: xxhash.xxh3_64_hexdigest(m)}
        h = xxhash.xxh3_64()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        size = 0
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, ALGORITHM: h.hexdigest()}


def _canonical_digest(content: dict[str, Any]) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return str(xxhash.xxh3_64_hexdigest(text.encode("ascii")))


def hash_folder(folder: Path, hashed: dict[str, Entry] | None = None) -> dict[str, Entry]:
    """``{relative path: entry}`` of every regular file but the manifest under ``folder``, which this
    process has just written; files in ``hashed`` (hashed by the rank that wrote them) are taken from
    there while their size agrees."""
    hashed = hashed or {}
    out: dict[str, Entry] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        known = hashed.get(rel)
        if known is None or known["bytes"] != p.stat().st_size:
            known = hash_file(p, mapped=True)  # written by this save: in the page cache
        out[rel] = known
    return out


def write_manifest(folder: Path, files: dict[str, Entry]) -> None:
    """Write (and fsync) ``folder/manifest.json`` listing ``files``."""
    content: dict[str, Any] = {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, "files": files}
    content[_SELF_KEY] = _canonical_digest(content)
    write_durable(folder / MANIFEST_FILE, json.dumps(content, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Verdict:
    """What `check_folder` found: ``verified`` when a manifest was there and checked; ``file`` the
    first damaged file (relative path; None: every listed file is intact) and ``problem`` what is
    wrong with it, phrased to follow its name ("does not match its checksum in manifest.json")."""

    verified: bool
    file: str | None = None
    problem: str = ""

    @property
    def damage(self) -> str | None:
        """``"<file> <problem>"``, or None when nothing is damaged."""
        return None if self.file is None else f"{self.file} {self.problem}"


def _read_manifest(folder: Path) -> tuple[dict[str, Entry] | None, str | None]:
    """(the manifest's files, None), (None, what is wrong with the manifest), or (None, None) when
    there is none."""
    path = folder / MANIFEST_FILE
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None, None
    if not stat.S_ISREG(mode):
        return None, "is not a regular file"
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "is not valid JSON"
    if not isinstance(content, dict) or not isinstance(content.get("files"), dict):
        return None, "has no `files` mapping"
    recorded = content.pop(_SELF_KEY, None)
    if recorded != _canonical_digest(content):
        return None, "does not match its own checksum"
    if content.get("algorithm") != ALGORITHM or content.get("format") != MANIFEST_FORMAT:
        return None, (
            f"has format {content.get('format')!r} / algorithm {content.get('algorithm')!r}, which this "
            "deepsuite does not know; update deepsuite"
        )
    files: dict[str, Entry] = content["files"]
    for rel, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get(ALGORITHM), str)
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
        ):
            return None, f"has a bad entry for {rel!r}"
    return files, None


def check_folder(folder: str | os.PathLike[str]) -> Verdict:
    """Check every file ``folder/manifest.json`` lists: present, a regular file (never opened
    otherwise: a named pipe would block), of the recorded size and digest. Files the manifest does
    not list are not looked at."""
    folder = Path(folder)
    files, problem = _read_manifest(folder)
    if problem is not None:
        return Verdict(True, MANIFEST_FILE, problem)
    if files is None:
        return Verdict(False)
    for rel, entry in sorted(files.items()):
        path = folder / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return Verdict(True, rel, f"is missing ({MANIFEST_FILE} lists it)")
        if not stat.S_ISREG(st.st_mode):
            return Verdict(True, rel, "is not a regular file")
        if st.st_size != entry["bytes"]:
            return Verdict(True, rel, f"has {st.st_size} bytes, {MANIFEST_FILE} says {entry['bytes']}")
        if hash_file(path)[ALGORITHM] != entry[ALGORITHM]:
            return Verdict(
                True, rel, f"does not match its checksum in {MANIFEST_FILE} (changed since it was written)"
            )
    return Verdict(True)


def warn_unverified(folder: str | os.PathLike[str]) -> None:
    """One ``warning:`` line on stderr (rank 0 only) for a folder that has no checksums."""
    if global_rank() == 0:
        print(
            f"warning: {folder} has no checksums (written by an older deepsuite); not verified",
            file=sys.stderr,
            flush=True,
        )
