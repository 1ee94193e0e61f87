"""Question-file readers for ``python -m mmkit.eval``: LLaVA jsonl, ScienceQA JSON, MMBench TSV.

Every reader returns ``(rows, problems)``. A row is a plain dict::

    {"question_id", "text", "image"?, "category"?, "prompt", "_where", ...}

``text`` is what the model is asked (without the ``<image>`` placeholder; the runner prepends
``<image>\\n`` when the row has an image), ``prompt`` is what the answers file records in its
``prompt`` field (as LLaVA's scripts do), ``_where`` is ``file:line`` for messages. MMBench rows carry
the decoded image in ``_image`` and are expanded into rounds by :func:`expand_mmbench`.

Bad input is never dropped silently: every skipped row becomes a :class:`Problem` naming the file and
line, and the caller decides whether to skip (and count) or stop (``--strict``).

Formats (as LLaVA's ``llava/eval/model_vqa_*.py`` read and write them):

* ``llava``: jsonl ``{"question_id", "image"?, "text", "category"?}`` (``model_vqa_loader.py``):
  the answer's ``prompt`` is the original ``text``.
* ``scienceqa``: a JSON list of ``{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}``
  (``model_vqa_science.py``): the question is the first human turn with ``<image>`` removed; the
  answer's ``prompt`` is ``"<image>\\n" + question`` for image questions. ``single_pred_prompt`` adds
  "Answer with the option's letter from the given choices directly." to both.
* ``mmbench``: TSV with ``index, question, hint, A, B, C, D, answer, category, l2-category, image``
  (base64; a path relative to the image folder is accepted too) (``model_vqa_mmbench.py``): the
  question is ``hint\\nquestion\\nA. ..\\nB. ..``; with ``all_rounds`` the options are rotated once per
  round and every answer records ``round_id``, ``options`` and ``option_char``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from mmkit.eval.scorers import EvalInputError, read_records
from mmkit.processing.budget import ImageLimits

__all__ = [
    "FORMATS",
    "Problem",
    "detect_format",
    "read_llava_questions",
    "read_scienceqa_questions",
    "read_mmbench_questions",
    "expand_mmbench",
    "drop_duplicates",
    "check_images",
    "get_chunk",
    "qid_key",
    "SINGLE_PRED_PROMPT",
]

FORMATS = ("llava", "scienceqa", "mmbench")
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
SINGLE_PRED_PROMPT_CN = "请直接回答选项字母。"
MMBENCH_OPTIONS = ("A", "B", "C", "D")
# the strings pandas.read_table reads as NaN by default (LLaVA's MMBench reader goes through pandas)
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
              "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


@dataclass
class Problem:
    """One rejected input row: ``where`` is ``file:line`` (or ``file``)."""

    where: str
    message: str
    kind: str = "malformed"  # malformed | duplicate | missing_image | bad_image

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# --------------------------------------------------------------------------- helpers


def detect_format(path: str | os.PathLike) -> str:
    """``mmbench`` for .tsv, ``scienceqa`` for a JSON array (.json), else ``llava`` (jsonl)."""
    p = str(path).lower()
    if p.endswith(".tsv"):
        return "mmbench"
    if p.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                head = fh.read(4096).lstrip()
        except OSError:
            return "llava"
        if head.startswith("["):
            return "scienceqa"
    return "llava"


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's ``get_chunk``: ``ceil(len/num_chunks)``-sized chunks, the ``chunk_idx``-th of them.

    Like LLaVA, fewer than ``num_chunks`` chunks may exist (10 items in 4 chunks: 3, 3, 3, 1; 5 items
    in 4 chunks: 2, 2, 1); a missing chunk is empty here instead of an IndexError.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    items = list(items)
    size = math.ceil(len(items) / num_chunks) if items else 1
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    return chunks[chunk_idx] if chunk_idx < len(chunks) else []


def _norm_qid(v: Any) -> Any:
    """Ids as they will round-trip through JSON: ints stay ints, integer-looking floats become ints."""
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def qid_key(qid: Any) -> str:
    """A comparison key for ids: ``7``, ``"7"`` and ``7.0`` are the same question."""
    if isinstance(qid, float) and qid.is_integer():
        qid = int(qid)
    return str(qid)


def drop_duplicates(rows: list[dict]) -> tuple[list[dict], list[Problem]]:
    """Keep the first row of each question id; every later one is a problem naming both lines."""
    seen: dict[str, str] = {}
    kept, problems = [], []
    for r in rows:
        k = qid_key(r["question_id"])
        if k in seen:
            problems.append(Problem(r["_where"], f"duplicate question_id {r['question_id']!r} "
                                                 f"(first seen at {seen[k]}); skipped", "duplicate"))
            continue
        seen[k] = r["_where"]
        kept.append(r)
    return kept, problems


def check_images(rows: list[dict], image_folder: str | os.PathLike | None) -> tuple[list[dict], list[Problem]]:
    """Drop rows whose image file does not exist under ``image_folder``."""
    kept, problems = [], []
    root = Path(image_folder or ".")
    for r in rows:
        img = r.get("image")
        if img and r.get("_image") is None and not (root / img).is_file():
            problems.append(Problem(r["_where"], f"image not found: {root / img}", "missing_image"))
            continue
        kept.append(r)
    return kept, problems


# --------------------------------------------------------------------------- LLaVA jsonl


def read_llava_questions(path: str | os.PathLike) -> tuple[list[dict], list[Problem]]:
    """LLaVA question jsonl (``model_vqa_loader.py``); blank lines are ignored."""
    rows, problems = [], []
    path = str(path)
    with open(path, "rb") as fh:
        data = fh.read()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problems.append(Problem(where, f"not UTF-8 text ({exc.reason})"))
            continue
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, f"malformed JSON line: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, f"expected a JSON object, got {type(row).__name__}"))
            continue
        msg = _check_fields(row, ("question_id", "text"))
        if msg:
            problems.append(Problem(where, msg))
            continue
        if row.get("image") is not None and not isinstance(row["image"], str):
            problems.append(Problem(where, f"'image' must be a string path, got {type(row['image']).__name__}"))
            continue
        out = dict(row)
        out["question_id"] = _norm_qid(row["question_id"])
        out["prompt"] = row["text"]
        out["_where"] = where
        rows.append(out)
    return rows, problems


def _check_fields(row: dict, keys: Iterable[str]) -> str | None:
    for k in keys:
        if k not in row or row[k] is None:
            return f"missing {k!r}"
    qid = row.get("question_id", row.get("id"))
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        return f"question id must be an int or a string, got {type(qid).__name__}"
    if "text" in row and not isinstance(row["text"], str):
        return f"'text' must be a string, got {type(row['text']).__name__}"
    return None


# --------------------------------------------------------------------------- ScienceQA JSON


def read_scienceqa_questions(path: str | os.PathLike, single_pred_prompt: bool = False
                             ) -> tuple[list[dict], list[Problem]]:
    """ScienceQA in LLaVA's conversation JSON (``llava_test_CQM-A.json``; ``model_vqa_science.py``).

    A file that is not a JSON array at all raises :class:`mmkit.eval.scorers.EvalInputError`.
    """
    rows, problems = [], []
    for rec in read_records(str(path)):
        where = rec.where
        msg = _check_fields(rec, ("id", "conversations"))
        if msg:
            problems.append(Problem(where, msg))
            continue
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict) \
                or not isinstance(conv[0].get("value"), str):
            problems.append(Problem(where, "'conversations' must be a list whose first turn has a string 'value'"))
            continue
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            problems.append(Problem(where, f"'image' must be a string path, got {type(image).__name__}"))
            continue
        qs = conv[0]["value"].replace("<image>", "").strip()
        prompt = f"<image>\n{qs}" if image else qs
        if single_pred_prompt:
            qs = qs + "\n" + SINGLE_PRED_PROMPT
            prompt = prompt + "\n" + SINGLE_PRED_PROMPT
        out = {"question_id": _norm_qid(rec["id"]), "text": qs, "prompt": prompt, "_where": where}
        if image:
            out["image"] = image
        rows.append(out)
    return rows, problems


# --------------------------------------------------------------------------- MMBench TSV


def _is_none(value: Any) -> bool:
    """LLaVA's ``is_none`` after ``pandas.read_table`` (whose default NaN strings count as missing)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and (value in _PANDAS_NA or value.lower() in ("nan", "none"))


def _decode_image(value: str, image_folder: str | os.PathLike | None, image_limits: ImageLimits | None = None):
    """A base64-encoded image (MMBench), or a path relative to the image folder; the image budget is checked
    from the header before the decode (the size after resize/pad is checked again when it is answered)."""
    limits = image_limits or ImageLimits()
    root = Path(image_folder or ".")
    if len(value) < 1024 and (root / value).is_file():
        return limits.open(root / value)
    if len(value) * 3 // 4 > limits.max_bytes + 3:
        limits.check_bytes(len(value) * 3 // 4)
    return limits.open(base64.b64decode(value, validate=False))


def read_mmbench_questions(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                           image_limits: ImageLimits | None = None) -> tuple[list[dict], list[Problem]]:
    """MMBench TSV rows (``index, question, hint, A..D, answer, category, l2-category, image``).

    Each row keeps its parsed ``options`` (A..D up to the first empty one, as LLaVA's ``get_options``)
    and its decoded image; :func:`expand_mmbench` turns a row into the questions of its rounds.
    """
    path = str(path)
    rows, problems = [], []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            return rows, problems
        except csv.Error as exc:
            problems.append(Problem(f"{path}:1", f"malformed TSV header: {exc}"))
            return rows, problems
        header = [h.strip() for h in header]
        missing = [k for k in ("index", "question", "A", "B") if k not in header]
        if missing:
            raise EvalInputError(f"{path}:1", f"not an MMBench TSV: the header lacks {', '.join(missing)}")
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problems.append(Problem(f"{path}:{start}", f"malformed TSV row: {exc}"))
                start = reader.line_num + 1
                continue
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                problems.append(Problem(where, f"expected {len(header)} tab-separated fields, got {len(values)}"))
                continue
            row = dict(zip(header, values))
            try:
                index = int(float(row["index"]))
            except ValueError:
                problems.append(Problem(where, f"'index' must be an integer, got {row['index']!r}"))
                continue
            if _is_none(row.get("question")):
                problems.append(Problem(where, "missing 'question'"))
                continue
            options = []
            for ch in MMBENCH_OPTIONS:
                if ch not in row or _is_none(row[ch]):
                    break
                options.append(row[ch])
            if not options:
                problems.append(Problem(where, "no options (column A is empty)"))
                continue
            image = None
            if not _is_none(row.get("image")):
                try:
                    image = _decode_image(row["image"], image_folder, image_limits)
                except (binascii.Error, ValueError, OSError) as exc:
                    problems.append(Problem(where, f"cannot decode the image: {exc}", "bad_image"))
                    continue
            out = {
                "question_id": index, "question": row["question"],
                "hint": None if _is_none(row.get("hint")) else row["hint"],
                "options": options, "_where": where,
            }
            if image is not None:
                out["_image"] = image
                out["image"] = f"<base64 row {index}>"
            for k in ("category", "l2-category", "answer"):
                if k in row and not _is_none(row[k]):
                    out[k] = row[k]
            rows.append(out)
    return rows, problems


def expand_mmbench(row: dict, all_rounds: bool = False, single_pred_prompt: bool = False,
                   lang: str = "en") -> list[dict]:
    """The questions of one MMBench row: one per round, options rotated by one each round (LLaVA)."""
    options = list(row["options"])
    chars = list(MMBENCH_OPTIONS[:len(options)])
    out = []
    for round_id in range(len(options) if all_rounds else 1):
        question = row["question"]
        if row.get("hint") is not None:
            question = row["hint"] + "\n" + question
        for ch, opt in zip(MMBENCH_OPTIONS[:len(options)], options):
            question = question + "\n" + ch + ". " + opt
        prompt = question
        text = question
        if single_pred_prompt:
            text = text + "\n" + (SINGLE_PRED_PROMPT_CN if lang == "cn" else SINGLE_PRED_PROMPT)
        q = {k: v for k, v in row.items() if k not in ("options", "question", "hint")}
        q.update({"text": text, "prompt": prompt, "round_id": round_id,
                  "_extra": {"round_id": round_id, "options": list(options), "option_char": list(chars)}})
        out.append(q)
        options = options[1:] + options[:1]
        chars = chars[1:] + chars[:1]
    return out
