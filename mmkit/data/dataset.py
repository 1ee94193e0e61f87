"""Training data: LLaVA JSON / JSONL records, lazily loaded, bad records counted and skipped; mixtures.

Record format (as ``LazySupervisedDataset`` in haotian-liu/LLaVA ``llava/train/train.py`` reads it)::

    {"id": "000123", "image": "coco/train2017/000123.jpg",          # optional; or a list of paths
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Files: a ``.json`` file holding a list of records, or JSON Lines (one record per line); the format is told by
the first character (``[`` = JSON list), not by the extension. Image paths are relative to the source's
``image_folder`` (default: the directory of the data file).

Validation happens in two places:

* **When indexing** (``LlavaDataset.__init__``, cheap, no image is opened): JSON syntax (JSONL: per line,
  reported as ``file:line``), record structure, roles (a leading ``gpt`` turn is dropped as in LLaVA; then
  human/gpt must alternate and end with an answer), non-empty answers, the number of ``<image>`` placeholders
  equals the number of images, image files exist, the template's exchange limit (``plain``: one). A bad record
  is skipped and counted, with a warning naming the file, the record id and the reason -- or, with
  ``strict=True``, a :class:`DataError` is raised.
* **When loading** (``__getitem__``, in DataLoader worker processes, or in the training process with
  ``data.num_workers=0``): images are decoded (``ImageLimits.open``: ``data.image_limits``, see
  ``mmkit.processing.budget``, checked from the header first) and the conversation is tokenized with images
  expanded. An image over a limit (reason ``image_too_large``, the message names the recipe key), a corrupt
  image, a conversation too long for ``max_length`` even after dropping trailing exchanges, or a sample with no
  supervised token left returns a :class:`FailedSample` marker instead of a sample; the collate function
  (:class:`mmkit.data.collate.Collator`) drops it and reports it in the batch. Nothing crashes mid-epoch and no
  all-masked sample ever reaches the loss. (``strict=True`` raises instead.)

Skip counts: a :class:`SkipCounter` holds per-reason counts and a few ``file / id / reason`` examples.
``dataset.skips`` has the records skipped when indexing; each batch carries ``batch["skips"]`` (a plain dict,
so it crosses worker processes) with the samples dropped while loading it. A trainer keeps
``counter = dataset.skips.copy()``, calls ``counter.merge(batch["skips"])`` per batch and prints
``counter.summary()`` at the end of the stage.

Lengths (for LLaVA's samplers), computed from the text only, exactly as ``LazySupervisedDataset``:
``lengths[i]`` = number of whitespace-separated words over all turns + 128 per image;
``modality_lengths[i]`` = the word count, negated for text-only records.

Mixtures (:func:`build_dataset`): a ``DataConfig`` lists sources; each source contributes

* all its records once (neither ``weight`` nor ``count``),
* exactly ``count`` samples (``count < len``: a seeded subsample without repetition; ``count > len``: every
  record ``count // len`` times plus a seeded subsample for the remainder), or
* a ``weight``: a fraction of the mixture. If every source is weighted, the mixture has as many samples as all
  sources together, split in proportion to the weights; otherwise the weights (summing to < 1) are fractions of
  the whole and the weighted sources fill the rest next to the fixed ones:
  ``total = fixed / (1 - sum(weights))``. Sample counts are rounded by largest remainder, and which records are
  taken is drawn as for ``count`` with a generator seeded by ``seed``.

The selection is fixed for the run; the sampler shuffles it each epoch.

Registered data sources (:func:`resolve_source`): a ``path`` of the form ``NAME:ARG`` whose ``NAME`` is in
``mmkit.registry.data_sources`` (entry-point group ``mmkit.data_sources``) is handed to that resolver, which
returns the LLaVA JSON file and image folder to read -- generating them first into ``data_dir`` if it likes.
The demo's ``shapes:auto|stage1|stage2`` (:mod:`mmkit.demo.plugin`) is one. Every other path is a file as above;
an unregistered ``NAME:`` that is not an existing file is an error naming the registered sources.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from mmkit.processing.budget import RECIPE_KEYS, ImageLimitError, ImageLimits
from mmkit.registry import UnknownNameError, data_sources
from mmkit.templates import get_template

logger = logging.getLogger("mmkit.data")

IGNORE_INDEX = -100
IMAGE_LENGTH = 128  # LLaVA's stand-in length of an image in `lengths`

# Reasons a record / sample is skipped (keys of SkipCounter.counts).
REASONS = {
    "malformed_json": "malformed JSON",
    "structure": "malformed record",
    "roles": "roles do not alternate human/gpt",
    "empty_answer": "empty answer",
    "image_count": "<image> count differs from the number of images",
    "missing_image": "image file not found",
    "image_outside": "image path outside image_folder",
    "conversation": "conversation rejected by the template",
    "corrupt_image": "image cannot be decoded",
    "image_too_large": "image over data.image_limits",
    "too_long": "too long for max_length",
    "no_labels": "no supervised token",
    "encode_error": "could not be encoded",
    "no_file": "data file not found or unreadable",
    "empty_source": "no valid record",
}

__all__ = [
    "DataError", "SkipCounter", "FailedSample", "load_records", "check_record", "LlavaDataset",
    "MixtureDataset", "build_dataset", "resolve_source", "SourceContext",
]


class DataError(ValueError):
    """A bad record in strict mode (or an unusable data file). Carries ``file``, ``record_id``, ``reason``."""

    def __init__(self, file: str, record_id: str | None, reason: str, detail: str = ""):
        self.file, self.record_id, self.reason, self.detail = str(file), record_id, reason, detail
        where = f"{file}: record {record_id}" if record_id is not None else str(file)
        super().__init__(f"{where}: {REASONS.get(reason, reason)}" + (f" ({detail})" if detail else ""))


# --------------------------------------------------------------------------------------------- skip accounting


class SkipCounter:
    """Per-reason counts of skipped records / dropped samples, with up to ``max_examples`` examples per reason.

    ``phase`` is ``"index"`` (a record skipped once, when the dataset was built) or ``"load"`` (a sample dropped
    by the collate function; counted each time it is drawn). Mergeable: ``merge`` takes another counter or its
    ``to_dict()`` (what batches carry across DataLoader workers).
    """

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.phases: dict[str, int] = {"index": 0, "load": 0}
        self.examples: dict[str, list[tuple[str, str, str]]] = {}  # reason -> [(file, record id, detail)]

    def add(self, reason: str, file: str, record_id: Any, detail: str = "", phase: str = "index") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.phases[phase] = self.phases.get(phase, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append((str(file), str(record_id), str(detail)))

    def merge(self, other: "SkipCounter | Mapping | None") -> "SkipCounter":
        if other is None:
            return self
        d = other.to_dict() if isinstance(other, SkipCounter) else other
        for reason, n in d.get("counts", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        for phase, n in d.get("phases", {}).items():
            self.phases[phase] = self.phases.get(phase, 0) + int(n)
        for reason, exs in d.get("examples", {}).items():
            mine = self.examples.setdefault(reason, [])
            for e in exs:
                if len(mine) >= self.max_examples:
                    break
                if tuple(e) not in mine:
                    mine.append(tuple(e))
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "phases": dict(self.phases),
                "examples": {r: [list(e) for e in exs] for r, exs in self.examples.items()}}

    @classmethod
    def from_dict(cls, d: Mapping | None, max_examples: int = 3) -> "SkipCounter":
        return cls(max_examples).merge(d)

    def copy(self) -> "SkipCounter":
        return SkipCounter.from_dict(self.to_dict(), self.max_examples)

    def summary(self, title: str = "data") -> str:
        """Multi-line text: totals per phase, counts per reason, examples."""
        if not self.total:
            return f"{title}: no records skipped"
        lines = [f"{title}: {self.phases.get('index', 0)} records skipped when indexing, "
                 f"{self.phases.get('load', 0)} samples dropped when loading"]
        for reason in sorted(self.counts, key=lambda r: (-self.counts[r], r)):
            lines.append(f"  {reason} ({REASONS.get(reason, reason)}): {self.counts[reason]}")
            for file, rid, detail in self.examples.get(reason, []):
                lines.append(f"    e.g. {file}: record {rid}" + (f": {detail}" if detail else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"


@dataclass
class FailedSample:
    """Returned by ``__getitem__`` instead of a sample that failed while loading; dropped by the collator."""

    index: int
    file: str
    record_id: str
    reason: str
    detail: str = ""


# --------------------------------------------------------------------------------------------- reading files


def _iter_raw(path: Path) -> Iterator[tuple[str, str, Any, str | None]]:
    """Yield ``(where, label, record, error)``: ``where`` is ``file`` (JSON list) or ``file:line`` (JSONL);
    ``label`` names a record without an id (``#i`` / ``line n``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, "no_file", str(e)) from e
    if text.lstrip()[:1] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}", None, "malformed_json", e.msg) from e
        for i, rec in enumerate(data):
            yield str(path), f"#{i}", rec, None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", f"line {lineno}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", f"line {lineno}", None, f"{e.msg} (column {e.colno})"


def _record_id(rec: Any, label: str) -> str:
    if isinstance(rec, dict) and rec.get("id") is not None:
        return str(rec["id"])
    return label


def load_records(path: str | os.PathLike, strict: bool = False, skips: SkipCounter | None = None) -> list[dict]:
    """Read a LLaVA JSON list or a JSONL file. Malformed JSONL lines are skipped with a warning naming
    ``file:line`` (counted in ``skips``) or raise :class:`DataError` when ``strict``; an unparsable JSON list
    always raises."""
    out = []
    for where, label, rec, err in _iter_raw(Path(path)):
        if err is not None:
            _reject(where, label, "malformed_json", err, strict, skips)
            continue
        out.append(rec)
    return out


def _reject(file: str, rid: str, reason: str, detail: str, strict: bool, skips: SkipCounter | None,
            phase: str = "index", warn: bool = True) -> None:
    if strict:
        raise DataError(file, rid, reason, detail)
    if skips is not None:
        skips.add(reason, file, rid, detail, phase=phase)
    if warn:
        n = f" [{skips.counts[reason]} so far]" if skips is not None else ""
        logger.warning("skipping %s: record %s: %s (%s)%s", file, rid, REASONS.get(reason, reason), detail, n)


# --------------------------------------------------------------------------------------------- validation

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _images_of(rec: Mapping) -> list[str] | None:
    img = rec.get("image")
    if img is None:
        return []
    if isinstance(img, str) and img:
        return [img]
    if isinstance(img, list) and all(isinstance(p, str) and p for p in img):
        return list(img)
    return None


def check_record(rec: Any, image_folder: str | os.PathLike | None, image_token: str = "<image>",
                 check_files: bool = True, template: Any = None) -> tuple[str, str] | None:
    """Cheap checks of one record (no image is opened). ``None`` if fine, else ``(reason, detail)``."""
    if not isinstance(rec, dict):
        return "structure", f"expected an object, got {type(rec).__name__}"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "structure", "'conversations' must be a non-empty list"
    roles, values = [], []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return "structure", f"turn {k} is not an object"
        role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            return "structure", f"turn {k}: 'value' must be a string"
        if _ROLES.get(str(role).lower()) is None:
            return "roles", f"turn {k}: unknown role {role!r}"
        roles.append(_ROLES[str(role).lower()])
        values.append(value)
    images = _images_of(rec)
    if images is None:
        return "structure", "'image' must be a path or a list of paths"

    start = 1 if roles[0] == "system" else 0
    if "system" in roles[start:]:
        return "roles", "a system turn is only allowed first"
    if start < len(roles) and roles[start] == "assistant":
        start += 1  # LLaVA drops a first turn that is not from the human
    body = roles[start:]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(body))]
    if not body or body != expected or body[-1] != "assistant":
        shown = ["human" if r == "user" else "gpt" if r == "assistant" else r for r in roles]
        return "roles", f"roles {shown}: need human/gpt alternating, ending with gpt"
    for k in range(start, len(roles)):
        if roles[k] == "assistant" and not values[k].strip():
            return "empty_answer", f"turn {k}"
    n_placeholders = sum(v.count(image_token) for v in values[start:])
    if n_placeholders != len(images):
        return "image_count", f"{n_placeholders} {image_token} in the text, {len(images)} image(s)"
    for p in images:  # relative to image_folder, and inside it: no absolute paths, no way up
        if not isinstance(p, str) or os.path.isabs(p) or ".." in Path(p).parts:
            return "image_outside", repr(p)
    if check_files and images:
        folder = Path(image_folder) if image_folder is not None else Path(".")
        for p in images:
            if not (folder / p).is_file():
                return "missing_image", str(folder / p)
    tpl = _template_obj(template)
    if tpl is not None and tpl.max_exchanges is not None and len(body) // 2 > tpl.max_exchanges:
        return "conversation", (f"template {tpl.name!r} takes at most {tpl.max_exchanges} exchange(s), "
                                f"got {len(body) // 2}")
    return None


def _template_obj(template: Any):
    if template is None or hasattr(template, "max_exchanges"):
        return template
    try:
        return get_template(template)
    except Exception:  # unknown name / templates not importable: the encoder will report it per sample
        return None


def _template_name(template: Any) -> str | None:
    return getattr(template, "name", template)


def _word_count(conv: Sequence[Mapping]) -> int:
    return sum(len(str(t.get("value", t.get("content", ""))).split()) for t in conv)


# --------------------------------------------------------------------------------------------- the dataset


class LlavaDataset(Dataset):
    """One LLaVA JSON/JSONL file as a lazily loaded torch Dataset (see the module docstring).

    ``processor``: a :class:`mmkit.processing.processor.MultimodalProcessor`; ``template``: template name or
    object (default: the processor's); ``max_length``: token budget after image expansion (default: the
    processor's). Items are ``{"input_ids", "labels", "pixel_values", "image_sizes", "id"}`` or a
    :class:`FailedSample`.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None, processor, template=None,
                 max_length: int | None = None, strict: bool = False, check_files: bool = True,
                 max_warnings: int = 20, image_limits=None):
        self.path = str(path)
        # the image budget (data.image_limits), checked from each image's header before it is decoded
        self.image_limits = ImageLimits.from_config(image_limits, RECIPE_KEYS)
        self.image_folder = str(image_folder) if image_folder is not None else str(Path(path).parent)
        self.processor = processor
        self.template = template if template is not None else getattr(processor, "template", None)
        self.max_length = max_length
        self.strict = strict
        self.max_warnings = max_warnings
        self.image_token = getattr(processor, "image_token", "<image>")
        self.skips = SkipCounter()
        self._load_warnings = 0

        self.records: list[tuple[str, str, tuple[str, ...], list]] = []  # (where, id, image paths, conversations)
        self.lengths: list[int] = []
        self.modality_lengths: list[int] = []
        warned = 0
        seen = 0
        tpl = _template_obj(self.template)
        for where, label, rec, err in _iter_raw(Path(path)):
            seen += 1
            rid = _record_id(rec, label)
            problem = ("malformed_json", err) if err is not None else check_record(
                rec, self.image_folder, self.image_token, check_files, tpl)
            if problem is not None:
                warned += 1
                _reject(where, rid, problem[0], problem[1], strict, self.skips, warn=warned <= max_warnings)
                continue
            images = tuple(_images_of(rec))
            conv = rec["conversations"]
            words = _word_count(conv)
            self.records.append((where, rid, images, conv))
            self.lengths.append(words + IMAGE_LENGTH * len(images))
            self.modality_lengths.append(words if images else -words)
        self.num_seen = seen
        if self.skips.total:
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self.skips.counts.items()))
            logger.warning("%s: skipped %d of %d records (%s)", self.path, self.skips.total, seen, counts)

    def __len__(self) -> int:
        return len(self.records)

    def _fail(self, i: int, where: str, rid: str, reason: str, detail: str) -> FailedSample:
        if self.strict:
            raise DataError(where, rid, reason, detail)
        self._load_warnings += 1
        if self._load_warnings <= self.max_warnings:
            logger.warning("dropping %s: record %s: %s (%s)", where, rid, REASONS.get(reason, reason), detail)
        return FailedSample(i, where, rid, reason, detail)

    def __getitem__(self, i: int):
        where, rid, paths, conv = self.records[i]
        images = []
        for p in paths:
            full = os.path.join(self.image_folder, p)
            try:
                images.append(self.image_limits.open(full, getattr(self.processor, "image_processor", None)))
            except ImageLimitError as e:
                return self._fail(i, where, rid, "image_too_large", f"{full}: {e}")
            except FileNotFoundError as e:
                return self._fail(i, where, rid, "missing_image", str(e))
            except Exception as e:  # any decoder error of a bad file: UnidentifiedImageError, truncated, bomb...
                return self._fail(i, where, rid, "corrupt_image", f"{full}: {type(e).__name__}: {e}")
        try:
            enc = self.processor.encode_conversation(conv, images, self.template, self.max_length)
        except ValueError as e:  # ConversationError is a ValueError
            msg = str(e)
            reason = "too_long" if msg.startswith("too long") else (
                "conversation" if type(e).__name__ == "ConversationError" else "encode_error")
            return self._fail(i, where, rid, reason, msg)
        enc = self._drop_truncated_images(enc)
        if not any(label != IGNORE_INDEX for label in enc["labels"]):
            return self._fail(i, where, rid, "no_labels", f"{len(enc['input_ids'])} tokens, all masked")
        enc["id"] = rid
        return enc

    def _drop_truncated_images(self, enc: dict) -> dict:
        """Keep only the images whose tokens are still in ``input_ids`` (truncation drops whole trailing
        exchanges, and with them their images)."""
        sizes = enc.get("image_sizes") or []
        if not sizes:
            return enc
        tid = getattr(self.processor, "image_token_id", None)
        if tid is None:
            return enc
        n_ids = sum(1 for t in enc["input_ids"] if t == tid)
        total, keep = 0, 0
        for hw in sizes:
            if total >= n_ids:
                break
            total += self.processor.num_image_tokens(hw)
            keep += 1
        if total != n_ids:
            raise ValueError(f"{n_ids} image tokens in the ids do not match the images' token counts")
        if keep < len(sizes):
            enc = dict(enc, pixel_values=enc["pixel_values"][:keep], image_sizes=enc["image_sizes"][:keep])
        return enc

    def summary(self) -> str:
        return self.skips.summary(self.path)


# --------------------------------------------------------------------------------------------- mixtures


class MixtureDataset(Dataset):
    """Several :class:`LlavaDataset` sources, each contributing a given number of samples (see the module
    docstring). ``index[k] = (source, local index)``; ``lengths`` / ``modality_lengths`` follow the index."""

    def __init__(self, datasets: Sequence[LlavaDataset], sizes: Sequence[int | None] | None = None, seed: int = 0):
        self.datasets = list(datasets)
        sizes = list(sizes) if sizes is not None else [None] * len(self.datasets)
        g = torch.Generator()
        g.manual_seed(int(seed))
        src, loc = [], []
        for s, (ds, n) in enumerate(zip(self.datasets, sizes)):
            take = _take(len(ds), n, g, getattr(ds, "path", f"source {s}"))
            src.extend([s] * len(take))
            loc.extend(take)
        self.index_source = src
        self.index_local = loc
        self.sizes = [src.count(s) for s in range(len(self.datasets))]
        self.lengths = [self.datasets[s].lengths[j] for s, j in zip(src, loc)]
        self.modality_lengths = [self.datasets[s].modality_lengths[j] for s, j in zip(src, loc)]

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


def _take(available: int, n: int | None, g: torch.Generator, name: str) -> list[int]:
    """``n`` local indices of a source of ``available`` records (all once when ``n`` is None)."""
    if n is None:
        return list(range(available))
    if n > 0 and available == 0:
        raise DataError(name, None, "empty_source", f"{n} samples requested")
    reps, rem = divmod(n, available) if available else (0, 0)
    extra = sorted(torch.randperm(available, generator=g)[:rem].tolist()) if rem else []
    return list(range(available)) * reps + extra


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


def resolve_source(path: str, image_folder: str | None, template=None, base_dir: str | os.PathLike = ".",
                   data_dir: str | os.PathLike | None = None, plugins: Mapping | None = None) -> tuple[str, str]:
    """``(data file, image folder)`` of a source. A ``NAME:ARG`` path whose ``NAME`` is in
    ``mmkit.registry.data_sources`` is resolved by that resolver (which may generate the data into ``data_dir``
    first); any other path is a LLaVA JSON/JSONL file. Relative paths are taken from ``base_dir``; the image
    folder defaults to the data file's directory."""
    m = _SCHEME.fullmatch(path)
    if m and m[1] in data_sources:
        ctx = SourceContext(_template_name(template), None if data_dir is None else Path(data_dir), Path(base_dir),
                            image_folder, dict(plugins or {}))
        path, image_folder = data_sources.get(m[1])(m[2], ctx)
    elif m and not _under(path, base_dir).is_file():
        try:
            data_sources.get(m[1])
        except UnknownNameError as exc:
            raise ValueError(f"{path}: {exc}") from None
    p = _under(path, base_dir)
    if not p.is_file():
        raise DataError(str(p), None, "no_file")
    folder = p.parent if image_folder is None else _under(image_folder, base_dir)
    return str(p), str(folder)


def build_dataset(data_cfg, processor, template=None, max_length: int | None = None,
                  base_dir: str | os.PathLike = ".", *, data_dir: str | os.PathLike | None = None,
                  plugins: Mapping | None = None, seed: int = 0) -> MixtureDataset:
    """The training dataset of a ``DataConfig`` (``sources``, ``strict``): one :class:`LlavaDataset` per source,
    combined by weight / count (see the module docstring). ``data_dir``: where registered data sources may
    generate data; ``plugins``: the recipe's ``plugins:`` (handed to them); ``seed``: the mixture's subsampling
    seed."""
    sources = list(getattr(data_cfg, "sources", None) or [])
    if not sources:
        raise ValueError("data.sources: no data source given")
    strict = bool(getattr(data_cfg, "strict", False))
    if template is None:
        template = getattr(processor, "template", None)
    datasets = []
    for k, src in enumerate(sources):
        path, folder = resolve_source(src.path, src.image_folder, template, base_dir, data_dir, plugins)
        ds = LlavaDataset(path, folder, processor, template, max_length=max_length, strict=strict,
                          image_limits=getattr(data_cfg, "image_limits", None))
        if len(ds) == 0:
            raise DataError(path, None, "empty_source", f"data.sources[{k}]: {ds.skips.total} of {ds.num_seen} "
                                                        "records skipped\n" + ds.skips.summary(path))
        datasets.append(ds)
    sizes = mixture_sizes([len(d) for d in datasets], [s.weight for s in sources], [s.count for s in sources])
    return MixtureDataset(datasets, sizes, seed=seed)
