"""Training data: LLaVA JSON / JSONL records, Arrow and WebDataset shards, lazily loaded, bad records counted and
skipped; mixtures.

Source kinds (``data.sources[i].kind``; left out, it is told from the path by :func:`source_kind`):

* ``llava``: a LLaVA JSON / JSONL file and an image folder (below). Indexing parses the whole file and checks
  every record, in every training process: simple, and memory grows with the data.
* ``arrow``: Hugging Face ``datasets`` on local disk (a ``save_to_disk`` directory or Parquet files), memory-mapped,
  images embedded as encoded bytes or given as paths (:mod:`mmkit.data.arrow`).
* ``webdataset``: WebDataset tar shards, one sample = a JSON record + its images (:mod:`mmkit.data.shards`).

Every kind is read by global index (``dataset[i]``), so the training order is the sampler's alone -- a function of
(seed, epoch, world size) -- and a resumed run reads exactly the samples not yet consumed; mixtures, weights and
counts, ``group_by_modality_length``, packing and DataLoader workers work the same for all. Arrow and shard
sources index in memory that does not grow with the records' text (no record is read when they are opened) and
check each record when it is loaded instead (same rules and messages; a bad one is dropped by the collator and
counted); ``python -m mmkit.data.convert`` converts a LLaVA JSON dataset to either kind, checking every record
first.

Records, validation and skip accounting: :mod:`mmkit.data.records` (its names are importable from here
too).

Mixtures (:func:`build_dataset`): a ``DataConfig`` lists sources; each source contributes

* all its records once (neither ``weight`` nor ``count``),
* exactly ``count`` samples (``count < len``: a seeded subsample without repetition; ``count > len``: every
  record ``count // len`` times plus a seeded subsample for the remainder), or
* a ``weight``: a fraction of the mixture. If every source is weighted, the mixture has as many samples as all
  sources together, split in proportion to the weights; otherwise the weights (summing to < 1) are fractions of
  the whole and the weighted sources fill the rest next to the fixed ones:
  ``total = fixed / (1 - sum(weights))``. Sample counts are rounded by largest remainder, and which records are
  taken is drawn as for ``count`` with a generator seeded by ``seed``.

The selection is fixed for the run; the sampler shuffles it each epoch. The mixture's index and lengths are flat
``array.array`` of 8 bytes a sample, and the lengths are gathered on first use.

Registered data sources (:func:`resolve_source`): a ``path`` of the form ``NAME:ARG`` whose ``NAME`` is in
``mmkit.registry.data_sources`` (entry-point group ``mmkit.data_sources``) is handed to that resolver, which
returns the LLaVA JSON file and image folder to read -- generating them first into ``data_dir`` if it likes.
The demo's ``shapes:auto|stage1|stage2`` (:mod:`mmkit.demo.plugin`) is one. Every other path is a file as above;
an unregistered ``NAME:`` that is not an existing file is an error naming the registered sources.
"""

from __future__ import annotations

import array
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmkit.data.records import (  # noqa: F401  (re-exported: the names were defined here before)
    IGNORE_INDEX,
    IMAGE_LENGTH,
    REASONS,
    DataError,
    FailedSample,
    LlavaDataset,
    RecordSource,
    SkipCounter,
    _template_name,
    check_record,
    load_records,
    logger,
)
from mmkit.registry import UnknownNameError, data_sources

__all__ = [
    "DataError", "SkipCounter", "FailedSample", "load_records", "check_record", "LlavaDataset", "REASONS",
    "MixtureDataset", "build_dataset", "resolve_source", "SourceContext", "RecordSource", "open_source",
    "source_kind", "KINDS", "mixture_sizes", "IGNORE_INDEX", "IndexedDataset", "data_fingerprint",
]


# --------------------------------------------------------------------------------------------- mixtures


class MixtureDataset(Dataset):
    """Several sources (:class:`RecordSource`), each contributing a given number of samples (see the module
    docstring). ``index_source[k], index_local[k]`` = source and local index of sample ``k``; ``lengths`` /
    ``modality_lengths`` follow the index. All are flat ``array.array('q')`` (8 bytes a sample, not a Python
    int object each), and the lengths are gathered on first use only (``group_by_modality_length``)."""

    def __init__(self, datasets: Sequence[RecordSource], sizes: Sequence[int | None] | None = None, seed: int = 0):
        self.datasets = list(datasets)
        sizes = list(sizes) if sizes is not None else [None] * len(self.datasets)
        g = torch.Generator()
        g.manual_seed(int(seed))
        src, loc = [], []
        for s, (ds, n) in enumerate(zip(self.datasets, sizes)):
            take = _take(len(ds), n, g, getattr(ds, "path", f"source {s}"))
            src.append(np.full(len(take), s, dtype=np.int64))
            loc.append(take)
        src_all = np.concatenate(src) if src else np.zeros(0, np.int64)
        loc_all = np.concatenate(loc) if loc else np.zeros(0, np.int64)
        self.index_source = array.array("q", src_all.tobytes())
        self.index_local = array.array("q", loc_all.tobytes())
        self.sizes = np.bincount(src_all, minlength=len(self.datasets)).tolist()
        self._lengths: dict[str, array.array] = {}

    def _gathered(self, attr: str) -> array.array:
        if attr not in self._lengths:
            src = np.frombuffer(self.index_source, dtype=np.int64)
            loc = np.frombuffer(self.index_local, dtype=np.int64)
            out = np.zeros(len(src), dtype=np.int64)
            for s, ds in enumerate(self.datasets):
                sel = src == s
                if sel.any():
                    out[sel] = np.asarray(getattr(ds, attr), dtype=np.int64)[loc[sel]]
            self._lengths[attr] = array.array("q", out.tobytes())
        return self._lengths[attr]

    @property
    def lengths(self) -> array.array:
        return self._gathered("lengths")

    @property
    def modality_lengths(self) -> array.array:
        return self._gathered("modality_lengths")

    def __len__(self) -> int:
        return len(self.index_source)

    def __getitem__(self, k: int):
        return self.datasets[self.index_source[k]][self.index_local[k]]

    @property
    def skips(self) -> SkipCounter:
        """Records skipped when indexing, all sources merged."""
        out = SkipCounter()
        for ds in self.datasets:
            out.merge(ds.skips)
        return out

    def summary(self) -> str:
        lines = [f"{getattr(ds, 'path', s)}: {n} samples from {len(ds)} records"
                 for s, (ds, n) in enumerate(zip(self.datasets, self.sizes))]
        return "\n".join(lines + [self.skips.summary()])


def _take(available: int, n: int | None, g: torch.Generator, name: str) -> np.ndarray:
    """``n`` local indices of a source of ``available`` records (all once when ``n`` is None)."""
    if n is None:
        return np.arange(available, dtype=np.int64)
    if n > 0 and available == 0:
        raise DataError(name, None, "empty_source", f"{n} samples requested")
    reps, rem = divmod(n, available) if available else (0, 0)
    extra = np.sort(torch.randperm(available, generator=g)[:rem].numpy()).astype(np.int64) if rem else \
        np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(available, dtype=np.int64), reps), extra])


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    s = sum(weights)
    raw = [w / s * total for w in weights]
    out = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - out[k]), k))
    for k in order[: total - sum(out)]:
        out[k] += 1
    return out


def mixture_sizes(available: Sequence[int], weights: Sequence[float | None], counts: Sequence[int | None],
                  where: str = "data.sources") -> list[int | None]:
    """Samples per source from ``weight`` / ``count`` (None: all records once). See the module docstring."""
    sizes: list[int | None] = [None] * len(available)
    weighted = []
    for k, (n, w, c) in enumerate(zip(available, weights, counts)):
        if w is not None and c is not None:
            raise ValueError(f"{where}[{k}]: give weight or count, not both")
        if c is not None:
            if c < 0:
                raise ValueError(f"{where}[{k}].count: must be >= 0, got {c}")
            sizes[k] = int(c)
        elif w is not None:
            if not w > 0:
                raise ValueError(f"{where}[{k}].weight: must be > 0, got {w}")
            weighted.append(k)
    if not weighted:
        return sizes
    wsum = sum(float(weights[k]) for k in weighted)
    fixed = [k for k in range(len(available)) if k not in weighted]
    if not fixed:
        total_w = sum(available[k] for k in weighted)
    else:
        if wsum >= 1:
            raise ValueError(f"{where}: with unweighted sources the weights are fractions of the mixture and must "
                             f"sum to < 1, got {wsum:g}")
        n_fixed = sum(sizes[k] if sizes[k] is not None else available[k] for k in fixed)
        total_w = round(n_fixed * wsum / (1.0 - wsum))
    for k, n in zip(weighted, _largest_remainder([float(weights[k]) for k in weighted], total_w)):
        sizes[k] = n
    return sizes


# --------------------------------------------------------------------------------------------- sources


# `NAME:ARG` with NAME a registered data source; two characters at least, so a Windows drive (C:) stays a path
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9_.+-]+):(.*)", re.DOTALL)


@dataclass(frozen=True)
class SourceContext:
    """What the resolver of a registered data source gets besides ``ARG``: ``resolve(arg, ctx)``."""

    template: str | None  # name of the template the source is read with (e.g. "plain")
    data_dir: Path | None  # where generated data may be written (training: RUN_DIR/data); None = nowhere
    base_dir: Path  # what relative paths are relative to
    image_folder: str | None  # the source's own image_folder, if the recipe gives one
    plugins: Mapping[str, Any]  # the recipe's plugins: the options of each active plug-in, by name


def _under(path: str | os.PathLike, base_dir: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


KINDS = ("llava", "arrow", "webdataset")


def source_kind(path: str | os.PathLike, kind: str | None = None) -> str:
    """The kind of a (resolved) source path: ``kind`` when given, else told from the path -- a directory with
    ``state.json`` / ``dataset_info.json`` / ``dataset_dict.json`` (``save_to_disk``) or with ``*.parquet`` files
    anywhere under it, or a ``.parquet`` file: ``arrow``; a directory of ``*.tar``, a ``.tar`` file or a brace
    pattern (``{000..009}``): ``webdataset``; any other file: ``llava`` (JSON / JSONL)."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"{path}: unknown source kind {kind!r}; choices: {', '.join(KINDS)}")
        return kind
    s = str(path)
    p = Path(s)
    if "{" in p.name and ".." in p.name:
        return "webdataset"
    if p.is_dir():
        if any((p / m).is_file() for m in ("state.json", "dataset_info.json", "dataset_dict.json")):
            return "arrow"
        if next(p.glob("*.tar"), None) is not None:
            return "webdataset"
        if next(p.rglob("*.parquet"), None) is not None:
            return "arrow"
        raise DataError(s, None, "no_file", "a directory, but neither a datasets save_to_disk directory, Parquet "
                                            "files nor *.tar shards (set the source's kind: or point path at a "
                                            "LLaVA JSON file)")
    if p.suffix.lower() == ".parquet":
        return "arrow"
    if p.suffix.lower() == ".tar":
        return "webdataset"
    return "llava"


def resolve_source(path: str, image_folder: str | None, template=None, base_dir: str | os.PathLike = ".",
                   data_dir: str | os.PathLike | None = None, plugins: Mapping | None = None,
                   kind: str | None = None) -> tuple[str, str]:
    """``(data path, image folder)`` of a source. A ``NAME:ARG`` path whose ``NAME`` is in
    ``mmkit.registry.data_sources`` is resolved by that resolver (which may generate the data into ``data_dir``
    first); any other path is a LLaVA JSON/JSONL file, or (``kind`` or :func:`source_kind`) an Arrow / shard
    path. Relative paths are taken from ``base_dir``; the image folder defaults to the data file's directory (for
    a directory source: the directory)."""
    m = _SCHEME.fullmatch(path)
    if m and m[1] in data_sources:
        ctx = SourceContext(_template_name(template), None if data_dir is None else Path(data_dir), Path(base_dir),
                            image_folder, dict(plugins or {}))
        path, image_folder = data_sources.get(m[1])(m[2], ctx)
    elif m and not _under(path, base_dir).exists():
        try:
            data_sources.get(m[1])
        except UnknownNameError as exc:
            raise ValueError(f"{path}: {exc}") from None
    p = _under(path, base_dir)
    pattern = "{" in p.name and ".." in p.name
    if not (p.is_file() or (p.is_dir() and kind != "llava") or (pattern and kind in (None, "webdataset"))):
        raise DataError(str(p), None, "no_file")
    folder = (p if p.is_dir() else p.parent) if image_folder is None else _under(image_folder, base_dir)
    return str(p), str(folder)


def open_source(path: str, image_folder: str, processor, template=None, max_length: int | None = None,
                strict: bool = False, kind: str | None = None, image_limits=None, video=None) -> RecordSource:
    """The dataset of one resolved source, by kind (see :func:`source_kind`); ``image_limits``:
    ``data.image_limits`` (None: the defaults of :mod:`mmkit.processing.budget`); ``video``: ``data.video``
    (video records are read from JSON / JSONL sources)."""
    kind = source_kind(path, kind)
    common = {"max_length": max_length, "strict": strict, "image_limits": image_limits}
    if kind == "arrow":
        from mmkit.data.arrow import ArrowDataset  # datasets / pyarrow: heavy, and optional (mmkit[data])
        return ArrowDataset(path, image_folder, processor, template, **common)
    if kind == "webdataset":
        from mmkit.data.shards import ShardDataset  # webdataset: optional (mmkit[data])
        return ShardDataset(path, image_folder, processor, template, **common)
    return LlavaDataset(path, image_folder, processor, template, **common, video=video)


def build_dataset(data_cfg, processor, template=None, max_length: int | None = None,
                  base_dir: str | os.PathLike = ".", *, data_dir: str | os.PathLike | None = None,
                  plugins: Mapping | None = None, seed: int = 0) -> MixtureDataset:
    """The training dataset of a ``DataConfig`` (``sources``, ``strict``): one dataset per source (by kind:
    :func:`open_source`), combined by weight / count (see the module docstring). ``data_dir``: where registered
    data sources may generate data; ``plugins``: the recipe's ``plugins:`` (handed to them); ``seed``: the
    mixture's subsampling seed."""
    sources = list(getattr(data_cfg, "sources", None) or [])
    if not sources:
        raise ValueError("data.sources: no data source given")
    strict = bool(getattr(data_cfg, "strict", False))
    if template is None:
        template = getattr(processor, "template", None)
    datasets = []
    for k, src in enumerate(sources):
        kind = getattr(src, "kind", None)
        path, folder = resolve_source(src.path, src.image_folder, template, base_dir, data_dir, plugins, kind)
        ds = open_source(path, folder, processor, template, max_length=max_length, strict=strict, kind=kind,
                         image_limits=getattr(data_cfg, "image_limits", None), video=getattr(data_cfg, "video", None))
        if len(ds) == 0:
            raise DataError(path, None, "empty_source", f"data.sources[{k}]: {ds.skips.total} of {ds.num_seen} "
                                                        "records skipped\n" + ds.skips.summary(path))
        datasets.append(ds)
    sizes = mixture_sizes([len(d) for d in datasets], [s.weight for s in sources], [s.count for s in sources])
    return MixtureDataset(datasets, sizes, seed=seed)


class IndexedDataset(Dataset):
    """``dataset`` whose samples also carry ``index``: their position in it (a failed sample passes unchanged),
    so a collated batch can say which samples it holds (a DPO stage looks up their precomputed reference
    log-probs by it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        return {**sample, "index": int(i)} if isinstance(sample, dict) else sample


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def data_fingerprint(dataset) -> str:
    """A sha256 over what decides a stage's samples and their order: the number of samples, which source and
    record each index is, and each source's record file bytes (a folder source: its files' names and sizes),
    template and ``max_length``. Image and video files are not read (that would be a pass over the data)."""
    h = hashlib.sha256()
    h.update(f"samples {len(dataset)}\n".encode())
    for name in ("index_source", "index_local"):
        arr = getattr(dataset, name, None)
        if arr is not None:
            h.update(name.encode() + bytes(arr))
    for ds in getattr(dataset, "datasets", [dataset]):
        tpl = getattr(ds, "template", None)
        tpl = getattr(tpl, "name", tpl)
        h.update(f"source {len(ds)} {tpl if isinstance(tpl, str) else type(tpl).__name__} "
                 f"{getattr(ds, 'max_length', None)}\n".encode())
        path = Path(getattr(ds, "path", ""))
        if path.is_file():
            _file_digest(path, h)
        elif path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path)} {f.stat().st_size}\n".encode())
    return h.hexdigest()
