"""``python -m mmkit.eval``: answer a benchmark question file with a model, LLaVA-style.

    python -m mmkit.eval --model runs/tiny/final --questions Q.jsonl --image-folder IMG --answers A.jsonl
    python -m mmkit.eval.score --task shapes --answers A.jsonl --annotations KEY.jsonl

Writes one LLaVA answer line per question (``{question_id, prompt, text, answer_id, model_id,
metadata}``), flushed after every batch. Rerunning the same command resumes: ids already in the
answers file are skipped (a partial last line left by a crash is repaired first), so nothing answered
is ever lost or answered twice. ``--num-chunks K --chunk-idx i`` answers the i-th of K ceil-sized
chunks, exactly as LLaVA's ``get_chunk``; merge the chunk files with ``cat``.

Exit codes: 0 done (skipped bad questions are listed as warnings on stderr); 2 bad input (or any
problem under ``--strict``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

from mmkit.eval import formats as F
from mmkit.eval.formats import FORMATS
from mmkit.processing.budget import add_image_limit_flags, limits_from_args

MAX_PRINTED = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkit.eval",
        description="Answer a benchmark question file with a model and write LLaVA-format answers (jsonl): "
                    "batched, greedy by default, resumable, chunkable. Score the result with "
                    "`python -m mmkit.eval.score`.",
        epilog="Input formats: llava = jsonl {question_id, image?, text, category?} (model_vqa_loader); "
               "scienceqa = JSON list {id, image?, conversations} (model_vqa_science); mmbench = TSV "
               "{index, question, hint, A..D, answer, category, l2-category, image (base64)} (model_vqa_mmbench). "
               "Rerun the same command after a crash to answer only what is missing.",
    )
    p.add_argument("--model", required=True, help="model directory (mmkit run dir, llava-hf or original LLaVA)")
    p.add_argument("--questions", required=True, help="question file (jsonl, ScienceQA JSON or MMBench TSV)")
    p.add_argument("--image-folder", default=None,
                   help="folder the questions' image paths are relative to (default: the question file's folder)")
    p.add_argument("--answers", required=True, help="answers jsonl to write (appended to; resumed if it exists)")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="question file format (default: from the extension: .tsv mmbench, JSON array scienceqa, "
                        "else llava)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's; LLaVA's --conv-mode)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s (as LLaVA's scripts)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (only with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (only with --temperature > 0)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into K ceil-sized chunks")
    p.add_argument("--chunk-idx", type=int, default=0, help="which chunk to answer (0-based)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (applied before chunking)")
    p.add_argument("--all-rounds", action="store_true",
                   help="MMBench: one round per option, options rotated each round (circular evaluation)")
    p.add_argument("--single-pred-prompt", action="store_true",
                   help="ScienceQA / MMBench: append \"Answer with the option's letter from the given choices "
                        "directly.\" (LLaVA's --single-pred-prompt)")
    p.add_argument("--lang", choices=("en", "cn"), default="en", help="MMBench answer-suffix language")
    p.add_argument("--strict", action="store_true",
                   help="bad questions (malformed line, duplicate id, missing or unreadable image) are errors: "
                        "list them and stop (exit 2) instead of skipping them with a warning")
    p.add_argument("--model-id", default=None, help="model_id written in the answers (default: from --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights dtype (default: the model's)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_image_limit_flags(p)
    return p


def _warn_all(problems, label: str = "warning") -> None:
    for prob in problems[:MAX_PRINTED]:
        print(f"{label}: {prob}", file=sys.stderr)
    if len(problems) > MAX_PRINTED:
        print(f"{label}: ... and {len(problems) - MAX_PRINTED} more", file=sys.stderr)


def _summarize(problems) -> str:
    counts: dict[str, int] = {}
    for prob in problems:
        counts[prob.kind] = counts.get(prob.kind, 0) + 1
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items()))


def load_questions(args) -> tuple[list[dict], list]:
    """Read, de-duplicate, limit, chunk and (MMBench) expand the questions; returns (questions, problems)."""
    fmt = F.detect_format(args.questions) if args.format == "auto" else args.format
    if fmt == "mmbench":
        rows, problems = F.read_mmbench_questions(args.questions, args.image_folder, limits_from_args(args))
    elif fmt == "scienceqa":
        rows, problems = F.read_scienceqa_questions(args.questions, args.single_pred_prompt)
    else:
        rows, problems = F.read_llava_questions(args.questions)
    if args.all_rounds and fmt != "mmbench":
        print("warning: --all-rounds only applies to MMBench questions; ignored", file=sys.stderr)
    rows, dup = F.drop_duplicates(rows)
    problems += dup
    if args.limit is not None:
        rows = rows[:max(0, args.limit)]
    rows = F.get_chunk(rows, args.num_chunks, args.chunk_idx)
    if fmt == "mmbench":
        rows = [q for r in rows for q in F.expand_mmbench(r, args.all_rounds, args.single_pred_prompt, args.lang)]
    else:
        rows, missing = F.check_images(rows, args.image_folder)
        problems += missing
    return rows, problems


def load_model(path: str, dtype: str | None = None, device: str | None = None):
    # heavy (torch, transformers): only once a model is loaded
    import torch

    import mmkit

    model = mmkit.load(path)
    if dtype:
        model.to(getattr(torch, dtype))
    if device:
        model.to(device)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # heavy (torch, transformers): after the arguments are parsed, so --help stays fast
    from mmkit.eval.runner import answer_key, answer_to_file, load_answered, model_name_from_path
    from mmkit.eval.scorers import EvalInputError

    if os.path.realpath(args.answers) == os.path.realpath(args.questions):
        print(f"error: --answers {args.answers} is the question file; answers go to a file of their own",
              file=sys.stderr)
        return 2
    if args.num_chunks < 1 or not 0 <= args.chunk_idx < args.num_chunks:
        print(f"error: --chunk-idx must be in [0, --num-chunks={args.num_chunks})", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        image_limits = limits_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.image_folder is None:
        args.image_folder = os.path.dirname(os.path.abspath(args.questions))
    try:
        questions, problems = load_questions(args)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.questions}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if problems:
        if args.strict:
            _warn_all(problems, "error")
            print(f"error: {len(problems)} bad question(s) ({_summarize(problems)}); nothing was answered "
                  f"(drop --strict to skip them)", file=sys.stderr)
            return 2
        _warn_all(problems)
        print(f"warning: skipped {len(problems)} bad question(s): {_summarize(problems)}", file=sys.stderr)

    try:
        done = load_answered(args.answers)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if done.repaired:
        print(f"note: {done.repaired}", file=sys.stderr)
    todo = [q for q in questions if answer_key(q["question_id"], (q.get("_extra") or {}).get("round_id")) not in done.keys]
    skipped = len(questions) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(questions)} question(s) already answered in {args.answers}; "
              f"{len(todo)} to go", file=sys.stderr)
    if not todo:
        print(f"nothing to do: all {len(questions)} question(s) are answered in {args.answers}", file=sys.stderr)
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model(args.model, args.dtype, args.device)
    except (OSError, ValueError) as exc:  # unknown layout, missing files, ...
        print(f"error: cannot load --model {args.model}: {exc}", file=sys.stderr)
        return 2
    gen = {}
    if args.temperature and args.temperature > 0:
        gen = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    t0 = time.time()
    try:
        stats = answer_to_file(model, todo, args.answers, args.image_folder, template=args.template,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               model_id=args.model_id or model_name_from_path(args.model),
                               progress=not args.quiet, strict=args.strict, image_limits=image_limits, **gen)
    except EvalInputError as exc:
        print(f"error: {exc} (the answers written so far are kept; rerun to continue)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the answers written so far are in {args.answers}; rerun the same command to "
              f"continue", file=sys.stderr)
        return 130
    if stats.failed:
        _warn_all(stats.failed)
    print(f"wrote {stats.answered} answer(s) to {args.answers} in {time.time() - t0:.1f}s"
          + (f"; {skipped} were already there" if skipped else "")
          + (f"; {len(problems) + len(stats.failed)} bad question(s) skipped" if problems or stats.failed else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
