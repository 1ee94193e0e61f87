"""Writing directories safely: atomically, and never over files mmkit did not write.

``atomic_dir(target)`` yields a temporary sibling directory; when the block completes, its contents
are fsynced and the directory is renamed to ``target``, so a kill mid-save leaves the previous
version intact. An existing ``target`` is replaced only when nothing would be lost: it is empty, or
every entry in it is one the new save writes too (a previous save of the same kind). Anything else --
a home or project folder, a checkpoint beside the user's notes -- raises :class:`DirectoryNotEmpty`
naming the files, and nothing is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class DirectoryNotEmpty(FileExistsError):
    """The target directory holds files the save would not rewrite; nothing was changed."""


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be; the message names the file."""


def read_json(path: str | Path, kind: type = dict):
    """The JSON in ``path``, which must be a ``kind`` (a JSON object by default); errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, kind):
        want = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise CorruptFileError(f"{path}: expected {want}, got {type(data).__name__}")
    return data


@contextmanager
def reading_weights(path: str | Path):
    """Re-raise safetensors' error for a truncated or corrupt weight file as one that names the file."""
    try:
        yield
    except Exception as exc:  # safetensors raises its own SafetensorError (a plain Exception subclass)
        if type(exc).__name__ != "SafetensorError":
            raise
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc}); it may be truncated") from None


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _foreign_entries(target: Path, written: Path) -> list[str]:
    """Entries of ``target`` that the new save in ``written`` does not replace."""
    new = {p.name for p in written.iterdir()}
    return sorted(p.name for p in target.iterdir() if p.name not in new)


def _refuse(target: Path, foreign: list[str]) -> DirectoryNotEmpty:
    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    return DirectoryNotEmpty(f"{target}: directory already holds files this save would not rewrite ({shown}); "
                             "nothing was changed: choose a new or empty directory, or remove them first")


def check_writable_dir(target: str | Path, marker: str | None = None) -> None:
    """Fail before any work when ``target`` is a file, or a non-empty directory without ``marker`` (the file
    every save of this kind writes, so its absence means the directory is not a previous save)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise DirectoryNotEmpty(f"{target}: exists and is not a directory; choose a new or empty directory")
    if marker and target.is_dir() and not (target / marker).exists():
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            raise _refuse(target, entries)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_dir(target: str | Path, marker: str | None = None):
    """Yield a temporary directory that replaces ``target`` only once the block completes (see module doc).
    ``marker``: a file every save of this kind writes; a non-empty ``target`` without it is refused at once."""
    target = Path(target)
    check_writable_dir(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; the result gets the user's usual mode
        fsync_tree(tmp)
        if target.exists():
            foreign = _foreign_entries(target, tmp)
            if foreign:
                raise _refuse(target, foreign)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["CorruptFileError", "DirectoryNotEmpty", "atomic_dir", "check_writable_dir", "fsync_tree", "read_json",
           "reading_weights"]
