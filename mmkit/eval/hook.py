"""Evaluation during training: every ``train.eval_every`` steps, answer a few questions and score them.

    hook = EvalHook.from_recipe(recipe, run_dir)          # None unless train.eval_every > 0
    metrics = hook.maybe_run(model, step, log)            # None except every eval_every steps

Questions come from ``eval.questions`` (a LLaVA question jsonl, images under ``eval.image_folder``),
or -- when ``eval.questions`` is unset -- from the first active plug-in whose ``eval_source`` gives
an :class:`mmkit.plugin.EvalSource` (questions, image folder, answer key and task; the demo's is its
held-out split, scored with the ``shapes`` task). At most ``eval.limit`` questions are used (default
50; the first ones, so every evaluation sees the same set). The score is computed with ``eval.task``
against ``eval.annotations`` (plug-in questions: against the plug-in's answer key, with its task unless
``eval.task`` is set); without annotations only the answers are written and sampled.

Each run logs one line with the score and three sample question/answer lines, appends its metrics to
``RUN_DIR/eval/metrics.jsonl``, writes the answers to ``RUN_DIR/eval/answers_<stage>_step<N>.jsonl``
and returns the metrics. The model is put back in train mode and the torch RNG state is restored, so
training proceeds exactly as without evaluation. Only rank 0 evaluates (other ranks get ``None``);
FSDP runs get no hook (the unsharded model is not on one rank).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmkit.eval import formats as F
from mmkit.eval.formats import qid_key
from mmkit.eval.runner import answer_to_file
from mmkit.eval.scorers import read_annotations, score
from mmkit.registry import plugins

_LOG = logging.getLogger("mmkit.train")

DEFAULT_LIMIT = 50
SAMPLES = 3


def _emit(log: Any, msg: str) -> None:
    if log is None:
        _LOG.info(msg)
    elif isinstance(log, logging.Logger):
        log.info(msg)
    elif callable(log):
        log(msg)
    else:
        log.info(msg)


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class EvalHook:
    def __init__(self, every: int, questions: str | Callable[[], tuple[str, str, str | None]],
                 image_folder: str | None = None, task: str | None = None, annotations: str | None = None,
                 limit: int | None = DEFAULT_LIMIT, max_new_tokens: int = 16, batch_size: int = 32,
                 out_dir: str | os.PathLike | None = None, template: str | None = None):
        """``questions`` is a path, or a callable returning ``(questions, image_folder, annotations)``
        (resolved at the first evaluation, e.g. after the trainer generated the data)."""
        self.every = int(every)
        self._source = questions
        self.image_folder = image_folder
        self.task = task
        self.annotations = annotations
        self.limit = limit
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.template = template
        self._questions: list[dict] | None = None
        self._gold: dict[str, Any] = {}
        self._annotations: list | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_recipe(cls, recipe, run_dir: str | os.PathLike, limit: int | None = None) -> "EvalHook | None":
        every = int(getattr(recipe.train, "eval_every", 0) or 0)
        if every <= 0:
            return None
        if getattr(recipe.train, "strategy", "single") == "fsdp":
            _LOG.warning("train.eval_every: evaluation during training is not supported with FSDP; skipped "
                         "(evaluate a checkpoint with python -m mmkit.eval)")
            return None
        ev = recipe.eval
        if limit is None:
            limit = getattr(ev, "limit", None) or DEFAULT_LIMIT
        common = dict(limit=limit, max_new_tokens=getattr(ev, "max_new_tokens", 16) or 16,
                      out_dir=Path(run_dir) / "eval")
        q = getattr(ev, "questions", None)
        if not q:
            source = _plugin_source(recipe, Path(run_dir))
            if source is None:
                _LOG.warning("train.eval_every=%d but eval.questions is not set (and no active plug-in supplies "
                             "questions): no evaluation during training", every)
                return None
            return cls(every, source.load, task=ev.task or source.task, **common)
        if not Path(q).is_file():
            raise FileNotFoundError(f"eval.questions: no such file: {q}")
        annotations = getattr(ev, "annotations", None)
        if annotations and not Path(annotations).is_file():
            raise FileNotFoundError(f"eval.annotations: no such file: {annotations}")
        return cls(every, q, image_folder=ev.image_folder, task=ev.task, annotations=annotations, **common)

    # ------------------------------------------------------------------ running

    def _load(self) -> None:
        if callable(self._source):
            path, self.image_folder, self.annotations = self._source()
        else:
            path = self._source
        rows, problems = F.read_llava_questions(path)
        rows, dup = F.drop_duplicates(rows)
        rows, missing = F.check_images(rows, self.image_folder or os.path.dirname(os.path.abspath(path)))
        problems += dup + missing
        if problems:
            _LOG.warning("eval: skipped %d bad question(s) in %s, first: %s", len(problems), path, problems[0])
        if self.limit:
            rows = rows[:int(self.limit)]
        if self.image_folder is None:
            self.image_folder = os.path.dirname(os.path.abspath(path))
        self._questions = rows
        if self.annotations and self.task:
            wanted = {F.qid_key(r["question_id"]) for r in rows}
            anns = []
            for a in read_annotations(self.annotations):
                qid = a.get("question_id", a.get("questionId", a.get("index")))
                if qid is not None and F.qid_key(qid) in wanted:
                    anns.append(a)
                    if "answer" in a:
                        self._gold[F.qid_key(qid)] = a["answer"]
            self._annotations = anns

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def maybe_run(self, model, step: int, log: Any = None, stage: Any = None) -> dict | None:
        """Evaluate when ``step`` is a multiple of ``eval_every`` (rank 0 only); else ``None``.

        ``log``: a ``logging.Logger`` or a callable taking one string. ``stage``: the current
        ``StageConfig`` (optional): its template is used and its name goes into the file names.
        """
        if not self.due(step) or not _is_rank0():
            return None
        try:
            return self.run(model, step, log, stage)
        except Exception as exc:  # an evaluation problem must not kill a training run
            _LOG.error("eval at step %d failed (training continues): %s: %s", step, type(exc).__name__, exc)
            return {"step": step, "error": f"{type(exc).__name__}: {exc}"}

    def run(self, model, step: int, log: Any = None, stage: Any = None) -> dict:
        if self._questions is None:
            self._load()
        t0 = time.time()
        stage_name = getattr(stage, "name", None)
        template = self.template or getattr(stage, "template", None) or None
        tag = f"{stage_name}_step{step}" if stage_name else f"step{step}"
        if self.out_dir is None:  # never litter the working directory

            self.out_dir = Path(tempfile.mkdtemp(prefix="mmkit-eval-"))
        answers_path = self.out_dir / f"answers_{tag}.jsonl"
        answers_path.parent.mkdir(parents=True, exist_ok=True)
        answers_path.unlink(missing_ok=True)
        rows: list[tuple[dict, dict]] = []
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=[]):
                answer_to_file(model, self._questions, answers_path, self.image_folder, template=template,
                               batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, model_id=f"step{step}",
                               progress=False, on_answer=lambda q, r: rows.append((q, r)))
        finally:
            model.train(was_training)
        metrics: dict[str, Any] = {"step": step}
        if stage_name:
            metrics["stage"] = stage_name
        if self._annotations is not None:
            m = score(self.task, [r for _, r in rows], self._annotations)
            metrics.update({k: v for k, v in m.items() if k != "warnings"})
        else:
            metrics.update({"task": self.task, "n": len(rows)})
        metrics["seconds"] = round(time.time() - t0, 3)
        metrics["answers"] = str(answers_path)
        headline = _headline(metrics) if self._annotations is not None else "not scored (no eval.task/annotations)"
        where = f"stage {stage_name} " if stage_name else ""
        _emit(log, f"eval {where}step {step}: {headline} on {len(rows)} question(s) in {metrics['seconds']:.1f}s")

        for q, r in rows[:SAMPLES]:
            gold = self._gold.get(qid_key(q["question_id"]))
            _emit(log, f"  Q: {q['text']!r} -> A: {r['text']!r}" + (f" (gold: {gold!r})" if gold is not None else ""))
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
        return metrics


def _plugin_source(recipe, run_dir: Path):
    """The first :class:`mmkit.plugin.EvalSource` given by the recipe's active plug-ins, or None."""
    for name, options in (getattr(recipe, "plugins", None) or {}).items():
        eval_source = getattr(plugins.get(name), "eval_source", None)
        source = eval_source(recipe, run_dir, options) if eval_source is not None else None
        if source is not None:
            return source
    return None


def _headline(metrics: dict) -> str:
    task = metrics.get("task") or "answers"
    for key, unit in (("accuracy", "%"), ("f1", "%"), ("perception", "")):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{task} {key} {v:.1f}{unit}"
    return str(task)
