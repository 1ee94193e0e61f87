"""Training records of every source kind: LLaVA JSON / JSONL files, validation, skip accounting, and what
turns a record into a sample (:class:`RecordSource`; :class:`LlavaDataset` for JSON). Mixtures and source
kinds: :mod:`mmkit.data.dataset`.

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
  ``mmkit.processing.budget``, checked from the header first; an image over a limit is reason
  ``image_too_large``, its message naming the recipe key) and the conversation is
  tokenized with images expanded. A corrupt
  image, a conversation too long for ``max_length`` even after dropping trailing exchanges, or a sample with no
  supervised token left returns a :class:`FailedSample` marker instead of a sample; the collate function
  (:class:`mmkit.data.collate.Collator`) drops it and reports it in the batch. Nothing crashes mid-epoch and no
  all-masked sample ever reaches the loss. (``strict=True`` raises instead.)

Skip counts: a :class:`SkipCounter` holds per-reason counts and a few ``file / id / reason`` examples.
``dataset.skips`` has the records skipped when indexing; each batch carries ``batch["skips"]`` (a plain dict,
so it crosses worker processes) with the samples dropped while loading it. A trainer keeps
``counter = dataset.skips.copy()``, calls ``counter.merge(batch["skips"])`` per batch and prints
``counter.summary()`` at the end of the stage.

Preference records (DPO stages, ``stages[i].objective: dpo``; JSON / JSONL files only), in one of three
layouts -- the record's prompt plus each answer gives two conversations with the same prompt and images::

    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nIs there a red square?"}],
     "chosen": "No.", "rejected": "Yes."}                                  # mmkit: the prompt ends with a human turn
    {"image": "a.png", "question": "Is there a red square?", "chosen": "No.", "rejected": "Yes."}   # RLAIF-V
    {"image": "a.png", "conversations": [...human turn last...],                                   # LLaVA-RLHF
     "output_1": {"from": "llava", "value": "No."}, "output_2": {"from": "llava", "value": "Yes."}, "preference": 1}

(RLAIF-V: ``question`` is one human turn, ``<image>\\n`` put in front when it has no placeholder and the record
has an image; LLaVA-RLHF: ``preference`` 1 or 2 names the chosen output, the other is the rejected one; the
prompt may hold earlier exchanges in all layouts.) A preference sample is the chosen sample (the labels on its
final answer only) plus ``rejected_input_ids`` / ``rejected_labels``; a file whose first record is a preference
record takes only preference records (the others are skipped, reason ``structure``).

Lengths (for LLaVA's samplers), computed from the text only, exactly as ``LazySupervisedDataset``:
``lengths[i]`` = number of whitespace-separated words over all turns + 128 per image;
``modality_lengths[i]`` = the word count, negated for text-only records.

"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from torch.utils.data import Dataset

from mmkit.processing.budget import RECIPE_KEYS, ImageLimitError, ImageLimits
from mmkit.processing.video import VideoError, VideoOptions, decode_video, time_instruction
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
    "missing_video": "video file not found",
    "corrupt_video": "video cannot be decoded",
    "video_too_large": "video over data.video / data.image_limits",
    "too_long": "too long for max_length",
    "no_labels": "no supervised token",
    "encode_error": "could not be encoded",
    "no_file": "data file not found or unreadable",
    "empty_source": "no valid record",
}

__all__ = [
    "DataError", "SkipCounter", "FailedSample", "load_records", "check_record", "LlavaDataset", "RecordSource",
    "REASONS", "IGNORE_INDEX", "IMAGE_LENGTH", "is_preference", "preference_pair", "last_answer_only",
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


class VideoRef(str):
    """A record's video path (relative to the source's folder), told apart from image paths among a record's refs."""


_VIDEO_KEYS = {k: f"data.video.{k}" for k in ("num_frames", "fps", "max_frames", "max_bytes", "max_decode_frames")}
_VIDEO_TOO_LARGE = ("too_large", "too_many_bytes", "too_many_frames")


def _video_of(rec: Mapping) -> str | None:
    """The record's ``video`` path (LLaVA-Video layout), ``""`` if it has none, None if it is not a path."""
    v = rec.get("video")
    if v is None:
        return ""
    return v if isinstance(v, str) and v else None


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
                 check_files: bool = True, template: Any = None,
                 video_token: str = "<video>") -> tuple[str, str] | None:
    """Cheap checks of one record (no image or video is opened). ``None`` if fine, else ``(reason, detail)``.

    A ``video`` record (LLaVA-Video: ``"video": "path/rel/to/folder.mp4"``, no ``image``) has exactly one
    placeholder for the video in its conversation: ``<video>``, or ``<image>`` as LLaVA-Video's data writes it."""
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
    video = _video_of(rec)
    if video is None:
        return "structure", "'video' must be a path"
    if video and images:
        return "structure", "a record has an 'image' or a 'video', not both"

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
    if video:
        n_video = n_placeholders + sum(v.count(video_token) for v in values[start:])
        if n_video != 1:
            return "image_count", f"{n_video} {video_token} / {image_token} in the text of a video record (need one)"
        if os.path.isabs(video) or ".." in Path(video).parts:
            return "image_outside", repr(video)
        if check_files and not ((Path(image_folder) if image_folder is not None else Path(".")) / video).is_file():
            return "missing_video", str(Path(image_folder or ".") / video)
    elif n_placeholders != len(images):
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


# --------------------------------------------------------------------------------------------- preference records


def is_preference(rec: Any) -> bool:
    """A preference (DPO) record in one of the layouts of the module docstring."""
    return isinstance(rec, dict) and any(k in rec for k in ("chosen", "rejected", "output_1", "output_2"))


def _answer(value: Any, key: str) -> str:
    if isinstance(value, dict):  # LLaVA-RLHF outputs: {"from": "llava", "value": "..."}
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string (or an object with a 'value' string)")
    if not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def preference_pair(rec: dict, image_token: str = "<image>") -> tuple[dict, list]:
    """``(chosen record, rejected conversations)`` of a preference record: the chosen record is a plain LLaVA
    record (``image`` and ``conversations`` ending with the chosen answer). Raises ValueError naming the field."""
    if "question" in rec and "conversations" not in rec:  # RLAIF-V
        question = rec["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' must be a non-empty string")
        if rec.get("image") and image_token not in question:
            question = f"{image_token}\n{question}"
        prompt = [{"from": "human", "value": question}]
    else:
        prompt = rec.get("conversations")
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("a preference record needs 'conversations' (the prompt) or 'question'")
        last = prompt[-1]
        if not isinstance(last, dict) or str(last.get("from", last.get("role"))).lower() not in ("human", "user"):
            raise ValueError("the prompt 'conversations' must end with a human turn")
    if "output_1" in rec or "output_2" in rec:  # LLaVA-RLHF
        pref = rec.get("preference")
        if pref not in (1, 2, "1", "2"):
            raise ValueError(f"'preference' must be 1 or 2, got {pref!r}")
        first, second = _answer(rec.get("output_1"), "output_1"), _answer(rec.get("output_2"), "output_2")
        chosen, rejected = (first, second) if int(pref) == 1 else (second, first)
    else:
        chosen, rejected = _answer(rec.get("chosen"), "chosen"), _answer(rec.get("rejected"), "rejected")
    out = {k: v for k, v in rec.items() if k in ("id", "image")}
    out["conversations"] = list(prompt) + [{"from": "gpt", "value": chosen}]
    return out, list(prompt) + [{"from": "gpt", "value": rejected}]


def last_answer_only(enc: dict, answers: int) -> dict | None:
    """``enc`` with labels on its final answer only (earlier exchanges of the prompt are context), or None when
    the encoding does not hold all ``answers`` answers (truncation dropped the last exchange)."""
    labels = enc["labels"]
    runs = [k for k in range(len(labels)) if labels[k] != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX)]
    if len(runs) != answers:
        return None
    start = runs[-1]
    return dict(enc, labels=[IGNORE_INDEX] * start + list(labels[start:]))


# --------------------------------------------------------------------------------------------- the dataset


class RecordSource(Dataset):
    """What every source kind shares: a record's images opened and its conversation encoded into a sample, or a
    :class:`FailedSample` (see the module docstring). A subclass sets ``path``, ``image_folder``, ``processor``,
    ``template``, ``max_length``, ``strict``, ``max_warnings``, ``image_token``, ``skips``, ``num_seen`` and
    provides ``__len__``, ``__getitem__``, ``lengths`` and ``modality_lengths``."""

    kind = "?"

    def _setup(self, path, image_folder, processor, template, max_length, strict, max_warnings,
               image_limits=None, video=None) -> None:
        self.path = str(path)
        # data.video: frame sampling and limits of video records (mmkit.processing.video)
        self.video_options = VideoOptions.from_config(video, _VIDEO_KEYS)
        self.time_instruction = bool(getattr(video, "time_instruction", False) if video is not None else False)
        # the image budget (data.image_limits), checked from each image's header before it is decoded
        self.image_limits = ImageLimits.from_config(image_limits, RECIPE_KEYS)
        self.image_folder = str(image_folder) if image_folder is not None else str(Path(path).parent)
        self.processor = processor
        self.template = template if template is not None else getattr(processor, "template", None)
        self.max_length = max_length
        self.strict = strict
        self.max_warnings = max_warnings
        self.image_token = getattr(processor, "image_token", "<image>")
        self.video_token = getattr(processor, "video_token", "<video>")
        self.skips = SkipCounter()
        self._load_warnings = 0

    def _fail(self, i: int, where: str, rid: str, reason: str, detail: str) -> FailedSample:
        if self.strict:
            raise DataError(where, rid, reason, detail)
        self._load_warnings += 1
        if self._load_warnings <= self.max_warnings:
            logger.warning("dropping %s: record %s: %s (%s)", where, rid, REASONS.get(reason, reason), detail)
        return FailedSample(i, where, rid, reason, detail)

    def _sample(self, i: int, where: str, rid: str, conv: list, refs: Sequence) -> dict | FailedSample:
        """Decode ``refs`` (image paths relative to ``image_folder``, or encoded image bytes; or one
        :class:`VideoRef`) and encode ``conv``."""
        if len(refs) == 1 and isinstance(refs[0], VideoRef):
            return self._video_sample(i, where, rid, conv, refs[0])
        images = []
        image_processor = getattr(self.processor, "image_processor", None)
        for k, ref in enumerate(refs):
            embedded = isinstance(ref, (bytes, bytearray, memoryview))
            full = f"{where} image {k}" if embedded else os.path.join(self.image_folder, ref)
            try:
                images.append(self.image_limits.open(bytes(ref) if embedded else full, image_processor))
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

    def _video_sample(self, i: int, where: str, rid: str, conv: list, ref: str) -> dict | FailedSample:
        """A video record: frames sampled per ``data.video`` (each frame held to ``data.image_limits``), the
        placeholder (``<image>`` or ``<video>``) expanded to the video's rows as OneVision does."""
        full = os.path.join(self.image_folder, ref)
        image_processor = getattr(self.processor, "image_processor", None)
        try:
            video = decode_video(full, self.video_options, self.image_limits, image_processor, name=full)
        except FileNotFoundError as e:
            return self._fail(i, where, rid, "missing_video", str(e))
        except VideoError as e:
            return self._fail(i, where, rid, "video_too_large" if e.reason in _VIDEO_TOO_LARGE else "corrupt_video",
                              str(e))
        except Exception as e:  # any other decoder failure of a bad file
            return self._fail(i, where, rid, "corrupt_video", f"{full}: {type(e).__name__}: {e}")
        conv = [dict(t) for t in conv]
        for t in conv:  # LLaVA-Video writes the video's placeholder as <image>
            key = "value" if "value" in t else "content"
            text = t[key].replace(self.image_token, self.video_token)
            if self.time_instruction and self.video_token in text:  # LLaVA-Video: after the placeholder
                text = text.replace(self.video_token, f"{self.video_token}\n{time_instruction(video)}", 1)
            t[key] = text
        try:
            enc = self.processor.encode_video_conversation(conv, video.frames, self.template, self.max_length)
        except ValueError as e:
            msg = str(e)
            reason = "too_long" if msg.startswith("too long") else (
                "conversation" if type(e).__name__ == "ConversationError" else "encode_error")
            return self._fail(i, where, rid, reason, msg)
        if not any(label != IGNORE_INDEX for label in enc["labels"]):
            return self._fail(i, where, rid, "no_labels", f"{len(enc['input_ids'])} tokens, all masked")
        enc["id"] = rid
        return enc

    def _checked_sample(self, i: int, where: str, rid: str, rec: Any, refs: Sequence | None):
        """A record of a kind that is validated when loaded (Arrow, shards): :func:`check_record`'s rules on
        ``rec`` (whose ``image`` lists names only), the image files among ``refs`` (paths) must exist, then
        :meth:`_sample`."""
        if refs is None:
            return self._fail(i, where, rid, "structure", "'image' must be a path, encoded bytes or a list of them")
        problem = check_record(rec, self.image_folder, self.image_token, False, _template_obj(self.template))
        if problem is None:
            folder = Path(self.image_folder)
            missing = [str(folder / r) for r in refs if isinstance(r, str) and not (folder / r).is_file()]
            problem = ("missing_image", missing[0]) if missing else None
        if problem is not None:
            return self._fail(i, where, rid, *problem)
        return self._sample(i, where, rid, rec["conversations"], refs)

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


class LlavaDataset(RecordSource):
    """One LLaVA JSON/JSONL file as a lazily loaded torch Dataset (see the module docstring).

    ``processor``: a :class:`mmkit.processing.processor.MultimodalProcessor`; ``template``: template name or
    object (default: the processor's); ``max_length``: token budget after image expansion (default: the
    processor's). Items are ``{"input_ids", "labels", "pixel_values", "image_sizes", "id"}`` or a
    :class:`FailedSample`.
    """

    kind = "llava"

    def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike | None, processor, template=None,
                 max_length: int | None = None, strict: bool = False, check_files: bool = True,
                 max_warnings: int = 20, image_limits=None, video=None):
        self._setup(path, image_folder, processor, template, max_length, strict, max_warnings, image_limits,
                    video)
        self.records: list[tuple[str, str, tuple[str, ...], list]] = []  # (where, id, image paths, conversations)
        self.lengths: list[int] = []
        self.modality_lengths: list[int] = []
        self.rejected: dict[int, list] = {}  # preference records: index -> the rejected answer's conversations
        self.preference: bool | None = None  # told by the first well-formed record
        warned = 0
        seen = 0
        tpl = _template_obj(self.template)
        for where, label, rec, err in _iter_raw(Path(path)):
            seen += 1
            rid = _record_id(rec, label)
            rejected = None
            problem = ("malformed_json", err) if err is not None else None
            if problem is None and isinstance(rec, dict):
                if self.preference is None:
                    self.preference = is_preference(rec)
                if is_preference(rec) != self.preference:
                    problem = ("structure", "preference and plain records mixed in one file (the first record "
                                            f"is {'a preference' if self.preference else 'a plain'} record)")
                elif self.preference:
                    try:
                        rec, rejected = preference_pair(rec, self.image_token)
                    except ValueError as e:
                        problem = ("structure", str(e))
            if problem is None:
                problem = check_record(rec, self.image_folder, self.image_token, check_files, tpl,
                                       self.video_token)
            if problem is not None:
                warned += 1
                _reject(where, rid, problem[0], problem[1], strict, self.skips, warn=warned <= max_warnings)
                continue
            images = tuple(_images_of(rec)) or ((VideoRef(rec["video"]),) if rec.get("video") else ())
            conv = rec["conversations"]
            words = _word_count(conv)
            if rejected is not None:
                self.rejected[len(self.records)] = rejected
            self.records.append((where, rid, images, conv))
            self.lengths.append(words + IMAGE_LENGTH * len(images))
            self.modality_lengths.append(words if images else -words)
        self.num_seen = seen
        if self.skips.total:
            counts = ", ".join(f"{r} {n}" for r, n in sorted(self.skips.counts.items()))
            logger.warning("%s: skipped %d of %d records (%s)", self.path, self.skips.total, seen, counts)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        where, rid, paths, conv = self.records[i]
        rejected = self.rejected.get(i)
        sample = self._sample(i, where, rid, conv, paths)
        if rejected is None or isinstance(sample, FailedSample):
            return sample
        other = self._sample(i, where, rid, rejected, paths)
        if isinstance(other, FailedSample):
            return other
        roles = [_ROLES.get(str(t.get("from", t.get("role"))).lower()) for t in conv]
        body = roles[1:] if roles[0] == "system" else roles
        answers = body.count("assistant") - (body[0] == "assistant")  # a leading gpt turn is dropped (LLaVA)
        sample, other = last_answer_only(sample, answers), last_answer_only(other, answers)
        if sample is None or other is None:
            return self._fail(i, where, rid, "too_long", "the prompt and an answer do not fit max_length")
        sample["rejected_input_ids"], sample["rejected_labels"] = other["input_ids"], other["labels"]
        return sample


