"""Writing directories safely: atomically, and never over files mmkit did not write.

``atomic_dir(target)`` yields a temporary sibling directory; when the block completes, its contents
are fsynced and the directory is renamed to ``target``, so a kill mid-save leaves the previous
version intact. An existing non-empty ``target`` is replaced only if it is a directory that mmkit
wrote (``ours``) and the caller asked for it (``overwrite``); the old one is removed only once the
new one is complete. Anything else -- a home or project folder -- raises :class:`DirectoryNotEmpty`
naming what is there, and nothing is touched; nothing outside ``target`` is ever removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


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


def shard_files(index: str | Path) -> list[str]:
    """The shard file names of a ``*.index.json`` weight map, each a plain name inside the index's directory (an
    index pointing elsewhere -- ``../x``, an absolute path -- is refused, never followed)."""
    index = Path(index)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError(f"{index}: no weight_map object")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CorruptFileError(f"{index}: shard {name!r} is not a file name inside {index.parent}")
    return names


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


def _shown(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check_writable_dir(target: str | Path, ours: Callable[[Path], bool] | None = None, overwrite: bool = False) -> None:
    """Fail, before any work and changing nothing, unless ``target`` is absent, an empty directory, or -- with
    ``overwrite`` -- a directory that ``ours(target)`` recognises as one mmkit wrote (a previous save)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise DirectoryNotEmpty(f"{target}: exists and is not a directory; choose a new or empty directory")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if not entries:
        return
    if ours is None or not ours(target):
        raise DirectoryNotEmpty(f"{target}: directory holds files mmkit did not write ({_shown(entries)}); nothing "
                                "was changed: choose a new or empty directory")
    if not overwrite:
        raise DirectoryNotEmpty(f"{target}: already holds a save; nothing was changed: pass overwrite=True "
                                "(--overwrite on the command line) to replace it")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_dir(target: str | Path, ours: Callable[[Path], bool] | None = None, overwrite: bool = False):
    """Yield a temporary directory that replaces ``target`` only once the block completes (see module doc).
    ``ours(path)`` tells a directory this kind of save wrote; only such a one is replaced, and only with
    ``overwrite`` (see :func:`check_writable_dir`)."""
    target = Path(target)
    check_writable_dir(target, ours, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; the result gets the user's usual mode
        fsync_tree(tmp)
        if target.exists():
            check_writable_dir(target, ours, overwrite)  # again: it may have changed while we wrote
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
           "reading_weights", "shard_files"]
