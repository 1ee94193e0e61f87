"""Answer a LLaVA question file with a model: batched, greedy by default.

Questions are ``{"question_id", "image"?, "text", "category"?}``; the image is prepended as
``<image>\\n`` and the text becomes one user turn of the model's template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image


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


def prompt_text(question: dict, image_token: str = "<image>") -> str:
    text = question["text"].replace(image_token, "").strip()
    return f"{image_token}\n{text}" if question.get("image") else text


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def answer_batch(model, questions: list[dict], image_folder: str | Path | None, template: str | None = None,
                 max_new_tokens: int = 16, **gen) -> list[str]:
    """Greedy answers for a batch of questions (left-padded, one forward pass per new token)."""
    proc = model.processor
    texts = [prompt_text(q, proc.image_token) for q in questions]
    images = []
    for q in questions:
        if q.get("image"):
            with Image.open(Path(image_folder or ".") / q["image"]) as im:
                images.append(im.convert("RGB"))
    inputs = proc(images=images, text=texts, template=template or model.template, padding_side="left")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen)
    return [proc.decode(ids).strip() for ids in out]


def answer_questions(model, questions: Iterable[dict], image_folder, template=None, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = True, **gen) -> Iterator[tuple[dict, str]]:
    from tqdm import tqdm

    questions = list(questions)
    bar = tqdm(total=len(questions), desc="answering", disable=not progress, dynamic_ncols=True)
    for chunk in batches(questions, batch_size):
        for q, a in zip(chunk, answer_batch(model, chunk, image_folder, template, max_new_tokens, **gen)):
            yield q, a
        bar.update(len(chunk))
    bar.close()
