"""The demo's scoring task ``shapes`` (``python -m mmkit.eval.score --task shapes``, ``eval.task: shapes``).

Annotations: ``{"question_id", "answer": str, "category"?: str}`` (the demo's ``heldout_answers_key.jsonl``),
scored by normalised exact match (lowercase, strip, strip trailing ``.``), overall and per ``category``.
Registered in ``mmkit.registry.scorers`` through the entry point ``mmkit.scorers: shapes`` in mmkit's
pyproject.toml.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from mmkit.eval.scorers import score_exact


def shapes_normalize(text: str) -> str:
    """Normalised exact match for the shapes demo: lowercase, strip, strip trailing '.'."""
    return text.strip().lower().rstrip(".").strip()


def score_shapes(
    answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]], strict: bool = False
) -> Dict[str, Any]:
    """Shapes demo: normalised exact match, overall and per ``category``."""
    return score_exact("shapes", answers, annotations, shapes_normalize, shapes_normalize, strict)


__all__ = ["score_shapes", "shapes_normalize"]
