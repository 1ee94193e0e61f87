"""Score a LLaVA answers file against an annotation file.

Usage::

    python -m mmkit.eval.score --task vqav2|textvqa|gqa|pope|mme|scienceqa|mmbench|shapes \\
        --answers answers.jsonl --annotations gt.jsonl [--output metrics.json] [--strict]

Prints a readable table of the metrics and, with ``--output``, writes them as
JSON.  Answer/annotation formats are documented in :mod:`mmkit.eval.scorers`.
The tasks are the names in ``mmkit.registry.scorers`` (plug-ins add more through
the entry-point group ``mmkit.scorers``; ``shapes`` is the demo's).
Warnings (answers for unknown ids, missing answers, ...) go to stderr; with
``--strict`` they are fatal.

Exit codes: 0 success; 2 bad input, or any warning under ``--strict`` (the
error is one line on stderr naming the file and line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mmkit.eval.scorers import EvalInputError, read_annotations, read_answers, score
from mmkit.registry import scorers

__all__ = ["format_metrics", "main", "build_parser"]

MAX_PRINTED_WARNINGS = 20


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "-"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return out


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Render a metrics dict as plain-text tables (scalars first, then nested sections)."""
    lines: List[str] = []
    if "task" in metrics:
        lines += [f"task: {metrics['task']}", ""]
    skip = ("task", "warnings")
    scalars = [(k, v) for k, v in metrics.items()
               if k not in skip and not isinstance(v, (Mapping, list, tuple))]
    if scalars:
        lines += _table(["metric", "value"], [[k, _fmt(v)] for k, v in scalars])
    for k, v in metrics.items():
        if k not in skip and isinstance(v, (list, tuple)):
            lines.append(f"{k}: {_fmt(v)}")
    for k, v in metrics.items():
        if not isinstance(v, Mapping) or not v:
            continue
        lines.append("")
        lines.append(f"[{k}]")
        values = list(v.values())
        if all(isinstance(x, Mapping) for x in values):
            cols: List[str] = []
            for x in values:
                for c in x:
                    if c not in cols:
                        cols.append(c)
            rows = [[str(name)] + [_fmt(x.get(c)) for c in cols] for name, x in v.items()]
            lines += _table([k.replace("per_", "")] + cols, rows)
        else:
            lines += _table([k.replace("per_", ""), "value"], [[str(n), _fmt(x)] for n, x in v.items()])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkit.eval.score",
        description="Score LLaVA-format answers (jsonl) against annotations with the official benchmark rules.",
    )
    p.add_argument("--task", required=True, choices=scorers.names(), help="benchmark whose scoring rules to apply")
    p.add_argument("--answers", required=True, help="answers jsonl: {question_id, prompt, text, answer_id, ...}")
    p.add_argument("--annotations", required=True, help="annotation / answer-key file (JSONL or JSON array)")
    p.add_argument("--output", help="write the metrics as JSON to this path")
    p.add_argument("--strict", action="store_true", help="treat warnings (unknown ids, missing answers) as errors")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        answers = read_answers(args.answers)
        annotations = read_annotations(args.annotations)
        metrics: Dict[str, Any] = score(args.task, answers, annotations, strict=args.strict)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2

    metrics = {"answers": os.path.abspath(args.answers), "annotations": os.path.abspath(args.annotations), **metrics}
    if not args.quiet:
        print(format_metrics({k: v for k, v in metrics.items() if k not in ("answers", "annotations")}))
    warnings = metrics.get("warnings") or []
    for w in warnings[:MAX_PRINTED_WARNINGS]:
        print(f"warning: {w}", file=sys.stderr)
    if len(warnings) > MAX_PRINTED_WARNINGS:
        print(f"warning: ... {len(warnings) - MAX_PRINTED_WARNINGS} more listed in the metrics", file=sys.stderr)
    if args.output:
        try:
            d = os.path.dirname(os.path.abspath(args.output))
            os.makedirs(d, exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2, sort_keys=False)
                f.write("\n")
        except OSError as e:
            print(f"error: {args.output}: cannot write metrics ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
