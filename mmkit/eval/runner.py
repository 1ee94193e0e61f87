"""Answer a LLaVA question file with a model: batched, greedy by default.

Questions are ``{"question_id", "image"?, "text", "category"?}``; the image is prepended as
``<image>\\n`` and the text becomes one user turn of the model's template.

:func:`answer_to_file` is the engine of ``python -m mmkit.eval``: it appends one LLaVA answer line
per question (``{question_id, prompt, text, answer_id, model_id, metadata}``), flushed and fsynced
after every batch, so a crash loses at most the batch in flight; :func:`load_answered` reads such a
file back (repairing a partial last line) so a rerun answers only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from tqdm import tqdm

from mmkit.eval.formats import Problem, qid_key
from mmkit.eval.scorers import EvalInputError
from mmkit.processing.budget import ImageLimits

log = logging.getLogger("mmkit.eval")


def read_questions(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON line: {exc.msg}") from None
            if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
                raise ValueError(f"{path}:{lineno}: a question needs 'question_id' and 'text'")
            row["_line"] = lineno
            rows.append(row)
    return rows


def has_image(question: dict) -> bool:
    return bool(question.get("image")) or question.get("_image") is not None


def prompt_text(question: dict, image_token: str = "<image>") -> str:
    text = question["text"].replace(image_token, "").strip()
    return f"{image_token}\n{text}" if has_image(question) else text


def load_image(question: dict, image_folder: str | Path | None, image_limits: ImageLimits | None = None,
               image_processor=None) -> Image.Image | None:
    """The question's image as RGB: an already decoded ``_image`` (MMBench) or ``image_folder/image``, the image
    budget (``image_limits``, default ``ImageLimits()``) checked from the header before it is decoded."""
    limits = image_limits or ImageLimits()
    if question.get("_image") is not None:  # decoded when read (within the limits): its resize is still ahead
        im = question["_image"]
        if image_processor is not None:
            limits.check_size(im.width, im.height, image_processor)
        return im
    if not question.get("image"):
        return None
    return limits.open(Path(image_folder or ".") / question["image"], image_processor)


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def warn_over_context(model, questions: list[dict], attention_mask: torch.Tensor, max_new_tokens: int) -> int:
    """Warn (and count) the questions whose prompt plus ``max_new_tokens`` runs past the LLM's context: nothing is
    cut, the model answers them past the positions it was trained on, so their answers deserve a look."""
    cfg = model.llm.config
    limit = getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings", None)
    if not limit:
        return 0
    over = 0
    for q, n in zip(questions, attention_mask.sum(dim=1).tolist()):
        if n + max_new_tokens > limit:
            over += 1
            log.warning("question %s: a prompt of %d tokens + %d new tokens is longer than the model's context "
                        "of %d (max_position_embeddings); answered anyway, nothing cut", q.get("question_id"),
                        n, max_new_tokens, limit)
    return over


def answer_batch(model, questions: list[dict], image_folder: str | Path | None, template: str | None = None,
                 max_new_tokens: int = 16, **gen) -> list[str]:
    """Greedy answers for a batch of questions (left-padded, one forward pass per new token)."""
    proc = model.processor
    texts = [prompt_text(q, proc.image_token) for q in questions]
    images = [im for im in (load_image(q, image_folder) for q in questions) if im is not None]
    inputs = proc(images=images, text=texts, template=template or model.template, padding_side="left")
    if "attention_mask" in inputs:
        warn_over_context(model, questions, inputs["attention_mask"], max_new_tokens)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_text=True, **gen)
    return [t.strip() for t in out]


def answer_questions(model, questions: Iterable[dict], image_folder, template=None, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = True, **gen) -> Iterator[tuple[dict, str]]:
    questions = list(questions)
    bar = tqdm(total=len(questions), desc="answering", disable=not progress, dynamic_ncols=True)
    for chunk in batches(questions, batch_size):
        for q, a in zip(chunk, answer_batch(model, chunk, image_folder, template, max_new_tokens, **gen)):
            yield q, a
        bar.update(len(chunk))
    bar.close()


# --------------------------------------------------------------------------- answers files


def model_name_from_path(path: str | os.PathLike) -> str:
    """LLaVA's ``get_model_name_from_path``: the last folder, or ``parent_checkpoint-N``."""
    parts = str(path).strip("/").split("/")
    if len(parts) > 1 and parts[-1].startswith("checkpoint-"):
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def answer_key(question_id: Any, round_id: Any = None) -> tuple[str, Any]:
    """The resume key of an answer: its id (``7`` and ``"7"`` alike) and its MMBench round."""
    return qid_key(question_id), round_id


def answer_record(question: dict, text: str, model_id: str) -> dict:
    """One LLaVA answer line (``model_vqa_loader.py``; the MMBench variant adds round/options)."""
    extra = question.get("_extra") or {}
    row: dict[str, Any] = {"question_id": question["question_id"]}
    if "round_id" in extra:
        row["round_id"] = extra["round_id"]
    row["prompt"] = question.get("prompt", question["text"])
    row["text"] = text
    for k in ("options", "option_char"):
        if k in extra:
            row[k] = extra[k]
    row.update({"answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}})
    return row


@dataclass
class AnsweredFile:
    """What an existing answers file holds (see :func:`load_answered`)."""

    keys: set = field(default_factory=set)
    lines: int = 0
    repaired: str | None = None  # description of a repaired partial last line, if any


def load_answered(path: str | os.PathLike, repair: bool = True) -> AnsweredFile:
    """Read the answers already in ``path``.

    A last line without its newline (a crash mid-write) is completed if it is a whole JSON object
    and cut off otherwise (``repair=True``; the cut bytes are reported). A malformed line anywhere
    else raises :class:`~mmkit.eval.scorers.EvalInputError` naming it: the file is left untouched.
    """
    out = AnsweredFile()
    p = Path(path)
    if not p.exists():
        return out
    data = p.read_bytes()
    if not data:
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        try:
            obj = json.loads(tail.decode("utf-8"))
            ok = isinstance(obj, dict) and "question_id" in obj
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            lines.append(tail)
            if repair:
                with open(p, "ab") as fh:
                    fh.write(b"\n")
            out.repaired = f"{path}:{len(lines)}: completed a last line that had no newline"
        else:
            if repair:
                with open(p, "r+b") as fh:
                    fh.truncate(len(data) - len(tail))
                    fh.flush()
                    os.fsync(fh.fileno())
            out.repaired = (f"{path}:{len(lines) + 1}: removed a partial last line ({len(tail)} bytes, an answer "
                            f"cut off by a crash); it will be answered again")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EvalInputError(where, f"malformed line in the answers file ({exc}); fix or remove it, "
                                        f"or write to a new --answers file") from None
        if not isinstance(obj, dict) or "question_id" not in obj:
            raise EvalInputError(where, "an answer line needs a 'question_id'")
        out.keys.add(answer_key(obj["question_id"], obj.get("round_id")))
        out.lines += 1
    return out


@dataclass
class RunStats:
    answered: int = 0
    failed: list = field(default_factory=list)  # formats.Problem for questions whose image could not be read


def answer_to_file(model, questions: list[dict], answers_path: str | os.PathLike, image_folder=None,
                   template: str | None = None, batch_size: int = 16, max_new_tokens: int = 128,
                   model_id: str = "mmkit", progress: bool = True, strict: bool = False,
                   on_answer: Callable[[dict, dict], None] | None = None, image_limits: ImageLimits | None = None,
                   **gen) -> RunStats:
    """Answer ``questions`` and append their answer lines to ``answers_path`` (flushed per batch).

    A question whose image cannot be opened, or is over ``image_limits`` (``mmkit.processing.budget``; default
    ``ImageLimits()``), is skipped and recorded in ``RunStats.failed`` (``strict=True``: raises
    :class:`~mmkit.eval.scorers.EvalInputError` after the answers so far are safely written).
    """
    stats = RunStats()
    image_processor = getattr(model.processor, "image_processor", None)  # the size after resize/pad is checked too
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(questions), desc="answering", disable=not progress, dynamic_ncols=True)
    try:
        with open(answers_path, "a", encoding="utf-8") as fh:
            for chunk in batches(questions, max(1, batch_size)):
                ready = []
                for q in chunk:
                    try:
                        img = load_image(q, image_folder, image_limits, image_processor)
                    except (OSError, ValueError, Image.DecompressionBombError) as exc:
                        prob = Problem(q.get("_where", str(q["question_id"])),
                                       f"cannot read image {q.get('image')!r}: {exc}", "bad_image")
                        if strict:
                            raise EvalInputError(prob.where, prob.message) from None
                        stats.failed.append(prob)
                        continue
                    ready.append({**q, "_image": img} if img is not None else q)
                if ready:
                    texts = answer_batch(model, ready, image_folder, template, max_new_tokens, **gen)
                    for q, text in zip(ready, texts):
                        row = answer_record(q, text, model_id)
                        fh.write(json.dumps(row) + "\n")
                        if on_answer is not None:
                            on_answer(q, row)
                    fh.flush()
                    os.fsync(fh.fileno())
                    stats.answered += len(ready)
                bar.update(len(chunk))
    finally:
        bar.close()
        if was_training:
            model.train()
    return stats
