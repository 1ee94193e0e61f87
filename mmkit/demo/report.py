"""What the demo adds to a training run: the blind twin, held-out accuracy, a sample chat, the final report.

The demo proves the model reads the image: the same recipe trained and tested on blanked
(all-white) images runs beside it in a second process (``plugins.shapes_demo.blind_twin``), and
both held-out accuracies are printed with the majority-class baseline.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmkit.demo.options import NAME, ShapesDemoOptions, shapes_paths
from mmkit.demo.scorer import false_yes_rate, score_shapes
from mmkit.demo.shapes import majority_baseline, render_scene
from mmkit.eval.runner import answer_questions, read_questions
from mmkit.eval.scorers import read_annotations
from mmkit.plugin import TrainRun

log = logging.getLogger("mmkit.train")


def _split_cpus() -> tuple[list[int], list[int]] | None:
    """This process's CPUs in two halves (this run's, the twin's); None where affinity cannot be set or there is
    one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    mine = len(cpus) - len(cpus) // 2
    return cpus[:mine], cpus[mine:]


def start_blind_twin(run: TrainRun, options: ShapesDemoOptions):
    """Start the same recipe on blanked images in a second process; None if not wanted.

    The two runs split the CPUs (affinity masks, torch threads, and so the default ``data.num_workers``, which
    counts the CPUs a process may use): two equal jobs finish together, and neither starts DataLoader workers
    that the other's CPUs would have to run."""
    if run.world_size != 1 or not options.blind_twin or options.blank_images:
        return None
    out = Path(run.recipe.train.output_dir) / "blind"
    cmd = [sys.executable, "-m", "mmkit.train", run.recipe_path, *run.overrides, f"plugins.{NAME}.blank_images=true",
           f"plugins.{NAME}.blind_twin=false", f"train.output_dir={out}"]
    split = _split_cpus()
    threads = str(len(split[1])) if split else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out.mkdir(parents=True, exist_ok=True)
    log.info("blind twin: the same recipe on blanked images runs beside this one (log: %s)%s", out / "stdout.log",
             f"; CPUs {split[0]} here, {split[1]} for the twin" if split else "")
    with open(out / "stdout.log", "w") as fh:  # the child keeps its own copy of the descriptor
        twin = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if split:
        os.sched_setaffinity(twin.pid, split[1])  # before it imports torch (seconds): its threads and workers see it
        os.sched_setaffinity(0, split[0])
        torch.set_num_threads(len(split[0]))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return twin


def heldout_accuracy(model, recipe, run_dir: Path, options: ShapesDemoOptions,
                     answers_file: str = "heldout_answers.jsonl") -> dict:
    """Answer the held-out questions (written to ``RUN_DIR/<answers_file>``) and score them; ``exists_false_yes``:
    :func:`mmkit.demo.scorer.false_yes_rate`."""
    paths = shapes_paths(Path(run_dir) / "data", options)
    questions = read_questions(paths.heldout_questions)
    model.eval()
    answers = []
    with open(Path(run_dir) / answers_file, "w") as fh:
        for q, text in answer_questions(model, questions, paths.image_folder, batch_size=64, max_new_tokens=4,
                                        progress=False):
            row = {"question_id": q["question_id"], "prompt": q["text"], "text": text, "model_id": recipe.name,
                   "metadata": {}}
            answers.append(row)
            fh.write(json.dumps(row) + "\n")
    key = read_annotations(paths.heldout_answers)
    return dict(score_shapes(answers, key), exists_false_yes=false_yes_rate(answers, key))


def before_dpo(model, recipe, run_dir: Path, options: ShapesDemoOptions) -> tuple[int, dict] | None:
    """``(stage, metrics)`` of the weights that entered the recipe's first DPO stage (the last checkpoint of the
    stage before it, if ``train.keep_last`` kept it); None without a DPO stage or that checkpoint."""
    from safetensors.torch import load_model  # as the trainer loads its checkpoints (tied weights)

    from mmkit.train.checkpoint import list_checkpoints  # the trainer's layout; kept off the demo's import path
    from mmkit.train.dpo import frozen_copy  # the same: training code, only needed after a DPO stage

    first = next((i for i, s in enumerate(recipe.stages) if s.objective == "dpo"), None)
    if not first:
        return None
    kept = [p for p in list_checkpoints(Path(run_dir) / "checkpoints") if p.name.startswith(f"stage{first - 1}-")]
    if not kept:
        log.warning("no checkpoint of stage %d left (train.keep_last): no before-DPO figures", first - 1)
        return None
    weights = kept[-1] / "model.safetensors"
    if not weights.is_file():  # train.strategy fsdp saves sharded checkpoints: no single file to load here
        log.warning("%s holds no model.safetensors (a sharded checkpoint): no before-DPO figures", kept[-1])
        return None
    before = frozen_copy(model)
    load_model(before, str(weights), strict=False)
    return first, heldout_accuracy(before, recipe, run_dir, options, "heldout_answers_before_dpo.jsonl")


def finish(run: TrainRun, options: ShapesDemoOptions, twin) -> None:
    """Held-out accuracy (``heldout_metrics.json``), a sample chat (``sample.png``), the blind twin's result."""
    model, recipe, run_dir = run.model, run.recipe, Path(run.run_dir)
    metrics = heldout_accuracy(model, recipe, run_dir, options)
    acc = metrics["accuracy"]
    pre = before_dpo(model, recipe, run_dir, options)
    if pre is not None:
        metrics["before_dpo"] = dict(pre[1], stage=pre[0])
    (run_dir / "heldout_metrics.json").write_text(json.dumps(metrics, indent=1))
    paths = shapes_paths(run_dir / "data", options)
    baseline = 100 * majority_baseline(paths.heldout_answers)

    image, scene = render_scene(np.random.default_rng(12345), size=int(options.image_size))
    if options.blank_images:
        image = Image.new("RGB", image.size, "white")
    image.save(run_dir / "sample.png")
    question = "what color is the " + scene[0]["shape"] + " ?"
    reply, _ = model.chat(image, question, max_new_tokens=4)
    print(f"\nsample chat ({run_dir / 'sample.png'}: {', '.join(o['color'] + ' ' + o['shape'] for o in scene)})")
    print(f"  USER: {question}\n  ASSISTANT: {reply}")
    print(f"\nheld-out accuracy: {acc:.1f}%  (majority-class baseline {baseline:.1f}%)")
    per_cat = metrics.get("per_category", {})
    if per_cat:
        print("  per category: " + ", ".join(f"{k} {v['accuracy']:.0f}%" for k, v in sorted(per_cat.items())))
    fy = metrics["exists_false_yes"]
    print(f"  exists, false yes (absent object answered \"yes\"): {fy['rate']:.1f}% of {fy['questions']}")
    if pre is not None:
        b = pre[1]
        print(f"before the DPO stage (stages[{pre[0]}]): held-out accuracy {b['accuracy']:.1f}%, exists false yes "
              f"{b['exists_false_yes']['rate']:.1f}%  ->  after: {acc:.1f}%, {fy['rate']:.1f}%")
    if twin is not None:
        log.info("waiting for the blind twin to finish")
        twin.wait()
        blind_path = Path(recipe.train.output_dir) / "blind" / "heldout_metrics.json"
        if twin.returncode == 0 and blind_path.is_file():
            blind = json.loads(blind_path.read_text())["accuracy"]
            print(f"blind twin (same recipe, images blanked): {blind:.1f}%  -> the image is worth "
                  f"{acc - blind:+.1f} points")
        else:
            print(f"blind twin failed (exit {twin.returncode}); see {Path(recipe.train.output_dir) / 'blind'}")
    print(f"loss curve: {run_dir / 'loss.png'}; model: {run_dir / 'final'}")


__all__ = ["finish", "heldout_accuracy", "start_blind_twin"]
