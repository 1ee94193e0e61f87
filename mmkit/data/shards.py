"""WebDataset tar shards as a training source, read by global sample index (no streaming iterator).

A source of kind ``webdataset`` is a directory of ``*.tar`` shards (taken in name order), one ``.tar`` file, or a
brace pattern (``data/shard-{000000..000041}.tar``, expanded by ``braceexpand`` as webdataset does). Shards must
be uncompressed tar (a ``.tar.gz`` cannot be read at an offset).

A sample is, as in WebDataset, the consecutive tar members that share a key (the member's path up to the first
``.`` of its file name; ``webdataset.tariterators.base_plus_ext``): ``KEY.json`` holds the LLaVA record
(``id``, ``conversations``, optional ``image`` paths, optional ``data_source``), and its images are members
``KEY.jpg`` (one image) or ``KEY.0.jpg``, ``KEY.1.png``, ... (in ``<image>`` order; any of jpg, jpeg, png, webp,
gif, bmp, tif, tiff). A sample without image members takes its images from the record's ``image`` paths,
relative to the source's ``image_folder`` (default: the shards' directory).

Random access: each shard has an index of where each sample's first tar header starts (``numpy`` ``int64``) and
how many tar entries it spans. Reading sample ``i`` = find its shard (a binary search over the shards' first
sample numbers), seek to the offset, read those entries with ``tarfile``. So the order of training is whatever
:class:`mmkit.data.sampler.StepBatchSampler` says, and a resumed run reads exactly the samples not yet consumed.
``python -m mmkit.data.convert`` writes the index next to each shard (``SHARD.tar.idx.npz``: offsets, entry
counts, and the word and image counts of each record for ``group_by_modality_length``); for shards without one
(or whose size changed since) the index is built when the source is opened by reading the tar headers only, and
the word counts are read from the records on first use of ``lengths``. A process that was forked (a DataLoader
worker) opens its own file handles (at most 32 shards open at a time).

Validation: as for Arrow sources (:mod:`mmkit.data.arrow`), a sample is checked when it is loaded, with the
rules and messages of LLaVA JSON records, and a bad one is dropped by the collator and counted.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from mmkit.data.records import IMAGE_LENGTH, DataError, RecordSource, _images_of, _word_count

__all__ = ["ShardDataset", "shard_files", "scan_shard", "write_index", "read_index", "INDEX_SUFFIX", "IMAGE_EXT"]

INDEX_SUFFIX = ".idx.npz"
IMAGE_EXT = re.compile(r"(?:(\d+)\.)?(jpg|jpeg|png|webp|gif|bmp|tif|tiff)")
MAX_OPEN = 32


def shard_files(path: str | os.PathLike) -> list[str]:
    """The shards of a source: a directory's ``*.tar`` (sorted), a ``.tar`` file, or a brace pattern."""
    s = str(path)
    if "{" in s and ".." in s:
        files = list(braceexpand(s))
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise DataError(missing[0], None, "no_file", f"shard of {s} ({len(missing)} of {len(files)} missing)")
        return files
    p = Path(s)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.tar"))
        if not files:
            raise DataError(s, None, "no_file", "no *.tar shard in the directory")
        return files
    if p.is_file():
        return [s]
    raise DataError(s, None, "no_file")


def scan_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, entries)`` of a shard's samples from its tar headers: the byte offset of each sample's first
    header and the number of tar entries from there to its last member."""
    offsets, entries = [], []
    prev, start, last = None, 0, 0
    try:
        with tarfile.open(path, "r:") as tf:
            for n, m in enumerate(tf):
                if not m.isfile():
                    continue
                key, _ = base_plus_ext(m.name)
                if key is None:
                    continue
                if key != prev:
                    if prev is not None:
                        entries.append(last - start + 1)
                    offsets.append(m.offset)
                    prev, start = key, n
                last = n
                tf.members.clear()  # tarfile keeps every TarInfo it has read; the index needs none of them
    except tarfile.ReadError as e:
        raise DataError(str(path), None, "no_file", f"not an uncompressed tar file: {e}") from e
    if prev is not None:
        entries.append(last - start + 1)
    return np.asarray(offsets, dtype=np.int64), np.asarray(entries, dtype=np.int32)


def write_index(shard: str | os.PathLike, offsets, entries, words, images) -> Path:
    """Write ``SHARD.tar.idx.npz`` (see the module docstring)."""
    out = Path(str(shard) + INDEX_SUFFIX)
    with open(out, "wb") as f:
        np.savez(f, offsets=np.asarray(offsets, np.int64), entries=np.asarray(entries, np.int32),
                 words=np.asarray(words, np.int64), images=np.asarray(images, np.int64),
                 shard_size=np.asarray(os.path.getsize(shard), np.int64))
    return out


def read_index(shard: str | os.PathLike, lengths: bool = True) -> dict | None:
    """The shard's index file as arrays (without ``words`` / ``images`` unless ``lengths``), or None when there is
    none or it is stale (the shard's size changed)."""
    p = Path(str(shard) + INDEX_SUFFIX)
    if not p.is_file():
        return None
    keys = ("offsets", "entries", "shard_size") + (("words", "images") if lengths else ())
    with np.load(p) as z:
        idx = {k: z[k] for k in keys}
    if int(idx.get("shard_size", -1)) != os.path.getsize(shard):
        return None
    return idx


class ShardDataset(RecordSource):
    """WebDataset shards (see the module docstring); items as :class:`mmkit.data.records.LlavaDataset`'s."""

    kind = "webdataset"

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None, processor, template=None,
                 max_length: int | None = None, strict: bool = False, max_warnings: int = 20, image_limits=None):
        self.shards = shard_files(path)
        folder = image_folder if image_folder is not None else Path(self.shards[0]).parent
        self._setup(path, folder, processor, template, max_length, strict, max_warnings, image_limits)
        offsets, entries, counts = [], [], []
        self._indexed: list[bool] = []  # per shard: has an index file (word and image counts known)
        for shard in self.shards:
            idx = read_index(shard, lengths=False)
            if idx is None:
                idx = dict(zip(("offsets", "entries"), scan_shard(shard)))
            self._indexed.append("shard_size" in idx)
            offsets.append(idx["offsets"])
            entries.append(idx["entries"])
            counts.append(len(idx["offsets"]))
        self._offsets = np.concatenate(offsets)
        self._entries = np.concatenate(entries)
        self._words: np.ndarray | None = None  # loaded on first use of the lengths
        self._images: np.ndarray | None = None
        self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # first sample of each shard
        self._n = int(sum(counts))
        self.num_seen = self._n
        self._files: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def __getstate__(self):  # file handles do not cross processes (spawned workers reopen them)
        return {**self.__dict__, "_files": OrderedDict()}

    def _file(self, s: int):
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.pop(s, None)
        if f is None:
            f = open(self.shards[s], "rb")
            while len(self._files) >= MAX_OPEN:
                self._files.popitem(last=False)[1].close()
        self._files[s] = f
        return f

    def members(self, i: int) -> tuple[str, str, dict[str, bytes]]:
        """``(where, key, {extension: bytes})`` of sample ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} outside 0..{self._n - 1}")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        f = self._file(s)
        f.seek(int(self._offsets[i]))
        tf = tarfile.open(fileobj=f, mode="r:")  # reads from the current offset
        out, key = {}, None
        for _ in range(int(self._entries[i])):
            m = tf.next()
            if m is None:
                break
            if m.isfile():
                key, ext = base_plus_ext(m.name)
                out[ext] = tf.extractfile(m).read()
        return f"{self.shards[s]}:{key}", str(key), out

    def __getitem__(self, i: int):
        i = int(i)
        where, key, parts = self.members(i)
        try:
            rec = json.loads(parts["json"])
        except KeyError:
            return self._fail(i, where, key, "structure", "no .json member")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._fail(i, where, key, "malformed_json", str(e))
        rid = str(rec["id"]) if isinstance(rec, dict) and rec.get("id") is not None else key
        if not isinstance(rec, dict):
            return self._fail(i, where, rid, "structure", f"expected an object, got {type(rec).__name__}")
        found = []
        for ext, data in parts.items():
            m = IMAGE_EXT.fullmatch(ext.lower())
            if m:
                found.append((int(m[1] or 0), data))
        if found:
            refs = [data for _, data in sorted(found, key=lambda t: t[0])]
            check = dict(rec, image=[f"embedded-{k}" for k in range(len(refs))])
        else:
            refs = _images_of(rec)
            check = rec
        return self._checked_sample(i, where, rid, check, refs)

    def _compute_lengths(self) -> None:
        if self._words is not None:
            return
        words, images = [], []
        for s, shard in enumerate(self.shards):
            n = (self._first[s + 1] if s + 1 < len(self.shards) else self._n) - self._first[s]
            idx = read_index(shard) if self._indexed[s] else None
            words.append(idx["words"] if idx is not None else np.full(n, -1, np.int64))
            images.append(idx["images"] if idx is not None else np.full(n, -1, np.int64))
        self._words, self._images = np.concatenate(words), np.concatenate(images)
        unknown = np.flatnonzero(self._words < 0)
        for i in unknown:  # shards without an index file: read each record once
            _, _, parts = self.members(int(i))
            try:
                rec = json.loads(parts["json"])
                words = _word_count(rec["conversations"])
                n_img = sum(1 for ext in parts if IMAGE_EXT.fullmatch(ext.lower())) or len(_images_of(rec) or [])
            except (KeyError, TypeError, ValueError, AttributeError):  # a bad record: dropped when loaded
                words, n_img = 1, 0
            self._words[i] = words
            self._images[i] = n_img

    @property
    def lengths(self) -> np.ndarray:
        self._compute_lengths()
        return self._words + IMAGE_LENGTH * self._images

    @property
    def modality_lengths(self) -> np.ndarray:
        self._compute_lengths()
        words = np.maximum(self._words, 1)  # a bad record may have none; the sampler needs a sign
        return np.where(self._images > 0, words, -words)
