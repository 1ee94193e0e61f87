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


def false_yes_rate(answers: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The "exists" questions about an absent object (answer "no"): how many, and the share answered "yes" (the
    hallucination a DPO stage should cut), in percent."""
    said = {a["question_id"]: shapes_normalize(str(a.get("text", ""))) for a in answers}
    absent = [k["question_id"] for k in annotations
              if k.get("category") == "exists" and shapes_normalize(str(k["answer"])) == "no"]
    yes = sum(said.get(q) == "yes" for q in absent)
    return {"questions": len(absent), "false_yes": yes, "rate": 100.0 * yes / len(absent) if absent else 0.0}


__all__ = ["false_yes_rate", "score_shapes", "shapes_normalize"]
