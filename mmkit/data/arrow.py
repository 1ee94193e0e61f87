"""Hugging Face ``datasets`` on local disk as a training source: memory-mapped Arrow, read by global row index.

A source of kind ``arrow`` is either a directory written by ``datasets.Dataset.save_to_disk`` (``state.json``,
``dataset_info.json``, ``data-*.arrow``; a ``DatasetDict`` directory gives its ``train`` split), or Parquet
files (one ``.parquet`` file, or a directory searched recursively for ``*.parquet``). Parquet is read through
``datasets.Dataset.from_parquet``, which converts it once into Arrow files in the ``datasets`` cache
(``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``) and memory-maps those; a
``save_to_disk`` directory is memory-mapped as it is. Either way no record is read into Python when the source is
indexed: the process maps the files and knows the row count.

Columns, as in the public LLaVA-OneVision data (``lmms-lab/LLaVA-OneVision-Data``): ``conversations`` (a list of
``{"from", "value"}`` turns, required), ``id`` (optional; else ``row N`` names the record), ``image``
(optional) and ``data_source`` (optional, not used for training). ``image`` may hold, per row, nothing (null:
text-only), a ``datasets.Image`` value (``{"bytes", "path"}``: the encoded bytes are used when present, else the
path), encoded bytes, a path string (relative to the source's ``image_folder``, default: the dataset
directory), or a list of any of these (several images, in ``<image>`` order).

A plain ``save_to_disk`` directory (a Dataset without an indices mapping, which is what ``save_to_disk`` and the
converter write) is memory-mapped with ``pyarrow`` directly, file by file, as ``datasets`` itself maps them; the
other cases go through ``datasets``.

Validation: a row is checked when it is loaded (in a DataLoader worker), by the same rules as a LLaVA JSON record
(:func:`mmkit.data.records.check_record`, then image decoding and tokenization); a bad row becomes a
:class:`mmkit.data.records.FailedSample` that the collator drops and counts (``phase="load"``) with the
record's reason and message. ``python -m mmkit.data.convert`` checks every record before it writes, so a
converted dataset has no bad row.

Lengths (``lengths`` / ``modality_lengths``, only needed for ``group_by_modality_length``) are computed on first
use in one pass over the ``conversations`` and ``image`` columns in chunks of 8192 rows, so memory stays at one
chunk plus 16 bytes a row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import json
import numpy as np
import pyarrow as pa

from mmkit.data.records import IMAGE_LENGTH, DataError, RecordSource, _word_count

__all__ = ["ArrowDataset", "open_arrow", "is_saved_dataset", "image_refs"]

SAVED_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
CHUNK = 8192


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS)


def parquet_files(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*.parquet"))


class _MappedTable:
    """The Arrow files of a plain ``save_to_disk`` Dataset directory, memory-mapped with pyarrow alone, as
    ``datasets`` maps them (``datasets.table.MemoryMappedTable``: ``pa.ipc.open_stream(pa.memory_map(f))``); the
    same interface as the few ``datasets.Dataset`` calls used here. It keeps ``datasets`` (~90 MB, ~1 s of imports)
    out of every training process for the common case."""

    def __init__(self, files: list[Path]):
        self.files = [str(f) for f in files]
        self._table: pa.Table | None = None

    @property
    def table(self) -> pa.Table:
        if self._table is None:  # opened lazily: a forked worker maps the files itself (never pickles a map)
            self._table = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in self.files])
        return self._table

    def __getstate__(self):
        return {"files": self.files, "_table": None}

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        return self.table.select(columns).slice(start, stop - start)


class _DatasetsTable:
    """A ``datasets.Dataset`` (Parquet, DatasetDict, or a saved dataset with an indices mapping) behind the same
    interface."""

    def __init__(self, ds):
        self.ds = ds
        self.column_names = ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        return self.ds.with_format("arrow", columns=columns)[start:stop]


def _plain_saved_files(p: Path) -> list[Path] | None:
    """The data files of a ``save_to_disk`` Dataset directory without an indices mapping, else None."""
    try:
        state = json.loads((p / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("_indices_data_files") or not state.get("_data_files"):
        return None
    files = [p / f["filename"] for f in state["_data_files"]]
    return files if all(f.is_file() for f in files) else None


def open_table(path: str | os.PathLike):
    """The rows of an Arrow source: memory-mapped with pyarrow for a plain ``save_to_disk`` directory, through
    ``datasets`` otherwise (see :func:`open_arrow`)."""
    files = _plain_saved_files(Path(path)) if is_saved_dataset(path) else None
    if files is not None:
        return _MappedTable(files)
    return _DatasetsTable(open_arrow(path))


def open_arrow(path: str | os.PathLike):
    """The memory-mapped ``datasets.Dataset`` of a ``save_to_disk`` directory or of Parquet files."""
    import datasets  # heavy (~1 s); only for Parquet, DatasetDicts and indices mappings

    p = Path(path)
    if is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(str(p), None, "no_file", f"a DatasetDict without a 'train' split "
                                                         f"(splits: {', '.join(ds)})")
            ds = ds["train"]
        return ds
    files = parquet_files(p)
    if not files:
        raise DataError(str(p), None, "no_file", "neither a save_to_disk directory nor Parquet files")
    return datasets.Dataset.from_parquet(files)


def image_refs(value: Any) -> list | None:
    """A row's ``image`` value as a list of paths (str) and encoded images (bytes); None if malformed."""
    if value is None:
        return []
    if isinstance(value, list):
        out: list = []
        for v in value:
            r = image_refs(v)
            if r is None or not r:
                return None
            out.extend(r)
        return out
    if isinstance(value, dict):  # datasets.Image: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return [value["bytes"]]
        if value.get("path"):
            return [str(value["path"])]
        return [] if all(v is None for v in value.values()) else None
    if isinstance(value, (bytes, bytearray)) and value:
        return [bytes(value)]
    if isinstance(value, str) and value:
        return [value]
    return None


def _image_counts(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Images per row of an ``image`` column, without reading the encoded bytes into Python."""
    import pyarrow.compute as pc  # ~8 MB of imports; only for group_by_modality_length

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return np.asarray(pc.fill_null(pc.list_value_length(col), 0), dtype=np.int64)
    return np.asarray(pc.is_valid(col), dtype=np.int64)


def _safe_words(conv: Any) -> int:
    try:
        return _word_count(conv)
    except (TypeError, AttributeError):  # a malformed row: dropped when loaded
        return 0


class ArrowDataset(RecordSource):
    """A ``datasets`` source (see the module docstring); items as :class:`mmkit.data.records.LlavaDataset`'s."""

    kind = "arrow"

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None, processor, template=None,
                 max_length: int | None = None, strict: bool = False, max_warnings: int = 20, image_limits=None):
        folder = image_folder if image_folder is not None else (path if Path(path).is_dir() else Path(path).parent)
        self._setup(path, folder, processor, template, max_length, strict, max_warnings, image_limits)
        self._table = open_table(path)
        cols = self._table.column_names
        if "conversations" not in cols:
            raise DataError(self.path, None, "structure", f"no 'conversations' column (columns: {', '.join(cols)})")
        self._columns = [c for c in ("id", "image", "conversations") if c in cols]
        self._n = len(self._table)
        self.num_seen = self._n
        self._lengths: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} outside 0..{self._n - 1}")
        row = self._table.rows(i, i + 1, self._columns).to_pylist()[0]  # Arrow until here: nothing decoded
        where = f"{self.path}[{i}]"
        rid = str(row["id"]) if row.get("id") is not None else f"row {i}"
        refs = image_refs(row.get("image"))
        names = [r if isinstance(r, str) else f"embedded-{k}" for k, r in enumerate(refs or [])]
        rec = {"conversations": row["conversations"], "image": names or None}
        return self._checked_sample(i, where, rid, rec, refs)

    def _compute_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lengths is None:
            words = np.zeros(self._n, dtype=np.int64)
            images = np.zeros(self._n, dtype=np.int64)
            for start in range(0, self._n, CHUNK):
                stop = min(start + CHUNK, self._n)
                convs = self._table.rows(start, stop, ["conversations"]).column("conversations").to_pylist()
                words[start:stop] = [_safe_words(c) for c in convs]
                if "image" in self._columns:
                    images[start:stop] = _image_counts(self._table.rows(start, stop, ["image"]).column("image"))
            self._lengths = (words, images)
        return self._lengths

    @property
    def lengths(self) -> np.ndarray:
        words, images = self._compute_lengths()
        return words + IMAGE_LENGTH * images

    @property
    def modality_lengths(self) -> np.ndarray:
        words, images = self._compute_lengths()
        words = np.maximum(words, 1)  # a bad row may have none; the sampler needs a sign
        return np.where(images > 0, words, -words)
